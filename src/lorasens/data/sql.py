"""WikiSQL's logical form and its canonical SQL text: what the data module writes as targets and the scorer reads back.

Shared by `lorasens.data.wikisql` (targets) and `lorasens.evaluation.wikisql` (logical-form and execution accuracy),
so neither imports the other's module: the dataset module registers the scorer, the scorer parses with this.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

AGGS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")  # index = the dataset's `agg`
OPS = ("=", ">", "<", "OP")  # index = the dataset's condition `op`; "OP" never occurs in the data


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
