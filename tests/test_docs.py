"""The guide documents every config field and every CLI command (keeps docs/GUIDE.md current)."""

from pathlib import Path

from lorasens.cli import build_parser
from lorasens.config import field_index

GUIDE = (Path(__file__).resolve().parents[1] / "docs" / "GUIDE.md").read_text()


def test_guide_lists_every_config_field():
    missing = [name for name in field_index() if f"`--{name}`" not in GUIDE]
    assert missing == []


def test_guide_mentions_every_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [name for name in commands if f"lorasens {name}" not in GUIDE]
    assert missing == []
