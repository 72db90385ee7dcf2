"""Training step time with `--precision bf16` on a CPU (bf16 autocast, fp32 weights) against fp32, through lorasens.

SmolLM2-135M, LoRA r=8 on all 7 projections, the quickstart's batches (synthetic data, batch 4, max_length 96,
packed), forward + backward. Both arms are `run_experiment` with the same seed (so the same batches), alternated
when --repeats > 1, at each of --threads; time is the sum of `step_time_s` in train_log.jsonl after the first step
(warm-up), the way a user's run measures itself. Needs a CPU with native bf16 (AVX512-BF16 or AMX): elsewhere
`--precision bf16` is refused. Prints the ratio and the last-step losses (they differ by bf16 rounding).

    .venv/bin/python benchmarks/bench_cpu_bf16.py [--steps 8] [--repeats 2] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

ARMS = ("fp32", "bf16")


def run(precision: str, steps: int, out: Path) -> tuple[float, float, int]:
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    cfg = build_config("quickstart", cli_overrides={
        "precision": precision, "max_steps": steps, "eval_steps": 0, "save_steps": 0, "evaluate": False,
        "ablation": False, "track_gradients": False, "track_importance": False, "track_update_magnitude": False,
        "output_dir": str(out), "experiment_name": precision, "overwrite": True})
    run_dir = run_experiment(cfg, after_training=()).run_dir  # training only
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return sum(r["step_time_s"] for r in log[1:]), log[-1]["loss"], sum(r["tokens"] for r in log[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = parser.parse_args()
    from lorasens.model.loading import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        print("this CPU has no native bf16 (AVX512-BF16 or AMX), where --precision bf16 is refused: nothing to measure")
        return
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("lorasens").setLevel(logging.WARNING)
    print(f"load: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            seconds, losses, tokens = dict.fromkeys(ARMS, 0.0), {}, {}
            for _ in range(args.repeats):
                for arm in ARMS:  # alternated
                    s, losses[arm], tokens[arm] = run(arm, args.steps, Path(tmp))
                    seconds[arm] += s
            assert tokens["fp32"] == tokens["bf16"], f"different batches: {tokens}"
            print(f"{threads} thread(s), {args.repeats} x {args.steps - 1} timed steps per arm: fp32 "
                  f"{seconds['fp32']:.1f} s, bf16 {seconds['bf16']:.1f} s: bf16 {seconds['fp32'] / seconds['bf16']:.2f}x "
                  f"fp32's speed; last-step loss fp32 {losses['fp32']:.5f}, bf16 {losses['bf16']:.5f}; "
                  f"load {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
