"""WikiSQL's logical form and its canonical SQL text: what the data module writes as targets and the scorer reads back.

Shared by `lorasens.data.wikisql` (targets) and `lorasens.data.sql_metrics` (logical-form and execution accuracy),
so neither imports the other's module: the dataset module registers the scorer, the scorer parses with this.
"""

from __future__ import annotations

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
        """What equality means (WikiSQL `Query.__eq__`): same sel and agg, the same *set* of (column, operator,
        `str(value).lower()`) conditions; condition order and repeats do not matter, spelling of values does."""
        return (self.sel, self.agg, frozenset((c, o, str(v).lower()) for c, o, v in self.conds))


def format_value(value) -> str:
    """A condition value as the canonical SQL writes it: `str(value)`, the string the official equality compares."""
    return str(value)


def to_sql(sql: dict, header: tuple[str, ...] | list[str]) -> str:
    """Canonical SQL text of a WikiSQL `sql` dict ({sel, agg, conds: [[col, op, value], ...]})."""
    column = header[sql["sel"]]
    agg = AGGS[sql["agg"]]
    text = f"SELECT {agg}({column}) FROM table" if agg else f"SELECT {column} FROM table"
    conds = [f"{header[c]} {OPS[o]} {format_value(v)}" for c, o, v in sql["conds"]]
    return text + (" WHERE " + " AND ".join(conds) if conds else "")


def logical_form(sql: dict) -> LogicalForm:
    """The logical form of a WikiSQL `sql` dict, values untouched (the official format, no rewriting)."""
    return LogicalForm(int(sql["sel"]), int(sql["agg"]), tuple((int(c), int(o), v) for c, o, v in sql["conds"]))


_SELECT = re.compile(r"^select\s+(.+?)\s+from\s+table(?:\s+where\s(.+))?$", re.IGNORECASE | re.DOTALL)
_AGG = re.compile(r"^(max|min|count|sum|avg) ?\((.+)\)$", re.IGNORECASE)
_COND_NO_HEADER = re.compile(r"^(.+?) (=|>|<) (.*)$", re.DOTALL)
_AND = " and "


def _norm(text: str) -> str:
    return " ".join(text.split())


def parse_sql(text: str, header: tuple[str, ...] | list[str] | None = None) -> LogicalForm | None:
    """The logical form of a canonical SQL string, or None when it is not one (a wrong, not a crash).

    Keywords, the select clause and column names may use any white space and case. A condition is `column op
    value`: one space after the operator, and the value is everything up to the " AND " (single spaces) that starts
    the next condition, or the end of the query (less a final ";" and outer white space). Inside a value nothing is
    normalised: the official equality compares values literally. With the header, column names are matched against
    it (longest name first), so names containing spaces, operators or 'AND' still parse; without it, a column is
    the text before the first operator and a value cannot contain " and ".
    """
    text = text.strip()
    if text.endswith(";"):
        text = text[:-1].rstrip()
    match = _SELECT.match(text)
    if not match:
        return None
    select, where = _norm(match.group(1)), match.group(2)
    names = [_norm(h).lower() for h in header] if header is not None else None

    def column(name: str) -> int | str | None:
        name = _norm(name).lower()
        if names is None:
            return name
        return names.index(name) if name in names else None

    agg = 0
    sel = column(select)
    agg_match = _AGG.match(select)
    if agg_match and (sel is None or names is None):
        agg, sel = AGGS.index(agg_match.group(1).upper()), column(agg_match.group(2))
    if sel is None:
        return None
    if where is None:
        return LogicalForm(sel, agg, ())
    where = where.lstrip()
    conds = _parse_conditions(where, _column_patterns(header)) if header is not None else _parse_conditions_plain(where)
    return None if conds is None else LogicalForm(sel, agg, conds)


def _column_patterns(header: tuple[str, ...] | list[str]) -> list[tuple[int, re.Pattern]]:
    """(column index, pattern matching `name op `), longest name first so "Points" does not shadow "Points for"."""
    order = sorted(range(len(header)), key=lambda i: -len(_norm(header[i])))
    # Any white space between the words of a name, then the operator and the one space before the value.
    patterns = [r"\s+".join(map(re.escape, header[i].split())) + r"\s+(=|>|<) " for i in order]
    return [(i, re.compile(pattern, re.IGNORECASE)) for i, pattern in zip(order, patterns)]


def _condition_start(where: str, pos: int, patterns: list[tuple[int, re.Pattern]]) -> tuple[int, int, int] | None:
    """(column index, op index, value start) when a condition `column op ` starts at `pos`."""
    for i, pattern in patterns:
        match = pattern.match(where, pos)
        if match:
            return i, OPS.index(match.group(1)), match.end()
    return None


def _parse_conditions(where: str, patterns: list[tuple[int, re.Pattern]]) -> tuple | None:
    lower = where.lower()
    conds, pos = [], 0
    while True:
        start = _condition_start(where, pos, patterns)
        if start is None:
            return None
        col, op, value_start = start
        # The value ends at the first " AND " that is followed by another condition, else at the end.
        end, search = len(where), value_start
        while (hit := lower.find(_AND, search)) != -1:
            if _condition_start(where, hit + len(_AND), patterns) is not None:
                end = hit
                break
            search = hit + 1
        conds.append((col, op, where[value_start:end]))
        if end == len(where):
            return tuple(conds)
        pos = end + len(_AND)


def _parse_conditions_plain(where: str) -> tuple | None:
    conds = []
    for part in re.split(r" and ", where, flags=re.IGNORECASE):
        match = _COND_NO_HEADER.match(part)
        if not match:
            return None
        conds.append((_norm(match.group(1)).lower(), OPS.index(match.group(2)), match.group(3)))
    return tuple(conds)
