"""LoRA training throughput: lorasens vs a plain PEFT + Trainer script, same model, batches and settings.

SmolLM2-135M (offline), synthetic data, batch 8 x 64 tokens, LoRA r=8 on attention + MLP, fp32 on CPU.
Runs alternate (plain, lorasens, plain, lorasens, ...) so machine noise hits both; the figure is the ratio of
median step times, steps after the first two (warm-up) only. Target: lorasens within 5% of plain.

    .venv/bin/python benchmarks/bench_training_overhead.py [--steps 14] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import StepTimer, median  # noqa: E402

MAX_LENGTH = 64
BATCH = 8


def features(tokenizer):
    from lorasens.data.features import build_features
    from lorasens.data.registry import load_examples

    examples = load_examples("synthetic", "train", None, seed=0, limit=400)
    return build_features(examples, tokenizer, MAX_LENGTH)[0]


def run_plain(steps: int, out: Path, tracking: bool = False) -> tuple[list[float], int]:
    """What a user writes by hand: get_peft_model on the 7 projection types + Trainer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from lorasens.model.loading import load_model

    set_seed(0)
    loaded = load_model("smollm2-135m", "fp32")
    tok = loaded.tokenizer
    model = get_peft_model(loaded.model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    timer = StepTimer()
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=2e-4, logging_steps=1, save_strategy="no", eval_strategy="no",
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding", remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(features(tok)),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                      processing_class=tok, callbacks=[timer])
    trainer.train()
    return timer.step_times(), trainer.state.num_input_tokens_seen


def run_lorasens(steps: int, out: Path, tracking: bool) -> tuple[list[float], int]:
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    cfg = build_config(cli_overrides={
        "model": "smollm2-135m", "dataset": "synthetic", "target": "both", "r": 8, "lora_alpha": 16,
        "lora_dropout": 0.05, "batch_size": BATCH, "max_steps": steps, "max_length": MAX_LENGTH, "lr": 2e-4,
        "train_samples": 400, "eval_steps": 0, "save_steps": 0, "evaluate": False, "ablation": False,
        "track_gradients": tracking, "track_importance": tracking, "track_update_magnitude": tracking,
        "output_dir": str(out), "experiment_name": "bench", "overwrite": True, "seed": 0,
        # Padded like the plain script: this measures lorasens' own overhead; bench_packing.py measures packing.
        "packing": False})
    timer = StepTimer()
    run_experiment(cfg, callbacks=[timer])
    import json

    log = (out / "bench" / "train_log.jsonl").read_text().splitlines()
    return timer.step_times(), json.loads(log[-1])["tokens_seen"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("lorasens").setLevel(logging.WARNING)
    variants = {
        "plain PEFT + Trainer": lambda out: run_plain(args.steps, out / "plain"),
        "lorasens (tracking off)": lambda out: run_lorasens(args.steps, out, tracking=False),
        "lorasens (default: tracking on)": lambda out: run_lorasens(args.steps, out, tracking=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, run in variants.items():
                step_times, tokens[name] = run(Path(tmp))
                times[name] += step_times
    assert len(set(tokens.values())) == 1, f"variants saw different batches: {tokens}"
    tokens_per_step = next(iter(tokens.values())) / args.steps  # non-padding tokens, identical batches
    base = median(times["plain PEFT + Trainer"])
    print(f"smollm2-135m, batch {BATCH} x <= {MAX_LENGTH} tokens, {tokens_per_step:.0f} tokens/step; "
          f"{len(times['plain PEFT + Trainer'])} steps measured per variant (2 warm-up steps per run dropped)")
    print(f"{'variant':34s} {'median step (s)':>16s} {'tokens/s':>10s} {'ratio vs plain':>15s}")
    for name, values in times.items():
        m = median(values)
        print(f"{name:34s} {m:16.3f} {tokens_per_step / m:10.0f} {m / base:15.3f}")


if __name__ == "__main__":
    main()
