"""`lorasens sweep`: run a grid of experiments as subprocesses (resumable), then compare them."""

from __future__ import annotations

import shlex

from lorasens.config import add_config_flags, config_overrides
from lorasens.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="Run strategies x targets x seeds (skipping complete runs), then write the comparison.",
        description="Any train flag (--max_steps, --model, --dataset, --output_dir, ...) applies to every run.",
    )
    p.add_argument("--strategies", default=None,
                   help="Comma list of phase strategies; 'static' = no schedule (e.g. static,both->mlp->attn).")
    p.add_argument("--targets", default=None, help="Comma list of LoRA targets (attn,mlp,both).")
    p.add_argument("--seeds", default=None, help="Comma list of seeds (1,2,3); runs differing only by seed are aggregated.")
    p.add_argument("--jobs", type=int, default=1, help="Runs at once (each a `lorasens train` subprocess).")
    p.add_argument("--sweep_name", default=None, help="Prefix of the run names (default: the preset or dataset).")
    p.add_argument("--compare_out", default=None, help="Comparison folder (default: OUTPUT_DIR/NAME_comparison).")
    p.add_argument("--dry_run", action="store_true", help="Print the runs and their status; run nothing.")
    add_config_flags(p)
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: torch, transformers and peft cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.experiment.sweep import plan_sweep, run_sweep, split_list, split_strategies, train_command

    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    overrides = config_overrides(args)
    runs = plan_sweep(args.preset, args.config, overrides, split_strategies(args.strategies),
                      split_list(args.targets, "targets"), split_list(args.seeds, "seeds"), args.sweep_name)
    for r in runs:
        print(f"{r.status():10s} {r.run_dir}")
    if args.dry_run:
        for r in runs:
            if r.status() != "complete":
                print(shlex.join(train_command(r, args.preset, args.config, overrides, r.status() == "incomplete")))
        return 0
    result = run_sweep(runs, args.preset, args.config, overrides, args.jobs, args.compare_out)
    for name, outcome in result.outcome.items():
        print(f"{name}: {outcome}")
    if result.comparison_dir:
        print(f"comparison: {result.comparison_dir / 'comparison.html'}")
    if result.failed:
        print(f"{len(result.failed)} run(s) failed; logs in {runs[0].run_dir.parent / (runs[0].sweep + '_sweep_logs')}; "
              "rerun the same command to retry them")
        return 1
    return 0
