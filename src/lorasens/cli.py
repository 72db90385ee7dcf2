"""The `lorasens` command line. Subcommands map to plain functions; bad input is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Sequence

from lorasens import signals
from lorasens.commands import (
    analyze,
    compare,
    evaluate,
    export,
    listing,
    report,
    score,
    sweep,
    train,
    validate,
)
from lorasens.errors import TrainingDiverged, UserError, is_disk_error

EXIT_USAGE = 2

# Each command module defines `add_parser(subparsers)` (which sets `func`), in the order `--help` lists them.
COMMAND_MODULES = (train, listing, analyze, evaluate, score, report, export, compare, sweep, validate)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line naming the problem and the valid choices; no abbreviations
    (`--max_step` is an error, not silently `--max_steps`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            valid = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{self.prog}: unknown command {choice.group(1)!r}{hint}; valid: {', '.join(valid)}")
        raise UserError(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            raise unknown_flag_error(self, extras[0], getattr(parsed, "_subparser", None) or self)
        return parsed


def unknown_flag_error(root: argparse.ArgumentParser, flag: str, parser: argparse.ArgumentParser) -> UserError:
    valid = sorted({opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")})
    close = difflib.get_close_matches(flag.split("=")[0], valid, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    kind = "flag" if flag.startswith("-") else "argument"
    return UserError(f"unknown {kind} {flag}{hint}; `{parser.prog} --help` lists the valid flags")


def build_parser() -> OneLineParser:
    from lorasens import __version__

    parser = OneLineParser(prog="lorasens", description="LoRA module sensitivity analysis")
    parser.add_argument("--version", action="version", version=f"lorasens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


# Library noise a user cannot act on: deprecation notices of the libraries' own internals, and bitsandbytes'
# note that an optional CPU kernel package is absent (4-bit works without it).
LIBRARY_MODULES = r"(transformers|torch|peft|datasets|accelerate|trl|bitsandbytes|huggingface_hub)(\.|$)"


def quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARY_MODULES)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(deprecated|will be removed).*")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[lorasens] %(message)s"))
    root = logging.getLogger("lorasens")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    # Imported when the command runs, not at start-up: transformers and datasets cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    if not sys.stderr.isatty():  # no redrawn bars ("Loading weights ...") in a log file or pipe
        transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def check_names(args) -> None:
    """Names that need no heavy import are checked before any: a typo'd preset fails at once, not after seconds."""
    if getattr(args, "preset", None):
        from lorasens.presets import get_preset

        get_preset(args.preset)


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


def release_process_group() -> None:
    """Under torchrun the Trainer's process group lives until the interpreter exits, and gloo's threads torn down
    during exit can abort a finished run ("terminate called without an active exception", exit -6). The command
    owns its process, so it closes the group when it is done (torch is only looked up, never imported, here)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        release_process_group()


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        check_names(args)
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
