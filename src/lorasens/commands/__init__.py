"""CLI subcommands: one module each, with `add_parser(subparsers)`; listed in `lorasens.cli.COMMAND_MODULES`."""
