"""Backward truncation: step time when only the last half of the layers trains vs when all layers train.

SmolLM2-135M (30 layers, offline), synthetic data, batch 8 x 64 tokens, LoRA r=8 on attention + MLP, fp32 on CPU.
One run, one model, one data stream: the phase schedule alternates `both` (all layers train) and
`both@50-100%` (layers 15-29 train, 0-14 frozen) every `--steps_per_phase` steps, so machine noise hits both
settings alike. With the early layers frozen autograd stops at layer 15: no input gradients through layers 0-14
(and, with checkpointing, no recompute of them). The first pair of phases is warm-up and left out.

Figures: the ratio of median step times, in wall time and in process CPU time. On a shared machine (other jobs
competing for the cores) wall time is noise-dominated; with one compute thread (`--threads 1`, the default) CPU
time measures the work done by the step itself. Target: <= 0.8x. From the compute alone (the forward pass and
the LM head's backward are not saved) expect about 0.8x without and 0.7x with activation checkpointing.

    .venv/bin/python benchmarks/bench_backward_truncation.py [--pairs 8] [--steps_per_phase 1] [--gradient_checkpointing]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

TARGET = 0.8
ALL, LATE = "both", "both@50-100%"


class WallAndCpuTimer(TrainerCallback):
    """Wall and process CPU time between consecutive step starts (the last step ends at train end)."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_train_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self) -> list[tuple[float, float]]:
        return [(w1 - w0, c1 - c0) for (w0, c0), (w1, c1) in zip(self.marks[:-1], self.marks[1:])]


def run(steps_per_phase: int, pairs: int, batch: int, max_length: int, checkpointing: bool, out: Path):
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    phases = [ALL, LATE] * pairs
    ends = [steps_per_phase * (i + 1) for i in range(len(phases) - 1)]
    cfg = build_config(cli_overrides={
        "model": "smollm2-135m", "dataset": "synthetic", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "batch_size": batch, "max_steps": steps_per_phase * len(phases), "max_length": max_length, "lr": 2e-4,
        "lr_scheduler": "constant", "train_samples": 600, "eval_steps": 0, "save_steps": 0, "evaluate": False,
        "ablation": False, "track_gradients": False, "track_importance": False, "track_update_magnitude": False,
        "gradient_checkpointing": checkpointing, "phase_strategy": "->".join(phases),
        "phase_ends": ",".join(map(str, ends)), "output_dir": str(out), "experiment_name": "bench", "overwrite": True,
        "seed": 0,
    })
    timer = WallAndCpuTimer()
    run_experiment(cfg, extra_callbacks=[timer])
    by_setting: dict[str, list[tuple[float, float]]] = {ALL: [], LATE: []}
    for step, times in enumerate(timer.steps()):
        if step >= 2 * steps_per_phase:  # the first (all, last-half) pair is warm-up
            by_setting[phases[step // steps_per_phase]].append(times)
    transitions = json.loads((out / "bench" / "phases.json").read_text())["transitions"]
    trainable = {t["label"]: t["trainable_params"] for t in transitions}
    return by_setting, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="(all layers, last half) phase pairs; the first is warm-up")
    parser.add_argument("--steps_per_phase", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (1: CPU time = step work)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        by_setting, trainable = run(args.steps_per_phase, args.pairs, args.batch, args.max_length,
                                    args.gradient_checkpointing, Path(tmp))
    mode = "with" if args.gradient_checkpointing else "without"
    print(f"SmolLM2-135M, CPU ({args.threads} thread), batch {args.batch} x {args.max_length} tokens, {mode} "
          f"activation checkpointing, {len(by_setting[ALL])} + {len(by_setting[LATE])} interleaved steps")
    medians = {}
    for name, label in ((ALL, "all 30 layers train"), (LATE, "layers 15-29 train")):
        wall = [w for w, _ in by_setting[name]]
        cpu = [c for _, c in by_setting[name]]
        medians[name] = (statistics.median(wall), statistics.median(cpu))
        print(f"  {label:20s} {trainable[name]:>9,d} trainable params   median step: wall {medians[name][0]:.3f} s "
              f"(min {min(wall):.3f}), CPU {medians[name][1]:.3f} s (min {min(cpu):.3f})")
    wall_ratio = medians[LATE][0] / medians[ALL][0]
    cpu_ratio = medians[LATE][1] / medians[ALL][1]
    print(f"  ratio last-half / all: CPU time {cpu_ratio:.2f}x ({'meets' if cpu_ratio <= TARGET else 'MISSES'} the "
          f"target <= {TARGET}x), wall time {wall_ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
