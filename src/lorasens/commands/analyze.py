"""`lorasens analyze RUN_DIR`: recompute ablation, sensitivity.json and the recommended LoRA config of a finished run."""

from __future__ import annotations

import json

from lorasens.config import add_config_flags, config_overrides, fields_with


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="Re-run the sensitivity analysis and recommendation on a finished run.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `lorasens train`.")
    # The settings of the run's config.json that may be changed for a re-analysis (same flag names as `train`).
    add_config_flags(p, names=fields_with("reanalysable"), help_suffix=" (Overrides the run's setting.)")
    p.add_argument("--probe", metavar="PROBE_RUN_DIR", default=None,
                   help="Take the training-time measures (grad_norm, importance, update_magnitude) from this separate "
                        "static run of the same model instead (e.g. when RUN_DIR trained under a phase schedule).")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: torch, transformers and peft cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.analysis.post import analyze_run
    from lorasens.rundir.lock import hold_run_lock

    # Overrides are applied with the config's own checks (a bad value is a one-line error).
    with hold_run_lock(args.run_dir):  # one writer per run: not while a train/eval writes into it
        result = analyze_run(args.run_dir, config_overrides(args), probe=args.probe)
    rec = result["recommendation"]
    print(f"top modules: {', '.join(result['sensitivity_top'])}")
    print(f"agreement (Spearman): {json.dumps(result['sensitivity_agreement'])}")
    print(f"recommended: {rec['description']} -> {args.run_dir}/{rec['file']}")
    return 0
