"""`{dataset}_predictions.jsonl` rows (id, prompt, prediction, references, + dataset extras) and their scores.

`score_rows` is the one place predictions become metrics: `lorasens eval`, evaluation after training and
`lorasens score` (predictions made anywhere) all call it, so the same file always gives the same numbers.
Extras: WikiSQL rows carry `table` ({id, header, types, rows}) for parsing and execution; MNLI rows carry
`subset` (matched / mismatched / ...) and `ll_prediction` (the label with the highest log-likelihood).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lorasens.data.files import read_records
from lorasens.data.registry import Example, get_dataset_spec, group_by_prompt
from lorasens.errors import UserError
from lorasens.evaluation.metrics import e2e_metrics, mnli_metrics, samsum_metrics
from lorasens.evaluation.wikisql import wikisql_metrics

logger = logging.getLogger(__name__)

REQUIRED = ("id", "prompt", "prediction", "references")


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a predictions file; missing fields, wrong types, malformed lines or an empty file are `UserError`s."""
    path = Path(path)
    rows = []
    for lineno, row in read_records(path, REQUIRED):
        refs = row["references"]
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"{path}:{lineno}: references must be a non-empty list of strings")
        if not isinstance(row["prediction"], str):
            raise UserError(f"{path}:{lineno}: prediction must be a string")
        rows.append({**row, "references": refs})
    return rows


def group_e2e_rows(rows: list[dict]) -> list[dict]:
    """One row per distinct prompt (MR) with the union of its references, as the E2E scripts score."""
    examples = [Example(str(r["id"]), r["prompt"], r["prediction"], tuple(r["references"])) for r in rows]
    grouped = group_by_prompt(examples)
    if len(grouped) < len(rows):
        logger.info("E2E scoring: %d rows grouped into %d distinct MRs (first prediction per MR)", len(rows), len(grouped))
    return [{"id": ex.id, "prompt": ex.prompt, "prediction": ex.target, "references": list(ex.references)} for ex in grouped]


def score_rows(dataset: str, rows: list[dict]) -> dict:
    """The dataset's metrics for prediction rows (its registry entry names the scorer)."""
    spec = get_dataset_spec(dataset)
    if not rows:
        raise UserError(f"no predictions to score for {dataset}")
    return spec.evaluation.score_rows(rows)


def _columns(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return [r["prediction"] for r in rows], [r["references"] for r in rows]


def score_e2e_rows(rows: list[dict]) -> dict:
    """E2E (and the E2E-shaped synthetic set): one prediction per distinct MR against all of its references."""
    return e2e_metrics(*_columns(group_e2e_rows(rows)))


def score_samsum_rows(rows: list[dict]) -> dict:
    return samsum_metrics(*_columns(rows))


def score_wikisql_rows(rows: list[dict]) -> dict:
    tables = [r.get("table") for r in rows]
    if any(t is None for t in tables):
        logger.warning("WikiSQL scoring without a `table` per row: SQL is parsed without the header (column names "
                       "holding ' = ', ' > ' or ' AND ' may mis-parse) and execution accuracy is unavailable")
        tables = None
    return wikisql_metrics(*_columns(rows), tables)


def score_mnli_rows(rows: list[dict]) -> dict:
    """Per subset (matched / mismatched / ...): label log-likelihood accuracy and generated-label accuracy."""
    metrics: dict = {}
    subsets: dict[str, list[dict]] = {}
    for row in rows:
        subsets.setdefault(str(row.get("subset", "all")), []).append(row)
    for name, part in subsets.items():
        refs = [r["references"] for r in part]
        if all("ll_prediction" in r for r in part):
            metrics[f"accuracy_{name}"] = mnli_metrics([r["ll_prediction"] for r in part], refs)["accuracy"]
        metrics[f"generated_accuracy_{name}"] = mnli_metrics([r["prediction"] for r in part], refs)["accuracy"]
        metrics[f"num_{name}"] = len(part)
    return metrics
