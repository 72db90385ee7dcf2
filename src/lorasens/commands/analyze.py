"""`lorasens analyze RUN_DIR`: recompute ablation, sensitivity.json and the recommended LoRA config of a finished run."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

# The settings of the run's config.json that may be changed for a re-analysis (same flag names as `train`).
OVERRIDABLE = ("budget_modules", "budget_unit", "ablation", "ablation_max_single", "eval_batch_size")


def add_parser(sub) -> None:
    from lorasens.config import SECTIONS

    p = sub.add_parser("analyze", help="Re-run the sensitivity analysis and recommendation on a finished run.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `lorasens train`.")
    help_of = {f.name: f.metadata.get("help", "") for cls in SECTIONS.values() for f in fields(cls)}
    help_of["eval_batch_size"] = "Batch size of the ablation's validation passes."
    for name in OVERRIDABLE:
        p.add_argument(f"--{name}", default=argparse.SUPPRESS, help=f"{help_of[name]} (Overrides the run's setting.)")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    from lorasens.analysis.post import analyze_run
    from lorasens.config import normalise_overrides
    from lorasens.errors import UserError

    overrides = normalise_overrides({n: getattr(args, n) for n in OVERRIDABLE if hasattr(args, n)}, "command line")
    if overrides.get("ablation_max_single", 0) < 0:
        raise UserError(f"--ablation_max_single must be >= 0, got {overrides['ablation_max_single']}")
    if overrides.get("eval_batch_size", 1) <= 0:
        raise UserError(f"--eval_batch_size must be > 0, got {overrides['eval_batch_size']}")
    if overrides.get("budget_modules") is not None and overrides["budget_modules"] <= 0:
        raise UserError(f"--budget_modules must be > 0 (a count >= 1 or a fraction < 1), got {overrides['budget_modules']}")
    result = analyze_run(args.run_dir, overrides)
    rec = result["recommendation"]
    print(f"top modules: {', '.join(result['sensitivity_top'])}")
    print(f"agreement (Spearman): {json.dumps(result['sensitivity_agreement'])}")
    print(f"recommended: LoRA on {rec['num_selected']} of {rec['num_modules']} modules -> "
          f"{args.run_dir}/{rec['file']}")
    return 0
