"""`lorasens train`: run one experiment (also `python run_experiment.py`)."""

from __future__ import annotations

import time

from lorasens.config import add_config_flags, build_config, config_overrides
from lorasens.rundir.files import FINAL_MODEL, RECOMMENDED_CONFIG, REPORT_FILE


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="Fine-tune with LoRA, track, evaluate and analyse one experiment.")
    add_config_flags(p)
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: torch, transformers and peft cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.experiment.run import device_summary, run_experiment

    overrides = config_overrides(args)
    preset = args.preset
    if preset is None and args.config is None and not {"model", "dataset", "data_dir", "data_files"} & set(overrides):
        # No model and no data named: the offline quickstart, not a Hub model and dataset that need a network.
        preset = "quickstart"
        print("lorasens: no --preset, --model or --dataset given: running the offline quickstart preset")
    cfg = build_config(preset, args.config, overrides)
    print(f"lorasens: {cfg.experiment_name} | model {cfg.model.model} | dataset {cfg.data.dataset} | "
          f"target {cfg.lora.target} | strategy {cfg.schedule.phase_strategy or 'static'} | {device_summary()}")
    started = time.time()
    result = run_experiment(cfg)
    if result.summary:
        print_summary(result.run_dir, result.summary, time.time() - started)
    return 0


def print_summary(run_dir, summary: dict, wall: float) -> None:
    from lorasens.presentation.answer import build_answer

    losses = [f"{label} {summary[key]:.4g}" for key, label in (
        ("final_train_loss", "final train loss"), ("final_eval_loss", "final validation loss"))
        if isinstance(summary.get(key), (int, float))]
    lines = [
        "",
        "=" * 72,
        f"Run finished in {wall:.1f} s: {run_dir}",
        f"  steps {summary['steps']}" + "".join(f", {x}" for x in losses),
        f"  adapter ({summary['final_model_from']}): {run_dir / FINAL_MODEL}",
    ]
    if isinstance(summary.get("evaluation"), dict):
        lines.append("  evaluation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in summary["evaluation"].items()))
    recommendation = summary.get("recommendation")
    if isinstance(recommendation, dict):
        ranks = recommendation.get("ranks") or {}
        modules = [f"{m} r{ranks[m]}" if m in ranks else m for m in recommendation.get("modules") or []]
        lines.append(f"  recommendation ({recommendation.get('file', RECOMMENDED_CONFIG)}): "
                     f"{recommendation.get('num_selected')} of {recommendation.get('num_modules')} modules"
                     f"{' (each at its rank)' if ranks else ''}: {', '.join(modules)}")
    answer = build_answer(run_dir).lines()
    if answer:
        lines.append("  answer:")
        lines += [f"    {line}" for line in answer]
    lines.append(f"  report: {run_dir / REPORT_FILE}")
    lines.append("=" * 72)
    print("\n".join(lines))
