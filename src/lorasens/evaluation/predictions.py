"""`{dataset}_predictions.jsonl` rows (id, prompt, prediction, references, + dataset extras) and their scores.

`score_rows` is the one place predictions become metrics: `lorasens eval`, evaluation after training and
`lorasens score` (predictions made anywhere) all call it, so the same file always gives the same numbers.
Extras: WikiSQL rows carry `table` ({id, header, types, rows}) for parsing and execution and `sql` (the gold
query dict the official equality compares); MNLI rows carry
`subset` (matched / mismatched / ...) and `ll_prediction` (the label with the highest log-likelihood).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorasens.data.files import read_records
from lorasens.data.registry import get_dataset_spec
from lorasens.errors import UserError
from lorasens.safeio import dumps

logger = logging.getLogger(__name__)

REQUIRED = ("id", "prompt", "prediction", "references")


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a predictions file; missing fields, wrong types, malformed lines or an empty file are `UserError`s.

    Integer predictions and references (MNLI's GLUE label ids) are read as their text. A WikiSQL row in the
    official format may give `sql` (the gold {sel, agg, conds}) instead of `references` and `query` (the predicted
    one) instead of `prediction`.
    """
    path = Path(path)
    rows = []
    for lineno, row in read_records(path, ("id", "prompt")):
        if "references" not in row and isinstance(row.get("sql"), dict):
            row = {**row, "references": []}
        if "prediction" not in row and isinstance(row.get("query"), dict):
            row = {**row, "prediction": ""}
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise UserError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
        refs = row["references"]
        if isinstance(refs, (str, int)):
            refs = [refs]
        if isinstance(refs, list):
            refs = [str(r) if isinstance(r, int) and not isinstance(r, bool) else r for r in refs]
        if not isinstance(refs, list) or not (refs or "sql" in row) or not all(isinstance(r, str) for r in refs):
            raise UserError(f"{path}:{lineno}: references must be a non-empty list of strings")
        prediction = row["prediction"]
        if isinstance(prediction, int) and not isinstance(prediction, bool):
            prediction = str(prediction)
        if not isinstance(prediction, str):
            raise UserError(f"{path}:{lineno}: prediction must be a string")
        if row.get("table") is not None:
            row = {**row, "table": _checked_table(row["table"], f"{path}:{lineno}", str(row["id"]))}
        rows.append({**row, "prediction": prediction, "references": refs})
    return rows


# Execution runs each query on an in-memory copy of its table: a bound on memory and time per row. WikiSQL tables
# hold tens of rows (the largest few hundred).
MAX_TABLE_ROWS = 100_000


def _checked_table(table, where: str, row_id: str) -> dict:
    """A predictions row's `table` {id, header, types, rows} checked for shape; rows beyond MAX_TABLE_ROWS are cut
    (with a warning). Repeated column names are allowed (a few WikiSQL tables have them; the database renames)."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: table must be an object {{id, header, types, rows}}, got {type(table).__name__}")
    header, types, rows = table.get("header"), table.get("types") or [], table.get("rows")
    if not isinstance(header, list) or not header or not all(isinstance(h, str) for h in header):
        raise UserError(f"{where}: table.header must be a non-empty list of column names")
    if not isinstance(types, list) or (types and len(types) != len(header)):
        raise UserError(f"{where}: table.types must be a list with one type per column ({len(header)})")
    if rows is not None:
        if not isinstance(rows, list):
            raise UserError(f"{where}: table.rows must be a list of rows (lists of {len(header)} cells)")
        for i, cells in enumerate(rows):
            if not isinstance(cells, list) or len(cells) != len(header):
                raise UserError(f"{where}: table.rows[{i}] must be a list of {len(header)} cells (one per column)")
        if len(rows) > MAX_TABLE_ROWS:
            logger.warning("%s: table has %d rows; execution uses the first %d", where, len(rows), MAX_TABLE_ROWS)
            rows = rows[:MAX_TABLE_ROWS]
    return {**table, "id": str(table.get("id", row_id)), "header": header, "types": types, "rows": rows}


def score_rows(dataset: str, rows: list[dict], options=None) -> dict:
    """The dataset's metrics for prediction rows (its registry entry names the scorer). `options`: the run's
    `DataConfig`, which a custom dataset reads its `--metrics` from."""
    spec = get_dataset_spec(dataset, options)
    if not rows:
        raise UserError(f"no predictions to score for {dataset}")
    return spec.evaluation.score_rows(rows)
