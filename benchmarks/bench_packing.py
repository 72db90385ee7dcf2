"""Useful (non-padding) tokens per second: padding-free batches vs padded ones, same examples, through lorasens.

SmolLM2-135M, LoRA r=8 on all 7 projections, batches of 8 training examples of the real E2E and SAMSum files
(`../shared/data`, or --data_root), forward + backward, fp32, one thread. Each dataset is trained twice by
`run_experiment` with the same seed (so the same batches), `--packing false` then `--packing true`, alternating when
--repeats > 1. Useful tokens are the `tokens` of train_log.jsonl (non-padding tokens; identical in both runs, which
is checked); time is the sum of step times (CPU and wall) after the first step (warm-up). Target: >= 1.2x on E2E, >= 1.6x on
SAMSum.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_packing.py [--steps 5] [--repeats 1] [--datasets e2e,samsum]
"""

from __future__ import annotations

import argparse
import json
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


def run(dataset: str, data_dir: Path, packing: bool, steps: int, out: Path) -> tuple[float, float, int, float, dict]:
    from lorasens.config import build_config
    from lorasens.run import run_experiment

    name = f"{dataset}_{packing}"
    cfg = build_config(cli_overrides={
        "model": "smollm2-135m", "dataset": dataset, "data_dir": str(data_dir), "target": "both", "r": 8,
        "lora_alpha": 16, "lora_dropout": 0.0, "batch_size": 8, "max_steps": steps, "max_length": MAX_LENGTH[dataset],
        "lr": 2e-4, "train_samples": 8 * steps, "eval_samples": 8, "eval_steps": 0, "save_steps": 0,
        "evaluate": False, "ablation": False, "packing": packing, "output_dir": str(out), "experiment_name": name,
        "overwrite": True, "seed": 0})
    timer = CpuStepTimer()
    summary = run_experiment(cfg, callbacks=[timer]).summary
    log = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in log[1:])
    return sum(timer.step_times(skip=1)), sum(timer.cpu_times(skip=1)), tokens, log[-1]["loss"], summary["packing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--datasets", default="e2e,samsum")
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("lorasens").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            data_dir = Path(args.data_root) / dataset
            if not data_dir.is_dir():
                print(f"{dataset}: {data_dir} not found, skipped")
                continue
            wall = {False: 0.0, True: 0.0}
            cpu = {False: 0.0, True: 0.0}
            tokens = {False: 0, True: 0}
            losses, decision = {}, None
            for _ in range(args.repeats):
                for packing in (False, True):
                    w, c, t, losses[packing], info = run(dataset, data_dir, packing, args.steps, Path(tmp))
                    wall[packing] += w
                    cpu[packing] += c
                    tokens[packing] += t
                    decision = info if packing else decision
            assert tokens[False] == tokens[True], f"different batches: {tokens}"
            useful = tokens[True]
            print(f"{dataset}: {useful} useful tokens in {args.repeats * (args.steps - 1)} step(s) per mode; "
                  f"padded {useful / cpu[False]:.0f} tokens/CPU-s ({cpu[False]:.1f} s CPU, {wall[False]:.1f} s wall), "
                  f"packed {useful / cpu[True]:.0f} tokens/CPU-s ({cpu[True]:.1f} s CPU, {wall[True]:.1f} s wall): "
                  f"{cpu[False] / cpu[True]:.2f}x by CPU time, {wall[False] / wall[True]:.2f}x by wall time; "
                  f"last-step loss {losses[False]:.5f} padded, {losses[True]:.5f} packed; packing {decision}",
                  flush=True)

if __name__ == "__main__":
    main()
