"""Dataset loaders on committed fixtures (official formats) and on the real ../shared files; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_DATA, shared_path
from lorasens.data.registry import get_dataset_spec, group_by_prompt, load_examples
from lorasens.data.templates import apply_prompt_template
from lorasens.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"


# ------------------------------------------------------------------------------------------------ SAMSum


def test_samsum_fixture_jsonl_and_json():
    train = load_examples("samsum", "train", FIXTURES / "samsum")
    assert [ex.id for ex in train] == ["train-s1", "train-s2"]  # s3 has an empty dialogue: dropped
    assert train[0].prompt == ("Summarize the following conversation.\n\nAmanda: I baked cookies. Do you want some?\n"
                               "Jerry: Sure!\nAmanda: I'll bring you tomorrow :-)\n\nSummary:")
    assert train[0].target == "Amanda baked cookies and will bring Jerry some tomorrow."
    test = load_examples("samsum", "test", FIXTURES / "samsum")  # test.json: a JSON list (original release)
    assert [ex.id for ex in test] == ["test-t1", "test-t2"] and test[1].references == (test[1].target,)


def test_samsum_test_falls_back_to_validation(tmp_path):
    for name in ("train.jsonl", "validation.jsonl"):
        shutil.copy(FIXTURES / "samsum" / name, tmp_path / name)
    test = load_examples("samsum", "test", tmp_path)
    assert [ex.id for ex in test] == ["test-v1", "test-v2"]
    assert not {ex.prompt for ex in test} & {ex.prompt for ex in load_examples("samsum", "train", tmp_path)}


@pytest.mark.shared
def test_samsum_real_files():
    folder = shared_path("data", "samsum")
    train = load_examples("samsum", "train", folder)
    val = load_examples("samsum", "validation", folder)
    assert len(train) == 14731 and len(val) == 818  # 14,732 minus the empty dialogue 13828807
    assert "train-13828807" not in {ex.id for ex in train}
    assert "\r" not in train[0].prompt
    # Evaluation (no test file: validation) never uses a training dialogue id. (47 dialogues of the official
    # validation set also occur, under other ids, in the official training set; we keep the official splits.)
    test_ids = {ex.id.split("-", 1)[1] for ex in load_examples("samsum", "test", folder)}
    assert len(test_ids) == 818 and not test_ids & {ex.id.split("-", 1)[1] for ex in train}


# ------------------------------------------------------------------------------------------------ WikiSQL


def test_wikisql_fixture_splits():
    train = load_examples("wikisql", "train", FIXTURES / "wikisql")
    test = load_examples("wikisql", "test", FIXTURES / "wikisql")
    assert len(train) == 2 and len(test) == 4
    ex = load_examples("wikisql", "validation", FIXTURES / "wikisql")[1]
    assert ex.prompt == ("Table columns: Player | No. | Nationality | Position | Years in Toronto | School/Club Team\n"
                         "Question: How many schools did player number 3 play at?\nSQL:")
    assert ex.target == "SELECT COUNT(School/Club Team) FROM table WHERE No. = 3"
    assert ex.meta["table"].rows is not None and len(ex.meta["table"].rows) == 4


@pytest.mark.slow
def test_wikisql_dev_only_is_split_by_table(tmp_path):
    # The real dev file of ../shared (8,421 questions; CI=true fails rather than skips without it): on the 2-question
    # fixture every part but one is empty and the disjointness below would hold vacuously.
    from conftest import shared_path
    source = shared_path("data", "wikisql")
    for name in ("dev.jsonl", "dev.tables.jsonl"):
        shutil.copy(source / name, tmp_path / name)
    parts = {}
    for split in ("train", "validation", "test"):
        try:
            parts[split] = load_examples("wikisql", split, tmp_path)
        except UserError:  # a part can be empty on the 2-question fixture
            parts[split] = []
    tables = {s: {ex.meta["table_id"] for ex in exs} for s, exs in parts.items()}
    assert not tables["train"] & tables["test"] and not tables["train"] & tables["validation"]
    assert not tables["validation"] & tables["test"]
    assert all(len(t) > 10 for t in tables.values()), {k: len(v) for k, v in tables.items()}
    total = sum(1 for line in (tmp_path / "dev.jsonl").read_text().splitlines() if line.strip())
    assert sum(len(v) for v in parts.values()) == total


@pytest.mark.slow
@pytest.mark.shared
def test_wikisql_real_dev_parts():
    folder = shared_path("data", "wikisql")
    sizes = {s: len(load_examples("wikisql", s, folder)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 6763, "validation": 783, "test": 875}  # 8,421 questions, split by crc32(table id)


# ------------------------------------------------------------------------------------------------ MNLI


def test_mnli_fixture_tsv_and_jsonl_labels():
    from lorasens.data import mnli

    train = mnli.load("train", FIXTURES / "mnli", 0) + mnli.load("validation", FIXTURES / "mnli", 0)
    assert sorted(ex.target for ex in train) == ["contradiction", "contradiction", "entailment", "entailment", "neutral"]  # "-" skipped
    test = load_examples("mnli", "test", FIXTURES / "mnli")
    assert [ex.target for ex in test] == ["neutral", "contradiction", "entailment", "contradiction"]
    assert test[0].prompt.startswith("Premise: The new rights are nice enough\nHypothesis: Everyone really likes")
    mismatched = mnli.load_mismatched(FIXTURES / "mnli")
    assert [ex.target for ex in mismatched] == ["contradiction", "contradiction", "entailment"]  # GLUE ints 2, 2, 0


def test_mnli_without_train_splits_dev_matched_disjointly(tmp_path):
    from lorasens.data import mnli

    lines = [json.dumps({"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "label": i % 3}) for i in range(300)]
    (tmp_path / "dev_matched.jsonl").write_text("\n".join(lines) + "\n")
    parts = {s: mnli.load(s, tmp_path, 0) for s in ("train", "validation", "test")}
    prompts = {s: {ex.prompt for ex in v} for s, v in parts.items()}
    assert sum(len(v) for v in prompts.values()) == 300
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert 200 < len(prompts["train"]) < 280 and len(prompts["test"]) > 20
    assert mnli.load_mismatched(tmp_path) is None


@pytest.mark.shared
def test_mnli_real_dev_matched():
    folder = shared_path("data", "mnli")
    sizes = {s: len(load_examples("mnli", s, folder)) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 9815
    assert sizes["test"] > 1300


# ------------------------------------------------------------------------------------------------ E2E test split


def test_e2e_test_split_has_all_references_per_mr():
    test = load_examples("e2e", "test", FIXTURES / "e2e")
    assert len(test) == 6
    grouped = group_by_prompt(test)
    assert len(grouped) == 2 and all(len(ex.references) == 3 for ex in grouped)
    assert grouped[1].references[0] == "Clowns is a pub by the riverside."


# ------------------------------------------------------------------------------------------------ shared behaviour


def test_eval_samples_subset_is_deterministic_and_seeded():
    a = load_examples("wikisql", "test", FIXTURES / "wikisql", seed=1, limit=2)
    b = load_examples("wikisql", "test", FIXTURES / "wikisql", seed=1, limit=2)
    assert [e.id for e in a] == [e.id for e in b] and len(a) == 2
    ids = {tuple(e.id for e in load_examples("wikisql", "test", FIXTURES / "wikisql", seed=s, limit=2)) for s in range(8)}
    assert len(ids) > 1


def test_prompt_template_override():
    train = load_examples("samsum", "train", FIXTURES / "samsum")
    out = apply_prompt_template(train, "Dialogue:\\n{dialogue}\\nTL;DR:", "samsum")
    assert out[1].prompt == "Dialogue:\nOlivia: Who are you voting for in this election?\nOliver: Liberals as always.\nOlivia: Me too!!\nTL;DR:"
    assert out[1].target == train[1].target
    with pytest.raises(UserError, match=r"unknown field\(s\) text; valid fields: \{dialogue\}"):
        apply_prompt_template(train, "{text} ->", "samsum")
    with pytest.raises(UserError, match="no field"):
        apply_prompt_template(train, "Summarise:", "samsum")


def test_all_four_datasets_are_registered():
    for name, tokens in (("samsum", 96), ("wikisql", 64), ("mnli", 4), ("e2e", 64)):
        assert get_dataset_spec(name).max_new_tokens == tokens


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("dataset, filename, content, message", [
    ("samsum", "train.jsonl", "", r"train.jsonl: file is empty"),
    ("samsum", "train.jsonl", '{"id": 1, "dialogue": "A: hi", "summary": "x"}\n{"id": 2, "dialogue": "B: yo"\n',
     r"train.jsonl:2: not valid JSON"),
    ("samsum", "train.jsonl", '{"id": 1, "dialogue": "A: hi", "summary": "x"}\n\n{"id": 2, "dialogue": "B: yo"}\n',
     r"train.jsonl:3: missing field\(s\) summary; required: id, dialogue, summary"),
    ("samsum", "train.json", '[{"id": 1, "dialogue": "A: hi"}]', r"train.json:1: missing field\(s\) summary"),
    ("mnli", "train.jsonl", '{"premise": "a", "hypothesis": "b", "label": "maybe"}\n', r"train.jsonl:1: label 'maybe' is not one of"),
    ("mnli", "train.jsonl", '{"premise": "a", "label": 0}\n', r"train.jsonl:1: missing field\(s\) hypothesis or sentence2"),
    ("mnli", "train.tsv", "sentence1\tsentence2\tgold_label\na\tb\n", r"train.tsv:2: wrong number of tab-separated fields"),
    ("mnli", "train.tsv", "premise\tlabel\n", r"train.tsv:1: missing column"),
])
def test_bad_data_files_name_file_and_line(tmp_path, dataset, filename, content, message):
    (tmp_path / filename).write_text(content)
    with pytest.raises(UserError, match=message):
        load_examples(dataset, "train", tmp_path)


def test_bad_wikisql_files_name_file_and_line(tmp_path):
    shutil.copy(FIXTURES / "wikisql" / "train.tables.jsonl", tmp_path / "train.tables.jsonl")
    good = (FIXTURES / "wikisql" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text(good[0] + '\n{"table_id": "1-1000181-1", "question": "q"}\n')
    with pytest.raises(UserError, match=r"train.jsonl:2: missing field\(s\) sql"):
        load_examples("wikisql", "train", tmp_path)
    (tmp_path / "train.jsonl").write_text(good[0] + '\n{"table_id": "1-1000181-1", "question": "q", "sql": {"sel": 9, "agg": 0, "conds": []}}\n')
    with pytest.raises(UserError, match=r"train.jsonl:2: field sql must be .* inside the table header \(6 columns\)"):
        load_examples("wikisql", "train", tmp_path)
    (tmp_path / "train.jsonl").write_text('{"table_id": "nope", "question": "q", "sql": {"sel": 0, "agg": 0, "conds": []}}\n')
    with pytest.raises(UserError, match=r"train.jsonl:1: table_id 'nope' is not in train.tables.jsonl"):
        load_examples("wikisql", "train", tmp_path)
    (tmp_path / "train.tables.jsonl").unlink()
    with pytest.raises(UserError, match="train.tables.jsonl: file not found"):
        load_examples("wikisql", "train", tmp_path)


def test_missing_files_say_what_is_needed(tmp_path):
    with pytest.raises(UserError, match="lacks train.jsonl or train.json"):
        load_examples("samsum", "train", tmp_path)
    with pytest.raises(UserError, match="WikiSQL needs the official"):
        load_examples("wikisql", "train", tmp_path)
    with pytest.raises(UserError, match="neither train nor dev_matched"):
        load_examples("mnli", "train", tmp_path)
