"""The placement benchmark: lorasens' recommendation against PEFT's EVA, AdaLoRA, KappaTune, GoRA-style ranks and
controls, at equal LoRA parameters, each arm at its own learning rate, on one task (e2e or wikisql).

    python benchmarks/placement/run.py e2e        # probe run, then `lorasens validate` with every arm
    python benchmarks/placement/run.py wikisql
    python benchmarks/placement/run.py e2e --smoke   # minutes: tiny steps, a few arms (checks the pipeline)

Everything lands in docs/results/TASK/ (probe/ and validation/; adapters and checkpoints are git-ignored). Rerunning
the same command continues where it stopped: a killed probe resumes from its last checkpoint (or, killed after
training, redoes only its analysis), a finished probe is skipped, and `lorasens validate` skips every finished
training, so the benchmark can run in parts, across machines, from the committed files.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LORASENS_SHARED", ROOT.parent / "shared"))

TASKS = {
    # E2E: trainset.csv / devset.csv (devset is the test split: 547 MRs with every reference). 160 tokens fit every
    # E2E example with SmolLM2's tokenizer (the longest of 2,000 is 112).
    "e2e": {"data": "e2e", "max_length": 160, "seeds": "1,2,3", "extra_seeds": "4,5:recommended,eva,adalora,qv,random"},
    # WikiSQL dev.jsonl split by table id: train 80%, validation 10%, test 10% (about 840 questions). The longest of
    # 2,000 training examples is 187 tokens.
    "wikisql": {"data": "wikisql", "max_length": 288, "seeds": "1", "extra_seeds": "2,3:recommended,eva,adalora,qv,random"},
}
PROBE = {"model": "smollm2-135m", "target": "both", "r": "8", "lora_alpha": "16", "batch_size": "8",
         "max_steps": "100", "lr": "1e-3", "eval_steps": "25", "budget": "0.25", "budget_unit": "params",
         # The committed probes recommend modules at rank 8; the `ranks` arm is lorasens' default recommendation.
         "allocate": "modules",
         "ablation_max_single": "32", "evaluate": "false",
         # A checkpoint every 25 steps lets a probe killed with the session resume (checkpoints change no number).
         "save_steps": "25"}
VALIDATE = {"max_steps": "150", "sweep_steps": "75", "lr_grid": "3e-4,1e-3,3e-3", "random_sets": "6"}
SMOKE_PROBE = {"max_steps": "4", "eval_steps": "2", "ablation_max_single": "2", "analysis_samples": "16",
               "eval_samples": "16", "batch_size": "4", "save_steps": "2"}
SMOKE_VALIDATE = {"max_steps": "6", "sweep_steps": "5", "lr_grid": "1e-3,3e-3", "random_sets": "2",
                  "test_samples": "8", "arms": "eva,adalora,qv,random", "seeds": "1", "extra_seeds": "2:recommended"}
IGNORED = "final_model/\ncheckpoints/\n*.safetensors\n"


def run_child(command: list[str]) -> None:
    """Run one step and pass SIGTERM on to it: the steps are long trainings, and a `kill` aimed at this script
    (a session ending, a scheduler stopping it) must stop them too, not leave them writing into the results folder."""
    child = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise SystemExit(code if code > 0 else 128 - code)


def flags(options: dict[str, str]) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", v)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--smoke", action="store_true", help="A few steps and arms, into benchmarks/placement/work/.")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    data_dir = SHARED / "data" / task["data"]
    if not data_dir.is_dir():
        print(f"error: {data_dir} not found (the benchmark reads the real data from ../shared/data)", file=sys.stderr)
        return 2
    out = (ROOT / "benchmarks" / "placement" / "work" / args.task) if args.smoke else (ROOT / "docs" / "results" / args.task)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text(IGNORED)
    python = [sys.executable, "-m", "lorasens"]
    probe = {**PROBE, "dataset": task["data"], "data_dir": str(data_dir), "max_length": str(task["max_length"]),
             **(SMOKE_PROBE if args.smoke else {})}
    probe_dir = out / "probe"
    if not (probe_dir / "summary.json").exists():  # summary.json is written last
        if any(probe_dir.glob("checkpoints/checkpoint-*")):
            run_child([*python, "train", "--config", str(probe_dir / "config.json"), "--resume"])
        else:
            run_child([*python, "train", *flags(probe), "--output_dir", str(out), "--experiment_name", "probe",
                       "--overwrite"])
    validate = {**VALIDATE, "seeds": task["seeds"], "extra_seeds": task["extra_seeds"],
                **(SMOKE_VALIDATE if args.smoke else {})}
    run_child([*python, "validate", str(out / "probe"), *flags(validate), "--out", str(out / "validation")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
