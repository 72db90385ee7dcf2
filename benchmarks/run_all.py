"""Run every benchmark in this folder, one after the other (they must not share the CPU), printing each report.

    make bench      # or: .venv/bin/python benchmarks/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_training_overhead.py",  # lorasens vs plain PEFT + Trainer (foundation)
    "bench_backward_truncation.py",  # last half of the layers vs all (phase schedules)
    "bench_grad_tracking.py",  # gradient tracking overhead (analysis)
    "bench_generation.py",  # batched vs one-at-a-time generation (evaluation)
    "bench_packing.py",  # padding-free vs padded batches, useful tokens/s (performance)
    "bench_ablation.py",  # cached + packed ablation vs whole-decoder passes (performance)
    "bench_first_order.py",  # first-order estimate: head at labelled positions vs every position, vs a step
    "bench_cpu_bf16.py",  # --precision bf16 on a CPU (autocast) vs fp32, training step time
]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
