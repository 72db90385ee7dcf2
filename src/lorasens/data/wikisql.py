"""WikiSQL (Zhong et al. 2017): a question about one table + its header -> a SQL query over that table.

Target format. The model writes a canonical, readable SQL built from the `sql` dict with the header's column names:
`SELECT COUNT(School) FROM table WHERE No. = 3` — aggregation `AGG(col)` or a bare column, the literal table name
`table`, conditions `col op value` joined by `AND` in the dataset's order, values unquoted. `parse_sql` reads it
back into a `LogicalForm` using the header (so column names with spaces, dots or brackets parse), and logical forms
compare exactly as WikiSQL's own evaluation compares queries (`lib/query.py` `Query.__eq__`): same select column,
same aggregation, the same *set* of conditions (order and repeats do not matter), values as `str(value).lower()`
compared literally ("2" is not "2.0", "a  b" is not "a b"). Values are written as `str(value)`, so the canonical
text of a gold query parses back to exactly the official values. See `lorasens.data.sql`.

Local files (official release): `{train,dev,test}.jsonl` ({phase, table_id, question, sql: {sel, agg, conds}}) and
`{split}.tables.jsonl` ({id, header, types, rows}). Splits map train->train, validation->dev, test->test.
When only `dev.jsonl` is present (the offline copy in ../shared has only dev, with `rows` null) the dev file is
split deterministically *by table* into train (80 %), validation (10 %) and test (10 %) parts — a table's
questions all land in one part (crc32 of the table id), as the official splits keep tables apart — and a
warning says so. Hub: `Salesforce/wikisql`, its parquet conversion (`refs/convert/parquet`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorasens.data.files import read_records, stable_bucket
from lorasens.data.hub import load_hub_split
from lorasens.data.registry import DatasetSpec, EvaluationSpec, Example, register
from lorasens.data.sql import AGGS, OPS, LogicalForm, Table, logical_form, parse_sql, to_sql  # noqa: F401 - re-exported
from lorasens.data.sql_metrics import wikisql_metrics
from lorasens.errors import UserError

logger = logging.getLogger(__name__)


def score_wikisql_rows(rows: list[dict]) -> dict:
    """Gold `sql` dicts and predicted `query` dicts are used as they are; text is parsed with the row's table."""
    missing = sum(r.get("table") is None for r in rows)
    if missing:
        logger.warning("WikiSQL scoring: %d of %d rows have no `table`: their SQL text is parsed without the header "
                       "(values holding ' and ' or column names holding ' = ' may mis-parse) and cannot be executed",
                       missing, len(rows))
    preds = [r["query"] if isinstance(r.get("query"), dict) else r["prediction"] for r in rows]
    golds = [r["sql"] if isinstance(r.get("sql"), dict) else r["references"] for r in rows]
    return wikisql_metrics(preds, golds, [r.get("table") for r in rows])

HUB_ID = "Salesforce/wikisql"
FILES = {"train": "train", "validation": "dev", "test": "test"}
# Parts of dev.jsonl when it is the only file: bucket (0-99, by table id) ranges per split.
DEV_ONLY_PARTS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
PROMPT = "Table columns: {columns}\nQuestion: {question}\nSQL:"


def segment_wikisql_rows(rows: list[dict]) -> dict:
    """Per-question logical-form accuracy, for a bootstrap over test questions (validate)."""
    from lorasens.metrics.segments import accuracy_segments

    correct = [score_wikisql_rows([row])["logical_form_accuracy"] == 1.0 for row in rows]
    return {"logical_form_accuracy": accuracy_segments(correct)}


def make_example(example_id: str, question: str, sql: dict, table: Table) -> Example:
    columns = " | ".join(table.header)
    target = to_sql(sql, table.header)
    meta = {"question": question, "columns": columns, "table_id": table.id, "table": table, "sql": sql}
    return Example(example_id, PROMPT.format(columns=columns, question=question), target, (target,), meta)


def _check_sql(path: Path, lineno: int, sql, header_len: int) -> None:
    ok = isinstance(sql, dict) and all(k in sql for k in ("sel", "agg", "conds"))
    if ok:
        ok = (0 <= int(sql["sel"]) < header_len and 0 <= int(sql["agg"]) < len(AGGS)
              and all(len(c) == 3 and 0 <= int(c[0]) < header_len and 0 <= int(c[1]) < len(OPS) for c in sql["conds"]))
    if not ok:
        raise UserError(f"{path}:{lineno}: field sql must be {{sel, agg, conds: [[col, op, value], ...]}} with "
                        f"indices inside the table header ({header_len} columns), agg < {len(AGGS)}, op < {len(OPS)}")


def read_tables(path: Path) -> dict[str, Table]:
    tables = {}
    for lineno, record in read_records(path, ("id", "header")):
        if not isinstance(record["header"], list) or not record["header"]:
            raise UserError(f"{path}:{lineno}: field header must be a non-empty list of column names")
        tables[str(record["id"])] = Table.from_dict(record)
    return tables


def read_split_file(path: Path, tables_path: Path, prefix: str) -> list[tuple[int, Example]]:
    """(table bucket, example) pairs of an official `*.jsonl` + `*.tables.jsonl` pair."""
    if not tables_path.exists():
        raise UserError(f"{tables_path}: file not found (WikiSQL needs {path.name} and {tables_path.name} side by side)")
    tables = read_tables(tables_path)
    out = []
    for lineno, record in read_records(path, ("table_id", "question", "sql")):
        table = tables.get(str(record["table_id"]))
        if table is None:
            raise UserError(f"{path}:{lineno}: table_id {record['table_id']!r} is not in {tables_path.name}")
        _check_sql(path, lineno, record["sql"], len(table.header))
        out.append((stable_bucket(table.id), make_example(f"{prefix}-{lineno}", str(record["question"]).strip(), record["sql"], table)))
    return out


def load(split: str, data_dir: Path | None, seed: int) -> list[Example]:
    if data_dir is None:
        return _load_hub(split)
    dev = data_dir / "dev.jsonl"
    if not (data_dir / "train.jsonl").exists() and dev.exists():
        part = DEV_ONLY_PARTS[split]
        logger.warning("WikiSQL: no train.jsonl in %s; the %s split is the table-disjoint part %s of dev.jsonl",
                       data_dir, split, _describe(part))
        return [ex for bucket, ex in read_split_file(dev, data_dir / "dev.tables.jsonl", "dev") if bucket in part]
    path = data_dir / f"{FILES[split]}.jsonl"
    if path.exists():
        return [ex for _, ex in read_split_file(path, data_dir / f"{FILES[split]}.tables.jsonl", FILES[split])]
    if split == "test" and dev.exists():
        logger.warning("WikiSQL: no test.jsonl in %s; evaluating on dev.jsonl instead", data_dir)
        return [ex for _, ex in read_split_file(dev, data_dir / "dev.tables.jsonl", "dev")]
    raise UserError(f"--data_dir {str(data_dir)!r} lacks {path.name} (WikiSQL needs the official train/dev/test .jsonl "
                    "and .tables.jsonl files, or at least dev.jsonl + dev.tables.jsonl)")


def _describe(part: range) -> str:
    return f"{len(part)} % (table-id buckets {part.start}-{part.stop - 1} of 100)"


def _load_hub(split: str) -> list[Example]:

    # The parquet conversion nests the table and spells conditions as parallel lists.
    ds = load_hub_split(HUB_ID, split, revision="refs/convert/parquet")
    examples = []
    for i, row in enumerate(ds):
        t, s = row["table"], row["sql"]
        table = Table(str(t["id"]), tuple(t["header"]), tuple(t.get("types") or ()),
                      tuple(tuple(r) for r in t["rows"]) if t.get("rows") is not None else None)
        c = s["conds"]
        sql = {"sel": s["sel"], "agg": s["agg"],
               "conds": [list(x) for x in zip(c["column_index"], c["operator_index"], c["condition"])]}
        examples.append(make_example(f"{split}-{i}", row["question"].strip(), sql, table))
    return examples


def _row_fields(example: Example) -> dict:
    """Predictions rows carry their table (the scorer parses with its header and executes on its rows) and the gold
    `sql` dict, which the official equality compares (no round trip through SQL text)."""
    return {"table": example.meta["table"].as_dict(), "sql": example.meta["sql"]}


SPEC = register(DatasetSpec("wikisql", "WikiSQL: question + table header -> SQL (logical-form, execution, exact string match)",
                            load, EvaluationSpec(score_wikisql_rows, row_fields=_row_fields,
                                                  segment_rows=segment_wikisql_rows), max_new_tokens=64))
