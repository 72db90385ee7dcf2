"""`lorasens compare RUN_DIR... [--out DIR]`: a table and overlay plots of several runs, seeds aggregated."""

from __future__ import annotations



def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="Compare runs: settings, metrics (mean ± std over seeds), overlay plots.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories to compare.")
    p.add_argument("--out", default=None, help="Output folder (default: comparison/ beside the runs).")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: matplotlib and pandas cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.experiment.compare import compare_runs

    result = compare_runs(args.run_dirs, args.out)
    print((result.out_dir / "comparison.md").read_text())
    print(f"written: {', '.join(str(p) for p in result.files)}")
    return 0
