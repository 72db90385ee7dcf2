#!/usr/bin/env bash
# GPU check (issue 13, item 4) — PREPARED BUT NEVER RUN: no GPU was lent to the session that wrote it, so the script
# itself is untested on CUDA. Run it on a machine with one CUDA GPU and torch/transformers/peft/lorasens installed
# (`pip install -e .` in the repository); it needs no network (models are randomly initialised from configs written
# below: throughput does not depend on the weights) and is meant to finish in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # figures go to OUT_DIR/gpu_check.txt (default: gpu_check_out)
#
# Measures, in bf16: lorasens vs plain PEFT + Trainer tokens/s (target: within 5%), packed vs padded, tracking
# overhead at interval 1 (target <= 3%), backward truncation (last half of the layers trains), peak memory, and a
# 20-step quickstart-shaped run end to end on CUDA.
set -euo pipefail
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="${PYTHONPATH:-}:$(cd "$(dirname "$0")/.." && pwd)/src"
timeout 470 "$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/gpu_check.txt"
import json, sys, time, tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from lorasens.model.loading import byte_level_tokenizer

assert torch.cuda.is_available(), "no CUDA device"
out = Path(sys.argv[1])
device = torch.cuda.get_device_name(0)
print(f"device: {device}; torch {torch.__version__}")

# Config values of the real models (from their config.json), vocabulary kept so the LM head costs what it costs.
CONFIGS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def save_random(name: str, root: Path) -> Path:
    path = root / name
    tok = byte_level_tokenizer()
    config = LlamaConfig(**CONFIGS[name], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Timer(TrainerCallback):
    def __init__(self):
        self.marks = []

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def seconds(self, skip=3):
        return self.marks[-1] - self.marks[skip]


def lorasens_run(model_path, root, name, steps, **overrides):
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    settings = {"model": str(model_path), "dataset": "synthetic", "target": "both", "r": 8, "lora_alpha": 16,
                "lora_dropout": 0.0, "batch_size": 8, "max_steps": steps, "max_length": 256, "lr": 2e-4,
                "train_samples": 8 * steps, "eval_steps": 0, "save_steps": 0, "evaluate": False, "ablation": False,
                "precision": "bf16", "output_dir": str(root), "experiment_name": name, "overwrite": True, "seed": 0}
    settings.update(overrides)
    timer = Timer()
    torch.cuda.reset_peak_memory_stats()
    summary = run_experiment(build_config(cli_overrides=settings), callbacks=[timer]).summary
    log = [json.loads(l) for l in (root / name / "train_log.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in log[3:])
    return tokens / timer.seconds(), torch.cuda.max_memory_allocated() / 2**30, summary


def plain_run(model_path, root, steps):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lorasens.data.features import build_features
    from lorasens.data.registry import load_examples

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    feats = build_features(load_examples("synthetic", "train", None, 0, 8 * steps), tok, 256)[0]
    timer = Timer()
    args = TrainingArguments(output_dir=str(root / "plain"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=2e-4, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
                             seed=0, data_seed=0, bf16=True, disable_tqdm=True, remove_unused_columns=False,
                             include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(feats), processing_class=tok,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                      callbacks=[timer])
    trainer.train()
    per_step = trainer.state.num_input_tokens_seen / steps
    return per_step * (steps - 3) / timer.seconds()


with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    for name, steps in (("smollm2-135m", 40), ("tinyllama-1.1b", 30)):
        path = save_random(name, root)
        plain = plain_run(path, root, steps)
        padded, mem_padded, _ = lorasens_run(path, root, "padded", steps, packing=False, track_gradients=False,
                                             track_importance=False, track_update_magnitude=False)
        tracked, _, _ = lorasens_run(path, root, "tracked", steps, packing=False)
        packed, mem_packed, summary = lorasens_run(path, root, "packed", steps)
        late, _, _ = lorasens_run(path, root, "late", steps, packing=False, track_gradients=False,
                                  track_importance=False, track_update_magnitude=False,
                                  phase_strategy="both@50-100%")
        print(f"{name}: plain PEFT+Trainer {plain:.0f} tok/s; lorasens (tracking off) {padded:.0f} tok/s = "
              f"{padded / plain:.3f}x plain; tracking at interval 1: {tracked / padded:.3f}x of untracked; packed "
              f"{packed:.0f} tok/s = {packed / padded:.2f}x padded ({summary['packing']}); last half of the layers "
              f"training: {padded / late:.2f}x the step time of all; peak memory {mem_padded:.2f} GiB padded, "
              f"{mem_packed:.2f} GiB packed", flush=True)
    started = time.perf_counter()
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    cfg = build_config("quickstart", cli_overrides={"model": str(root / "smollm2-135m"), "max_steps": 20,
                                                    "precision": "bf16", "output_dir": str(root),
                                                    "experiment_name": "quickstart", "overwrite": True})
    summary = run_experiment(cfg).summary
    print(f"quickstart-shaped run, 20 steps on CUDA: {time.perf_counter() - started:.1f} s end to end; "
          f"ablation {summary.get('ablation_time_s')} s ({summary.get('ablation_method')})", flush=True)
EOF
# The large-model paths (QLoRA, FSDP on up to 2 GPUs, ZeRO-3 where deepspeed imports), each check independent;
# summary in OUT/gpu_check_large.txt.
bash "$(dirname "$0")/gpu_check_large.sh" "$OUT" || true
