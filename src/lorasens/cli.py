"""The `lorasens` command line. Subcommands map to plain functions; bad input is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import get_args, get_origin, Literal

from lorasens.errors import UserError

EXIT_USAGE = 2

# Each command module defines `add_parser(subparsers)` (which sets `func`) — one line per module here.
COMMAND_MODULES = [
    "lorasens.commands.train",
    "lorasens.commands.listing",
    "lorasens.commands.analyze",
    "lorasens.commands.evaluate",
    "lorasens.commands.score",
    "lorasens.commands.report",
    "lorasens.commands.compare",
    "lorasens.commands.sweep",
]


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
        importlib.import_module(module).add_parser(sub)
    return parser


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (same name), defaulting to 'not given' so presets and files can supply it."""
    from lorasens.config import SECTIONS, field_type
    from dataclasses import fields

    parser.add_argument("--preset", default=None, help="Named preset (see `lorasens presets`).")
    parser.add_argument("--config", default=None, help="YAML or JSON config file (preset < file < flags).")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in fields(cls):
            typ = field_type(section, f.name)
            base = next((a for a in get_args(typ) if a is not type(None)), typ) if type(None) in get_args(typ) else typ
            kwargs: dict = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
            if base is bool:
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            elif get_origin(base) is Literal:
                kwargs.update(metavar="{" + ",".join(get_args(base)) + "}")
            group.add_argument(f"--{f.name}", **kwargs)


def config_overrides(args: argparse.Namespace) -> dict:
    from lorasens.config import field_index

    return {name: getattr(args, name) for name in field_index() if hasattr(args, name)}


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[lorasens] %(message)s"))
    root = logging.getLogger("lorasens")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers
        import datasets

        transformers.logging.set_verbosity_warning()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        setup_logging()
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; files already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
