"""Tidy CSV files written in buffered batches; continued without duplicated steps on `--resume`.

An empty cell means "frozen / not recorded" (`cell(None)`), never 0; a value that was measured but is not finite
(a diverged step) is written `nan` / `inf`, so it is never mistaken for "frozen".
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from lorasens.errors import UserError

# Flush on its own once this many rows wait, so that memory stays bounded between checkpoints.
MAX_BUFFERED_ROWS = 200_000


def cell(value) -> str:
    """CSV text of a value: floats in their shortest exact form (repr), None (frozen) as an empty cell, NaN as nan."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # nan, inf, -inf (float() reads them back)
    if isinstance(value, np.float32):
        # Measured float32 values: the shortest text that reads back to the same float32.
        return str(value)
    text = str(value)
    # Phase labels can hold commas (e.g. "lisa[1,3]"): quote them the way the csv module reads them back.
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


class BufferedCsv:
    """Rows are kept in memory and appended to the file by `flush()` (at checkpoints and at the end)."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path = path
        self.columns = columns
        self._rows: list[str] = []

    def start(self, resumed_step: int) -> None:
        """A fresh run writes the header; a resumed run keeps the rows up to `resumed_step` (step is column 1)."""
        header = ",".join(self.columns) + "\n"
        if not resumed_step or not self.path.exists():
            self.path.write_text(header)
            return
        with self.path.open(newline="") as fh:
            lines = fh.read().splitlines()
        kept = [line for line in lines[1:] if line and int(line.split(",", 1)[0]) <= resumed_step]
        self.path.write_text(header + "".join(line + "\n" for line in kept))

    def add(self, values) -> None:
        self.add_line(",".join(cell(v) for v in values))

    def add_line(self, line: str) -> None:
        """A row already formatted (callers that write many rows with a constant part format it once)."""
        self._rows.append(line)
        if len(self._rows) >= MAX_BUFFERED_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        with self.path.open("a") as fh:
            fh.write("\n".join(self._rows) + "\n")
        self._rows.clear()


def read_numeric_rows(path: Path, ints: tuple[str, ...], floats: tuple[str, ...]) -> list[dict]:
    """Rows with `ints` as int and `floats` as float (None for an empty cell = frozen); a missing column or a
    cell that is not a number is a `UserError` naming the file and line (the file may have been edited)."""
    rows = []
    for line, row in enumerate(read_rows(path), start=2):
        converted = dict(row)
        for column in (*ints, *floats):
            text = row.get(column)
            try:
                if text is None:
                    raise ValueError
                converted[column] = int(text) if column in ints else (None if text == "" else float(text))
            except ValueError:
                raise UserError(f"{path}:{line}: {column} is not a number ({text!r}); the file is corrupt") from None
        rows.append(converted)
    return rows


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))
