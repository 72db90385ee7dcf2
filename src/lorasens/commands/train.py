"""`lorasens train`: run one experiment (also `python run_experiment.py`)."""

from __future__ import annotations

import json
import time

from lorasens.config import add_config_flags, build_config, config_overrides
from lorasens.rundir.files import FINAL_MODEL


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="Fine-tune with LoRA, track, evaluate and analyse one experiment.")
    add_config_flags(p)
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: torch, transformers and peft cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.run import device_summary, run_experiment

    cfg = build_config(args.preset, args.config, config_overrides(args))
    print(f"lorasens: {cfg.experiment_name} | model {cfg.model.model} | dataset {cfg.data.dataset} | "
          f"target {cfg.lora.target} | strategy {cfg.schedule.phase_strategy or 'static'} | {device_summary()}")
    started = time.time()
    result = run_experiment(cfg)
    if result.summary:
        print_summary(result.run_dir, result.summary, time.time() - started)
    return 0


def print_summary(run_dir, summary: dict, wall: float) -> None:
    def fmt(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        "",
        "=" * 72,
        f"Run finished in {wall:.1f} s: {run_dir}",
        f"  steps {summary['steps']}, final train loss {fmt(summary['final_train_loss'])}, "
        f"final validation loss {fmt(summary['final_eval_loss'])}",
        f"  adapter ({summary['final_model_from']}): {run_dir / FINAL_MODEL}",
    ]
    for key in ("evaluation", "recommendation"):
        if key in summary:
            lines.append(f"  {key}: {json.dumps(summary[key])[:200]}")
    outputs = sorted(p.name for p in run_dir.iterdir())
    lines.append(f"  files: {', '.join(outputs)}")
    lines.append("=" * 72)
    print("\n".join(lines))
