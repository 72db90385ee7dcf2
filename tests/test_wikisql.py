"""WikiSQL: canonical SQL, the logical-form parser, execution accuracy and the sandbox against hostile SQL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import shared_path
from lorasens.data.wikisql import LogicalForm, Table, logical_form, parse_sql, read_split_file, to_sql
from lorasens.data.sql_metrics import build_database, execute, execute_prediction, wikisql_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "wikisql"
HEADER = ("Player", "No.", "Nationality", "Position", "Years in Toronto", "School/Club Team")


@pytest.fixture
def table() -> Table:
    rows = tuple((f"Player {i}", i, "Canada" if i % 3 == 0 else "United States", "Guard" if i % 2 else "Forward",
                  "1999", f"School {i % 4}") for i in range(1, 61))
    return Table("t-test", HEADER, ("text", "real", "text", "text", "text", "text"), rows)


def test_canonical_sql_matches_the_issue_example():
    assert to_sql({"sel": 5, "agg": 3, "conds": [[1, 0, "3"]]}, HEADER) == "SELECT COUNT(School/Club Team) FROM table WHERE No. = 3"
    assert to_sql({"sel": 3, "agg": 0, "conds": []}, HEADER) == "SELECT Position FROM table"
    # Values are written as str(value), the string the official equality compares: 10.0 stays "10.0".
    assert to_sql({"sel": 0, "agg": 1, "conds": [[1, 1, 10.0], [3, 0, "Guard"]]}, HEADER) == \
        "SELECT MAX(Player) FROM table WHERE No. > 10.0 AND Position = Guard"


def test_parser_uses_the_header_for_awkward_column_names():
    header = ("Week", "Points for", "Points", "Result")
    sql = "SELECT Points for FROM table WHERE Week = 3 AND Points = 21 AND Result = W and L"
    assert parse_sql(sql, header) == LogicalForm(1, 0, ((0, 0, "3"), (2, 0, "21"), (3, 0, "W and L")))
    # Without the header "Points for" is still read, but the value "W and L" is split at " and ": not parsed.
    assert parse_sql(sql) is None


def test_logical_forms_ignore_condition_order_and_case():
    a = parse_sql("SELECT COUNT(Player) FROM table WHERE Position = Guard AND No. > 10", HEADER)
    b = parse_sql("select  count(player) from table where no. > 10 and position = guard;", HEADER)
    assert a.key() == b.key()
    c = parse_sql("SELECT COUNT(Player) FROM table WHERE Position = Guard AND No. > 11", HEADER)
    assert c.key() != a.key()
    for bad in ("SELECT Height FROM table", "SELECT Player FROM players", "Player", "", "SELECT Player FROM table WHERE Age = 3"):
        assert parse_sql(bad, HEADER) is None


def _same(pred, gold) -> bool:
    """Logical-form equality of a prediction and a gold query, each SQL text or a `sql` dict, as lorasens scores it."""
    return wikisql_metrics([pred], [gold], [Table("t", HEADER)])["logical_form_accuracy"] == 1.0


def test_logical_form_equality_is_the_official_query_eq():
    # salesforce/WikiSQL lib/query.py Query.__eq__: same sel and agg, and the *set* of (col, op, str(value).lower()).
    gold = {"sel": 0, "agg": 0, "conds": [[2, 0, "United States"], [1, 0, 2]]}
    assert _same("SELECT Player FROM table WHERE Nationality = united states AND No. = 2", gold)
    assert _same("SELECT Player FROM table WHERE No. = 2 AND Nationality = UNITED STATES", gold)  # order, case
    # 1. A double space inside a value is a different value (nothing inside a value is normalised).
    assert not _same("SELECT Player FROM table WHERE Nationality = United  States AND No. = 2", gold)
    # 2. A trailing space inside a value (before the " AND " that starts the next condition) too.
    assert not _same("SELECT Player FROM table WHERE Nationality = United States  AND No. = 2", gold)
    assert not _same({"sel": 0, "agg": 0, "conds": [[2, 0, "United States "], [1, 0, 2]]}, gold)
    # 3. Numbers compare as their text: "2" is not "2.0" (str(2.0) == "2.0"), in text and in dicts.
    assert not _same("SELECT Player FROM table WHERE Nationality = United States AND No. = 2.0", gold)
    assert not _same({"sel": 0, "agg": 0, "conds": [[2, 0, "United States"], [1, 0, 2.0]]}, gold)
    assert _same({"sel": 0, "agg": 0, "conds": [[2, 0, "united states"], [1, 0, "2"]]}, gold)  # str(2) == "2"
    # 4. A repeated condition is the same query (conditions are a set).
    assert _same("SELECT Player FROM table WHERE No. = 2 AND Nationality = United States AND No. = 2", gold)
    # Not the same: another column, aggregation or operator.
    assert not _same("SELECT COUNT(Player) FROM table WHERE Nationality = United States AND No. = 2", gold)
    assert not _same("SELECT Player FROM table WHERE Nationality = United States AND No. > 2", gold)


def test_official_format_rows_score_without_rewriting(tmp_path, capsys, table):
    from lorasens.cli import main

    gold = {"sel": 0, "agg": 3, "conds": [[3, 0, "Guard"], [1, 1, 40.0]]}
    rows = [
        # official test format: table_id + sql, the prediction a `query` dict
        {"id": 1, "prompt": "q1", "table_id": table.id, "sql": gold, "query": {"sel": 0, "agg": 3, "conds": [[1, 1, 40.0], [3, 0, "guard"]]}},
        {"id": 2, "prompt": "q2", "table_id": table.id, "sql": gold, "query": {"sel": 0, "agg": 3, "conds": [[3, 0, "Guard"], [1, 1, 40]]}},
        # text prediction against the gold dict, parsed with the row's table
        {"id": 3, "prompt": "q3", "sql": gold, "prediction": "SELECT COUNT(Player) FROM table WHERE Position = Guard AND No. > 40.0",
         "table": table.as_dict()},
    ]
    path = tmp_path / "official.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "wikisql", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    # Row 2 writes 40 where the gold has 40.0: str() differs, so the official equality says no.
    assert metrics["logical_form_accuracy"] == pytest.approx(2 / 3)
    assert metrics["execution_accuracy"] == 1.0 and metrics["execution_examples"] == 1


def test_rows_with_a_table_parse_against_its_header_even_when_others_have_none(table):
    header = ("Week", "Points for", "Points", "Result")
    sql = "SELECT Points for FROM table WHERE Week = 3 AND Result = W and L"
    m = wikisql_metrics([sql, "SELECT Position FROM table"], [sql, "SELECT Position FROM table"],
                        [Table("t2", header), None])
    assert m["logical_form_accuracy"] == 1.0 and m["unparsed_predictions"] == 0
    assert wikisql_metrics([sql], [sql])["unparsed_predictions"] == 1  # header-free, " and " splits the value


def test_round_trip_on_committed_fixtures():
    for split in ("train", "dev", "test"):
        pairs = read_split_file(FIXTURES / f"{split}.jsonl", FIXTURES / f"{split}.tables.jsonl", split)
        for _, ex in pairs:
            assert parse_sql(ex.target, ex.meta["table"].header).key() == logical_form(ex.meta["sql"]).key(), ex.target


@pytest.mark.slow
@pytest.mark.shared
def test_round_trip_on_the_real_dev_file():
    folder = shared_path("data", "wikisql")
    pairs = read_split_file(folder / "dev.jsonl", folder / "dev.tables.jsonl", "dev")
    assert len(pairs) == 8421
    failures = [ex.target for _, ex in pairs
                if (lf := parse_sql(ex.target, ex.meta["table"].header)) is None or lf.key() != logical_form(ex.meta["sql"]).key()]
    assert failures == []


def test_execution_accuracy_on_a_table_built_here(table):
    gold = to_sql({"sel": 0, "agg": 3, "conds": [[3, 0, "Guard"], [1, 1, 40]]}, HEADER)
    preds = [
        gold,  # identical
        "SELECT COUNT(Player) FROM table WHERE No. > 40 AND Position = guard",  # same logical form
        "SELECT COUNT(School/Club Team) FROM table WHERE No. > 40 AND Position = Guard",  # other form, same result (10)
        "SELECT COUNT(Player) FROM table WHERE Position = Guard",  # 30, wrong
        'SELECT COUNT(*) FROM "table" WHERE "Position" = \'Guard\' AND "No." > 40',  # real SQL, runs in the sandbox
    ]
    m = wikisql_metrics(preds, [gold] * len(preds), [table] * len(preds))
    assert m["exact_string_match"] == pytest.approx(1 / 5)
    assert m["logical_form_accuracy"] == pytest.approx(2 / 5)
    assert m["execution_accuracy"] == pytest.approx(4 / 5)
    assert m["execution_examples"] == 5 and m["unparsed_predictions"] == 1


def test_execution_is_unavailable_not_zero_without_rows(table):
    no_rows = Table(table.id, table.header, table.types, None)
    gold = "SELECT Player FROM table WHERE No. = 3"
    m = wikisql_metrics([gold], [gold], [no_rows])
    assert m["execution_accuracy"] is None and "rows" in m["execution_accuracy_unavailable"]
    assert m["logical_form_accuracy"] == 1.0
    m = wikisql_metrics([gold], [gold])
    assert m["execution_accuracy"] is None and m["execution_accuracy_unavailable"]


HOSTILE = {
    "drop": 'DROP TABLE "table"',
    "attach": "ATTACH DATABASE '/tmp/lorasens_attack.db' AS other",
    "pragma": "PRAGMA table_info(\"table\")",
    "two statements": 'SELECT Player FROM "table"; DROP TABLE "table"',
    "insert": "INSERT INTO \"table\" VALUES ('x', 1, 'x', 'x', 'x', 'x')",
    "schema": "SELECT sql FROM sqlite_master",
    "heavy function": "SELECT randomblob(100000000)",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_sql_is_refused_and_scored_wrong(name, table, tmp_path):
    conn = build_database(table)
    assert execute(conn, HOSTILE[name]) is None
    # The table is intact and still the only one.
    assert execute(conn, 'SELECT COUNT(*) FROM "table"') == [(60,)]
    conn.close()
    assert not Path("/tmp/lorasens_attack.db").exists()
    gold = "SELECT COUNT(Player) FROM table"
    m = wikisql_metrics([HOSTILE[name]], [gold], [table])
    assert m["execution_accuracy"] == 0.0 and m["logical_form_accuracy"] == 0.0


def test_values_are_bound_not_spliced(table):
    # A canonical-looking prediction whose value holds SQL: executed with the value as a parameter.
    conn = build_database(table)
    pred = "SELECT Player FROM table WHERE Position = Guard'; DROP TABLE \"table\"; --"
    assert execute_prediction(conn, pred, table) == []
    assert execute(conn, 'SELECT COUNT(*) FROM "table"') == [(60,)]


def test_long_running_query_is_stopped(table):
    conn = build_database(table)
    cross = 'SELECT COUNT(*) FROM "table" a, "table" b, "table" c, "table" d, "table" e'  # 60^5 = 7.8e8 rows
    start = time.monotonic()
    assert execute(conn, cross, time_limit_s=0.3) is None
    assert time.monotonic() - start < 3
    recursive = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"
    assert execute(conn, recursive, time_limit_s=0.3) is None


def test_score_command_on_gold_sql_gives_logical_form_accuracy_one(tmp_path, capsys):
    from lorasens.cli import main

    pairs = [ex for split in ("train", "dev", "test")
             for _, ex in read_split_file(FIXTURES / f"{split}.jsonl", FIXTURES / f"{split}.tables.jsonl", split)]
    path = tmp_path / "gold.jsonl"
    with path.open("w") as fh:
        for ex in pairs:
            fh.write(json.dumps({"id": ex.id, "prompt": ex.prompt, "prediction": ex.target, "references": [ex.target],
                                 "table": ex.meta["table"].as_dict()}) + "\n")
    assert main(["score", "wikisql", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_rows"] == 8
    assert out["metrics"]["logical_form_accuracy"] == 1.0
    assert out["metrics"]["exact_string_match"] == 1.0
    # 7 of the 8 questions have table rows in the fixtures; the eighth table has rows: null.
    assert out["metrics"]["execution_accuracy"] == 1.0 and out["metrics"]["execution_examples"] == 7


@pytest.mark.shared
def test_score_command_on_real_dev_gold_sql(tmp_path, capsys):
    from lorasens.cli import main

    folder = shared_path("data", "wikisql")
    pairs = read_split_file(folder / "dev.jsonl", folder / "dev.tables.jsonl", "dev")[:500]
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps({"id": ex.id, "prompt": ex.prompt, "prediction": ex.target, "references": [ex.target],
                                        "table": ex.meta["table"].as_dict()}) + "\n" for _, ex in pairs))
    assert main(["score", "wikisql", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["logical_form_accuracy"] == 1.0
    assert metrics["execution_accuracy"] is None  # rows are null in the offline copy: unavailable, not 0
