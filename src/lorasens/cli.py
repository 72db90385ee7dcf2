"""The `lorasens` command line. Subcommands map to plain functions; bad input is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Sequence

from lorasens import signals
from lorasens.commands import analyze, compare, evaluate, listing, report, score, sweep, train, validate
from lorasens.errors import TrainingDiverged, UserError, is_disk_error

EXIT_USAGE = 2

# Each command module defines `add_parser(subparsers)` (which sets `func`), in the order `--help` lists them.
COMMAND_MODULES = (train, listing, analyze, evaluate, score, report, compare, sweep, validate)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line naming the problem and the valid choices."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            raise unknown_flag_error(self, extras[0], getattr(parsed, "_subparser", None) or self)
        return parsed


def unknown_flag_error(root: argparse.ArgumentParser, flag: str, parser: argparse.ArgumentParser) -> UserError:
    valid = sorted({opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")})
    close = difflib.get_close_matches(flag.split("=")[0], valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    kind = "flag" if flag.startswith("-") else "argument"
    return UserError(f"unknown {kind} {flag}{hint}; valid flags: {' '.join(valid)}")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="lorasens", description="LoRA module sensitivity analysis")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[lorasens] %(message)s"))
    root = logging.getLogger("lorasens")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Imported when the command runs, not at start-up: transformers and datasets cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# What to do about a full or read-only disk, by command: only the flags that command has.
DISK_HINTS = {
    "train": "free space or choose a writable --output_dir (a run can continue from its last complete checkpoint "
             "with --resume)",
    "sweep": "free space or choose a writable --output_dir, then rerun the same command (complete runs are skipped)",
    "score": "free space or choose a writable --output file",
    "compare": "free space or choose a writable --out folder",
    "validate": "free space or choose a writable --out folder",
    None: "free space or make the folder writable",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        setup_logging()
        with signals.sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return TrainingDiverged.exit_code
    except KeyboardInterrupt as exc:
        print(signals.describe(exc), file=sys.stderr)
        return signals.exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - only disk errors become one line; anything else keeps its traceback
        if not is_disk_error(exc):
            raise
        filename = getattr(exc, "filename", None)
        where = f" writing {filename}" if filename else ""
        reason = getattr(exc, "strerror", None) or f"the disk is full or read-only ({str(exc).splitlines()[0][:120]})"
        print(f"error: {reason}{where}; {DISK_HINTS.get(command, DISK_HINTS[None])}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
