"""`lorasens export RUN --format peft|axolotl|llamafactory`: the recommendation in another tool's config syntax."""

from __future__ import annotations

from lorasens.presentation.export import FORMATS, export


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="Write a run's recommended LoRA placement as a PEFT, axolotl or LLaMA-Factory "
                                      "config.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="Run directory (holds recommended_lora_config.json).")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="Target tool's config syntax.")
    p.add_argument("--output", default=None, help="File to write (default: RUN_DIR/" + ", RUN_DIR/".join(
        FORMATS.values()).replace("%", "%%") + " by format).")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    print(export(args.run_dir, args.format, args.output))
    return 0
