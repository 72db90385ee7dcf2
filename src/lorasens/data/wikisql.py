"""WikiSQL (Zhong et al. 2017): a question about one table + its header -> a SQL query over that table.

Target format. The model writes a canonical, readable SQL built from the `sql` dict with the header's column names:
`SELECT COUNT(School) FROM table WHERE No. = 3` — aggregation `AGG(col)` or a bare column, the literal table name
`table`, conditions `col op value` joined by `AND` in the dataset's order, values unquoted. `parse_sql` reads it
back into a `LogicalForm` using the header (so column names with spaces, dots or brackets parse), and logical forms
compare the way WikiSQL's own evaluation compares queries: same select column, same aggregation, the same set of
conditions (order does not matter), values compared case-insensitively (numbers by value: "3" == "3.0").

Local files (official release): `{train,dev,test}.jsonl` ({phase, table_id, question, sql: {sel, agg, conds}}) and
`{split}.tables.jsonl` ({id, header, types, rows}). Splits map train->train, validation->dev, test->test.
When only `dev.jsonl` is present (the offline copy in ../shared has only dev, with `rows` null) the dev file is
split deterministically *by table* into train (80 %), validation (10 %) and test (10 %) parts — a table's
questions all land in one part (crc32 of the table id), as the official splits keep tables apart — and a
warning says so. Hub: `Salesforce/wikisql`, its parquet conversion (`refs/convert/parquet`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lorasens.data.files import read_records, stable_bucket
from lorasens.data.registry import DatasetSpec, Example, register
from lorasens.errors import UserError

logger = logging.getLogger(__name__)

HUB_ID = "Salesforce/wikisql"
AGGS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")  # index = the dataset's `agg`
OPS = ("=", ">", "<", "OP")  # index = the dataset's condition `op`; "OP" never occurs in the data
FILES = {"train": "train", "validation": "dev", "test": "test"}
# Parts of dev.jsonl when it is the only file: bucket (0-99, by table id) ranges per split.
DEV_ONLY_PARTS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
PROMPT = "Table columns: {columns}\nQuestion: {question}\nSQL:"


@dataclass(frozen=True)
class Table:
    id: str
    header: tuple[str, ...]
    types: tuple[str, ...] = ()
    rows: tuple[tuple, ...] | None = None  # None: contents not available (execution accuracy cannot be computed)

    def as_dict(self) -> dict:
        return {"id": self.id, "header": list(self.header), "types": list(self.types),
                "rows": None if self.rows is None else [list(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> Table:
        rows = d.get("rows")
        return cls(str(d["id"]), tuple(str(h) for h in d["header"]), tuple(d.get("types") or ()),
                   None if rows is None else tuple(tuple(r) for r in rows))


@dataclass(frozen=True)
class LogicalForm:
    """A WikiSQL query: select column, aggregation index, conditions (column, operator index, value).

    Columns are header indices when parsed with a header, else normalised column names.
    """

    sel: int | str
    agg: int
    conds: tuple[tuple[int | str, int, str], ...]

    def key(self) -> tuple:
        """What equality means: condition order and value case/number spelling do not matter."""
        return (self.sel, self.agg, tuple(sorted((c, o, _value_key(v)) for c, o, v in self.conds)))


def _value_key(value) -> tuple:
    text = " ".join(str(value).split()).lower()
    try:
        number = float(text)
    except ValueError:
        return (1, text, 0.0)
    if math.isfinite(number):
        return (0, "", number)
    return (1, text, 0.0)


def format_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def to_sql(sql: dict, header: tuple[str, ...] | list[str]) -> str:
    """Canonical SQL text of a WikiSQL `sql` dict ({sel, agg, conds: [[col, op, value], ...]})."""
    column = header[sql["sel"]]
    agg = AGGS[sql["agg"]]
    text = f"SELECT {agg}({column}) FROM table" if agg else f"SELECT {column} FROM table"
    conds = [f"{header[c]} {OPS[o]} {format_value(v)}" for c, o, v in sql["conds"]]
    return text + (" WHERE " + " AND ".join(conds) if conds else "")


def logical_form(sql: dict) -> LogicalForm:
    return LogicalForm(int(sql["sel"]), int(sql["agg"]), tuple((int(c), int(o), format_value(v)) for c, o, v in sql["conds"]))


_SELECT = re.compile(r"^select (.+?) from table(?: where (.+))?$", re.IGNORECASE | re.DOTALL)
_AGG = re.compile(r"^(max|min|count|sum|avg) ?\((.+)\)$", re.IGNORECASE)
_COND_NO_HEADER = re.compile(r"^(.+?) (=|>|<) (.*)$", re.DOTALL)


def _norm(text: str) -> str:
    return " ".join(text.split())


def parse_sql(text: str, header: tuple[str, ...] | list[str] | None = None) -> LogicalForm | None:
    """The logical form of a canonical SQL string, or None when it is not one (a wrong, not a crash).

    With the header, column names are matched against it (longest name first), so names containing spaces,
    operators or 'AND' still parse; without it, a column is the text before the first operator.
    """
    text = _norm(text).rstrip(";").strip()
    match = _SELECT.match(text)
    if not match:
        return None
    select, where = match.group(1), match.group(2)
    names = [_norm(h).lower() for h in header] if header is not None else None
    # Longest first, so "Points" does not shadow "Points for".
    order = sorted(range(len(names)), key=lambda i: -len(names[i])) if names is not None else []

    def column(name: str) -> int | str | None:
        name = _norm(name).lower()
        if names is None:
            return name
        return names.index(name) if name in names else None

    agg = 0
    sel = column(select)
    agg_match = _AGG.match(select)
    if sel is None and agg_match:
        agg, sel = AGGS.index(agg_match.group(1).upper()), column(agg_match.group(2))
    elif names is None and agg_match:
        agg, sel = AGGS.index(agg_match.group(1).upper()), column(agg_match.group(2))
    if sel is None:
        return None
    if where is None:
        return LogicalForm(sel, agg, ())
    conds = _parse_conditions(where, names, order) if names is not None else _parse_conditions_plain(where)
    return None if conds is None else LogicalForm(sel, agg, conds)


def _condition_start(where_lower: str, pos: int, names: list[str], order: list[int]) -> tuple[int, int, int] | None:
    """(column index, op index, value start) when a condition `column op ` starts at `pos`."""
    for i in order:
        name = names[i]
        if where_lower.startswith(name, pos):
            for op_index, op in enumerate(OPS[:3]):
                lead = f" {op} "
                if where_lower.startswith(lead, pos + len(name)):
                    return i, op_index, pos + len(name) + len(lead)
    return None


def _parse_conditions(where: str, names: list[str], order: list[int]) -> tuple | None:
    lower = where.lower()
    conds, pos = [], 0
    while True:
        start = _condition_start(lower, pos, names, order)
        if start is None:
            return None
        col, op, value_start = start
        # The value ends at the first " AND " that is followed by another condition, else at the end.
        end, search = len(where), value_start
        while (hit := lower.find(" and ", search)) != -1:
            if _condition_start(lower, hit + 5, names, order) is not None:
                end = hit
                break
            search = hit + 1
        conds.append((col, op, where[value_start:end].strip()))
        if end == len(where):
            return tuple(conds)
        pos = end + 5


def _parse_conditions_plain(where: str) -> tuple | None:
    conds = []
    for part in re.split(r" and ", where, flags=re.IGNORECASE):
        match = _COND_NO_HEADER.match(part)
        if not match:
            return None
        conds.append((_norm(match.group(1)).lower(), OPS.index(match.group(2)), match.group(3).strip()))
    return tuple(conds)


# ------------------------------------------------------------------------------------------------------ loading


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
    from lorasens.data.hub import load_hub_split

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


SPEC = register(DatasetSpec("wikisql", "WikiSQL: question + table header -> SQL (logical-form, execution, exact match)", load, 64))
