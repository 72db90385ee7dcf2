"""Useful (non-padding) tokens per second: padding-free batches vs padded ones, same examples, through lorasens.

SmolLM2-135M, LoRA r=8 on all 7 projections, batches of 8 training examples of the real E2E and SAMSum files
(`../shared/data`, or --data_root), forward + backward, fp32, one thread. Each dataset is trained once per mode by
`run_experiment` with the same seed (so the same batches): `--packing false`, `--packing true` with
transformers' block-diagonal mask over the whole packed row (the earlier path) and `--packing true` with attention
computed per packed example (the default), alternating when --repeats > 1, at each of --threads. Every mode runs the LM
head at the labelled positions only (`training.labelled_head`, the default) except `plain`: padded batches with the
head at every position, what a plain PEFT + Trainer script runs. Useful tokens are the `tokens` of train_log.jsonl
(non-padding tokens; identical in every run, which is checked); time is the sum of step times (CPU and wall) after
the first step (warm-up). Targets: >= 1.4x on E2E, >= 1.6x on SAMSum.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_packing.py [--steps 5] [--repeats 1] [--datasets e2e,samsum] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import StepTimer  # noqa: E402


class CpuStepTimer(StepTimer):
    """Also CPU time per step: with one thread it is the compute time, which other jobs on a shared machine
    inflate much less than wall time."""

    def __init__(self):
        super().__init__()
        self.cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        self.cpu.append(time.process_time())

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        self.cpu.append(time.process_time())

    def cpu_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.cpu[:-1], self.cpu[1:])][skip:]

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = {"e2e": 256, "samsum": 768}  # the presets' values


# padded with the head at every position; --packing false; packed with the whole-row block mask; packed per example
MODES = ("plain", "padded", "mask", "segments")


def run(dataset: str, data_dir: Path, mode: str, steps: int, out: Path) -> tuple[float, float, int, float, dict]:
    import lorasens.experiment.run as experiment
    import lorasens.training.trainer as training
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment
    from lorasens.training.decision import SpeedupDecision

    packing = mode not in ("plain", "padded")
    name = f"{dataset}_{mode}"
    original, original_head = training.packed_collator, experiment.decide_head
    if mode == "mask":  # the earlier packed path: SDPA with a block-diagonal mask over the whole packed row
        training.packed_collator = lambda model, segments=True: original(model, segments=False)
    if mode == "plain":
        experiment.decide_head = lambda *args: SpeedupDecision(False, "the plain Trainer's head")
    cfg = build_config(cli_overrides={
        "model": "smollm2-135m", "dataset": dataset, "data_dir": str(data_dir), "target": "both", "r": 8,
        "lora_alpha": 16, "lora_dropout": 0.0, "batch_size": 8, "max_steps": steps, "max_length": MAX_LENGTH[dataset],
        "lr": 2e-4, "train_samples": 8 * steps, "eval_samples": 8, "eval_steps": 0, "save_steps": 0,
        "evaluate": False, "ablation": False, "packing": packing, "output_dir": str(out), "experiment_name": name,
        "overwrite": True, "seed": 0})
    timer = CpuStepTimer()
    try:
        summary = run_experiment(cfg, callbacks=[timer], after_training=()).summary  # training only
    finally:
        training.packed_collator, experiment.decide_head = original, original_head
    log = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in log[1:])
    return sum(timer.step_times(skip=1)), sum(timer.cpu_times(skip=1)), tokens, log[-1]["loss"], summary["packing"]


def padding_ceiling(dataset: str, data_dir: Path, batches: int = 500) -> float:
    """Padded token slots over useful tokens for random batches of 8 from the training file: the most that removing
    padding can save in token work (attention's length-squared part aside)."""
    import random

    from lorasens.data.registry import load_examples
    from lorasens.model.loading import load_model

    tok = load_model("smollm2-135m", "fp32").tokenizer
    lengths = [min(MAX_LENGTH[dataset], len(tok(ex.prompt + ex.target).input_ids) + 1)
               for ex in load_examples(dataset, "train", str(data_dir), 0)]
    rng = random.Random(0)
    drawn = [rng.sample(lengths, 8) for _ in range(batches)]
    return sum(8 * max(b) for b in drawn) / sum(sum(b) for b in drawn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--datasets", default="e2e,samsum")
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}", flush=True)
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("lorasens").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for dataset in args.datasets.split(","):
                data_dir = Path(args.data_root) / dataset
                if not data_dir.is_dir():
                    print(f"{dataset}: {data_dir} not found, skipped")
                    continue
                wall = dict.fromkeys(MODES, 0.0)
                cpu = dict.fromkeys(MODES, 0.0)
                tokens = dict.fromkeys(MODES, 0)
                losses, decision = {}, None
                for _ in range(args.repeats):
                    for mode in MODES:  # alternated
                        w, c, t, losses[mode], info = run(dataset, data_dir, mode, args.steps, Path(tmp))
                        wall[mode] += w
                        cpu[mode] += c
                        tokens[mode] += t
                        decision = info if mode == "segments" else decision
                assert len(set(tokens.values())) == 1, f"different batches: {tokens}"
                useful = tokens["plain"]
                print(f"{dataset}, {threads} thread(s): {useful} useful tokens in {args.repeats * (args.steps - 1)} "
                      f"step(s) per mode (train_log.jsonl tokens / step time)", flush=True)
                for mode in MODES:
                    print(f"  {mode:9s} {useful / wall[mode]:6.0f} tokens/s wall ({wall[mode]:.1f} s), "
                          f"{useful / cpu[mode]:6.0f} tokens/CPU-s ({cpu[mode]:.1f} s): "
                          f"{wall['plain'] / wall[mode]:.2f}x plain by wall, {cpu['plain'] / cpu[mode]:.2f}x by CPU, "
                          f"{wall['padded'] / wall[mode]:.2f}x padded by wall; "
                          f"last-step loss {losses[mode]:.5f}", flush=True)
                print(f"  packing decision: {decision}; load {os.getloadavg()}", flush=True)
                print(f"  ceiling: random padded batches of 8 of the {dataset} training file hold "
                      f"{padding_ceiling(dataset, data_dir):.2f}x its useful tokens", flush=True)


if __name__ == "__main__":
    main()
