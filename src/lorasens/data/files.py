"""Reading local dataset and predictions files with errors that name the file and line.

A user's file is input, not code: a malformed line, a missing field or an empty file is a `UserError` saying
where (`path:line`) and what was expected, never a traceback from deep inside a loader.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from pathlib import Path

from lorasens.errors import UserError
from lorasens.safeio import read_text

# The csv module refuses fields over 131,072 characters by default; a long dialogue or document is valid input.
csv.field_size_limit(2**31 - 1)


def read_records(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a `.jsonl` file (one object a line) or a `.json` file (a list of objects).

    For `.json` the "line" is the 1-based item index. Blank lines in `.jsonl` are skipped.
    """
    if not path.exists():
        raise UserError(f"{path}: file not found")
    text = read_text(path)  # UTF-8 (a BOM is dropped); undecodable bytes are a UserError naming the line
    if not text.strip():
        raise UserError(f"{path}: file is empty; expected records with fields {', '.join(required)}")
    records: list[tuple[int, dict]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects with fields {', '.join(required)}")
        records = list(enumerate(data, start=1))
        where = "item"
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        where = "line"
    if not records:
        raise UserError(f"{path}: no records; expected fields {', '.join(required)}")
    for lineno, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: {where} is not a JSON object")
        missing = [name for name in required if name not in record]
        if missing:
            raise UserError(
                f"{path}:{lineno}: missing field(s) {', '.join(missing)}; required: {', '.join(required)}"
            )
    return records


def read_table_records(path: Path, required: tuple[str, ...], delimiter: str = ",") -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV (`,`) or TSV (`\\t`, MNLI/GLUE) file with a header row.

    UTF-8 with or without a BOM (Excel writes one); a row with too few or too many fields, an unbalanced quote, or
    undecodable bytes is a `UserError` naming the file and line. The line is the row's first line in the file.
    """
    if not path.exists():
        raise UserError(f"{path}: file not found")
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    # QUOTE_NONE for TSV: MNLI text holds unbalanced quotes; GLUE's own reader does the same.
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    try:
        header = next(reader, None)
        if not header:
            raise UserError(f"{path}: file is empty; expected a header row with {', '.join(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(f"{path}:1: missing column(s) {', '.join(missing)}; required: {', '.join(required)}")
        rows, start = [], reader.line_num + 1
        for fields in reader:
            if fields and len(fields) != len(header):
                raise UserError(f"{path}:{start}: wrong number of {kind} fields ({len(fields)}; the header has {len(header)})"
                                + ("; an unbalanced quote?" if len(fields) < len(header) and '"' in "".join(fields) else ""))
            if fields:
                rows.append((start, dict(zip(header, fields))))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(f"{path}:{start}: malformed {kind} row ({exc}; an unbalanced quote?)") from None
    if not rows:
        raise UserError(f"{path}: no rows after the header")
    return rows


def read_tsv_records(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a tab-separated file with a header row (MNLI/GLUE `.tsv`)."""
    return read_table_records(path, required, "\t")


def find_file(folder: Path, stems: tuple[str, ...], suffixes: tuple[str, ...]) -> Path | None:
    """The first existing `folder/stem+suffix`, trying stems in order, then suffixes."""
    for stem in stems:
        for suffix in suffixes:
            path = folder / f"{stem}{suffix}"
            if path.exists():
                return path
    return None


def stable_bucket(key: str, buckets: int = 100) -> int:
    """A bucket in [0, buckets) that depends only on `key` (crc32), the same on every machine and Python run."""
    return zlib.crc32(key.encode("utf-8")) % buckets
