"""Reading and writing the run's JSON/JSONL files and user text files safely.

- Every JSON file lorasens writes is standard JSON: a non-finite number (NaN, inf) becomes `null`, and
  `allow_nan=False` makes a forgotten case a bug that shows, not a file other tools cannot read.
- Whole JSON files are written to a temporary name and renamed, so a kill or a full disk never leaves half a file.
- A file that cannot be read back is a `UserError` naming the file and the line: "corrupt" when it exists but does
  not parse, "not UTF-8" for undecodable bytes, never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lorasens.errors import UserError

logger = logging.getLogger(__name__)


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf; also numpy/torch scalars) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return json_ready(value.item())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Standard JSON text (null for a missing or non-finite number)."""
    return json.dumps(json_ready(value), allow_nan=False, **kwargs)


def write_json(path: Path, value: Any) -> None:
    """Write `value` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file beside it, then rename): a full disk or a kill leaves the old
    file or none, never a truncated one; the temporary file is removed when the write fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_csv_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Write `rows` as CSV with a header, atomically; a missing or non-finite number is an empty cell."""
    import csv

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if json_ready(row.get(k)) is None else row.get(k) for k in columns})
    os.replace(tmp, path)


def decode_utf8(data: bytes, path: Path) -> str:
    """UTF-8 text of a file's bytes (a leading BOM, as Excel writes it, is dropped); bad bytes name the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def read_text(path: Path) -> str:
    return decode_utf8(Path(path).read_bytes(), Path(path))


def read_json(path: Path, what: str = "file", *, tolerant: bool = False) -> Any:
    """A JSON file lorasens wrote: the one reader of every JSON file.

    Strict (default): missing -> "missing", unreadable -> "corrupt" (with the line), as `UserError`s.
    `tolerant=True` (plots, report, compare: readers that show what is there): None when the file is missing or
    unreadable; the caller says which (the report names a corrupt file corrupt)."""
    path = Path(path)
    if not path.is_file():
        if tolerant:
            return None
        raise UserError(f"{path}: {what} is missing")
    try:
        text = read_text(path)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: {what} is corrupt ({exc.msg}); the run was probably killed while "
                            "writing it") from None
    except UserError as exc:
        if not tolerant:
            raise
        logger.debug("%s (read as missing)", exc)
        return None


def read_jsonl(path: Path, torn_tail_ok: bool = False, *, tolerant: bool = False) -> list[dict]:
    """Records of a JSON-lines file lorasens wrote (absent file: no records).

    A torn last line (a kill mid-write: no final newline) is dropped with a warning when `torn_tail_ok`; any other
    bad line is a `UserError` naming the line. `tolerant=True` (plots, report: a log that may still be written):
    the records before the first bad line, silently."""
    path = Path(path)
    if not path.exists():
        return []
    text = read_text(path)
    lines = text.split("\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if tolerant:
                break  # a run killed (or still writing) mid-line; keep what was complete
            if torn_tail_ok and lineno == len(lines):  # the last line, without its newline
                logger.warning("%s:%d: dropped a torn last line (the run was killed while writing it)", path, lineno)
                break
            raise UserError(f"{path}:{lineno}: corrupt line ({exc.msg})") from None
        if not isinstance(record, dict):
            if tolerant:
                break
            raise UserError(f"{path}:{lineno}: corrupt line (not a JSON object)")
        records.append(record)
    return records
