"""Print the configuration reference (markdown) from the config dataclasses, for docs/GUIDE.md.

    .venv/bin/python scripts/config_table.py
"""

from dataclasses import MISSING, fields

from lorasens.config import SECTIONS


def main() -> None:
    for section, cls in SECTIONS.items():
        print(f"\n**{section}**\n\n| flag / key | default | meaning |\n|---|---|---|")
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            print(f"| `--{f.name}` | `{default}` | {f.metadata.get('help', '')} |")


if __name__ == "__main__":
    main()
