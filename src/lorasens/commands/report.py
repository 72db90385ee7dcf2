"""`lorasens report RUN_DIR...`: redraw a finished (or unfinished) run's plots and its report.html from its files."""

from __future__ import annotations



def add_parser(sub) -> None:
    p = sub.add_parser("report", help="Redraw the plots and report.html of run directories from their files.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directory (holds config.json).")
    p.add_argument("--keep_plots", action="store_true",
                   help="Embed the PNGs already in the run directory; draw only the missing ones.")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: matplotlib and pandas cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.presentation.report import write_report

    for run_dir in args.run_dirs:
        result = write_report(run_dir, redraw=not args.keep_plots)
        print(f"{result.path}: {len(result.plots)} plot(s)")
        for line in result.missing:
            print(f"  missing: {line}")
    return 0
