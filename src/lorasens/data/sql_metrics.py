"""WikiSQL scoring: logical-form accuracy (the official `Query` equality), execution accuracy in a sandboxed
sqlite, and an exact string match of the SQL.

Model-generated SQL is untrusted input. A prediction that parses as the canonical form is executed as a query
*built* from its logical form (quoted identifiers, values bound as parameters), so a value like `3; DROP TABLE x`
is just a string. Anything else is executed as written, but only inside a sandbox: an in-memory database that
holds nothing but the one table, an authorizer that allows SELECT, reading that table and a short list of
functions (no PRAGMA, ATTACH, DROP, INSERT, recursive CTE, ...), one statement only (sqlite3 refuses several),
results capped at `MAX_ROWS`, and a wall-clock limit per query enforced by a progress handler. A refused, failing
or stopped query scores wrong.

Execution accuracy needs the table rows. When no scored example has them (the offline WikiSQL copy has
`rows: null`) it is reported as unavailable — `None`, with the reason in `execution_accuracy_unavailable` — never
as 0; when only some have rows it is computed over those, and `execution_examples` says how many.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import time
from collections.abc import Sequence

from lorasens.data.sql import AGGS, OPS, LogicalForm, Table, logical_form, parse_sql, to_sql

logger = logging.getLogger(__name__)

TIME_LIMIT_S = 2.0  # per query; WikiSQL queries on tables of tens of rows take microseconds
MAX_ROWS = 10_000
TABLE_NAME = "table"
# Functions a WikiSQL-style query may call; everything else (randomblob, load_extension, ...) is refused.
ALLOWED_FUNCTIONS = frozenset({"count", "max", "min", "sum", "avg", "total", "lower", "upper", "abs", "length",
                               "round", "trim", "substr", "coalesce", "ifnull", "like", "cast"})
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def column_names(header: Sequence[str]) -> list[str]:
    """sqlite column names: the header, with repeats made unique (a few WikiSQL tables repeat a name)."""
    seen: dict[str, int] = {}
    out = []
    for name in header:
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        out.append(name if seen[key] == 1 else f"{name} ({seen[key]})")
    return out


def _is_real(table: Table, i: int) -> bool:
    return i < len(table.types) and str(table.types[i]).lower() == "real"


def _to_number(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    match = _NUMBER.search(str(value).replace(",", ""))
    return float(match.group(0)) if match else None


def build_database(table: Table) -> sqlite3.Connection:
    """An in-memory database holding only `table`, locked down for untrusted SELECTs."""
    if table.rows is None:
        raise ValueError(f"table {table.id} has no rows")
    conn = sqlite3.connect(":memory:")
    names = column_names(table.header)
    columns = ", ".join(f"{_quote(n)} {'REAL' if _is_real(table, i) else 'TEXT'}" for i, n in enumerate(names))
    conn.execute(f"CREATE TABLE {_quote(TABLE_NAME)} ({columns})")
    rows = [[_to_number(v) if _is_real(table, i) else (None if v is None else str(v)) for i, v in enumerate(row)]
            for row in table.rows]
    conn.executemany(f"INSERT INTO {_quote(TABLE_NAME)} VALUES ({', '.join('?' * len(names))})", rows)
    conn.commit()
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)  # no gigabyte strings or blobs
    conn.set_authorizer(_authorizer)
    return conn


def _authorizer(action: int, arg1, arg2, db_name, trigger) -> int:
    if action == sqlite3.SQLITE_SELECT:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_READ and arg1 == TABLE_NAME:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in ALLOWED_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def execute(conn: sqlite3.Connection, sql: str, params: Sequence = (), time_limit_s: float = TIME_LIMIT_S) -> list[tuple] | None:
    """Rows of one untrusted query, or None when it is refused, fails or runs past `time_limit_s`."""
    deadline = time.monotonic() + time_limit_s
    # Called every 1000 sqlite VM instructions; a non-zero return interrupts the query.
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    try:
        cursor = conn.execute(sql, tuple(params))
        return cursor.fetchmany(MAX_ROWS)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as exc:
        logger.debug("query refused or failed (%s): %.200s", exc, sql)
        return None
    finally:
        conn.set_progress_handler(None, 0)


def build_query(lf: LogicalForm, table: Table) -> tuple[str, list]:
    """Executable SQL for a header-indexed logical form: quoted names, values as bound parameters."""
    names = column_names(table.header)
    column = _quote(names[lf.sel])
    agg = AGGS[lf.agg]
    select = f"{agg}({column})" if agg else column
    where, params = [], []
    for col, op, value in lf.conds:
        name = _quote(names[col])
        if _is_real(table, col) and _to_number(value) is not None:
            where.append(f"{name} {OPS[op]} ?")
            params.append(_to_number(value))
        else:
            # Text compares case-insensitively, as WikiSQL's own engine lowercases both sides.
            where.append(f"lower({name}) {OPS[op]} ?")
            params.append(str(value).strip().lower())
    sql = f"SELECT {select} FROM {_quote(TABLE_NAME)}" + (" WHERE " + " AND ".join(where) if where else "")
    return sql, params


def _cell(value) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return (0, round(float(value), 6), "")
    return (1, 0.0, " ".join(str(value).split()).lower())


def result_key(rows: list[tuple] | None) -> list | None:
    return None if rows is None else sorted(tuple(_cell(v) for v in row) for row in rows)


def execute_prediction(conn: sqlite3.Connection, prediction: str, table: Table) -> list[tuple] | None:
    lf = parse_sql(prediction, table.header)
    if lf is not None:
        return execute(conn, *build_query(lf, table))
    return execute(conn, prediction)


def normalise_sql(text: str) -> str:
    return " ".join(text.split()).rstrip(";").strip().lower()


def _table(value) -> Table | None:
    if value is None or isinstance(value, Table):
        return value
    return Table.from_dict(value)


def _query(value, header) -> tuple[LogicalForm | None, str]:
    """(logical form, SQL text) of a prediction or reference: a WikiSQL `sql` dict (official format, taken as is) or
    canonical SQL text (parsed against the header when the table is known)."""
    if isinstance(value, dict):
        try:
            lf = logical_form(value)
        except (KeyError, TypeError, ValueError):
            return None, str(value)
        used = [lf.sel, *(c for c, _, _ in lf.conds)]
        if header is not None and not all(0 <= i < len(header) for i in used) or not 0 <= lf.agg < len(AGGS) \
                or not all(0 <= o < 3 for _, o, _ in lf.conds):
            return None, str(value)
        names = header if header is not None else [f"col{i}" for i in range(1 + max(used))]
        return lf, to_sql(value, names)
    if not isinstance(value, str):  # a one-element list of references
        value = value[0]
    return parse_sql(value, header), value


def wikisql_metrics(predictions: Sequence, references: Sequence, tables: Sequence | None = None) -> dict:
    """logical_form_accuracy, execution_accuracy (None when no table has rows), exact_string_match, as fractions.

    `predictions[i]` is canonical SQL text or a WikiSQL `sql` dict ({sel, agg, conds}); `references[i]` the gold
    `sql` dict (official, compared without rewriting), or its canonical SQL (or a one-element list of it);
    `tables[i]` the example's table (a `Table`, its dict or None): text is parsed against its header, and
    execution needs its rows. Logical-form accuracy is the official `Query.__eq__` (see `LogicalForm.key`);
    exact_string_match compares the SQL strings (white space collapsed, case and a final ";" ignored).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    tabs = [_table(t) for t in tables] if tables is not None else [None] * len(references)
    if len(tabs) != len(references):
        raise ValueError(f"{len(tabs)} tables but {len(references)} references")
    exact = lf_correct = unparsed = gold_unparsed = 0
    exec_total = exec_correct = 0
    for pred, gold, table in zip(predictions, references, tabs):
        header = table.header if table is not None else None
        gold_lf, gold_text = _query(gold, header)
        pred_lf, pred_text = _query(pred, header)
        exact += normalise_sql(pred_text) == normalise_sql(gold_text)
        unparsed += pred_lf is None
        gold_unparsed += gold_lf is None
        lf_correct += gold_lf is not None and pred_lf is not None and pred_lf.key() == gold_lf.key()
        if table is not None and table.rows is not None and gold_lf is not None:
            conn = build_database(table)
            try:
                gold_rows = result_key(execute(conn, *build_query(gold_lf, table)))
                pred_rows = result_key(execute(conn, *build_query(pred_lf, table)) if pred_lf is not None
                                       else execute(conn, pred_text))
            finally:
                conn.close()
            exec_total += 1
            exec_correct += gold_rows is not None and pred_rows == gold_rows
    if gold_unparsed:
        logger.warning("WikiSQL: %d reference(s) are not canonical SQL for their table; they count as wrong", gold_unparsed)
    n = len(references)
    metrics: dict = {
        "logical_form_accuracy": lf_correct / n,
        "execution_accuracy": exec_correct / exec_total if exec_total else None,
        "exact_string_match": exact / n,
        "execution_examples": exec_total,
        "unparsed_predictions": unparsed,
    }
    if not exec_total:
        metrics["execution_accuracy_unavailable"] = (
            "no table rows in the predictions" if all(t is None for t in tabs)
            else "the tables have no rows (rows: null), so queries cannot be executed"
        )
    return metrics
