"""Your own data (`--dataset custom`, `hf:ORG/NAME`): files, fields, the hash split, chat masks, metrics, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from lorasens.cli import main
from lorasens.config import DataConfig, TextMetric, build_config
from lorasens.data.features import IGNORE_INDEX, build_features, chat_prompt_ids
from lorasens.data.registry import Example, load_examples
from lorasens.errors import UserError
from lorasens.evaluation.predictions import score_rows
from lorasens.metrics import TEXT_METRIC_FUNCTIONS, sacrebleu_bleu, text_metrics
from lorasens.rundir.files import (ABLATION, CONFIG_FILE, LAYER_NORMS, PHASES, RECOMMENDED_CONFIG, REPORT_FILE,
                                   SENSITIVITY, SUMMARY_FILE)

ROWS = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": str(2 * i), "topic": "sums"} for i in range(40)]
FAST = ["--model", "tiny-random-llama", "--r", "4", "--batch_size", "4", "--max_length", "64"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write(path: Path, rows: list[dict]) -> Path:
    """A JSONL, CSV or Parquet file of `rows`, by the suffix of `path`."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


def load(split: str, seed: int = 0, **flags) -> list[Example]:
    options = DataConfig(dataset=flags.pop("dataset", "custom"), **flags)
    return load_examples(options.dataset, split, options.data_dir, seed, options=options)


# ------------------------------------------------------------------------------------------- files and fields


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_each_file_format_with_default_fields(tmp_path, suffix):
    for split, rows in (("train", ROWS[:30]), ("validation", ROWS[30:35]), ("test", ROWS[35:])):
        write(tmp_path / f"{split}{suffix}", rows)
    train, val, test = (load(s, data_dir=str(tmp_path)) for s in ("train", "validation", "test"))
    assert [len(train), len(val), len(test)] == [30, 5, 5]  # each split from its own file, nothing cut off
    assert (train[3].prompt, train[3].target, train[3].references) == ("Q3: what is 3 plus 3?", "6", ("6",))
    assert test[0].prompt == "Q35: what is 35 plus 35?" and test[0].meta["topic"] == "sums"
    # CSV cells stay text: the answer "6" is not read as the integer 6 (which would be refused as non-string)
    assert isinstance(train[3].target, str)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_each_file_format_with_explicit_fields_and_split_names(tmp_path, suffix):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in ROWS]
    write(tmp_path / f"training{suffix}", rows[:36])
    write(tmp_path / f"heldout{suffix}", rows[36:])
    flags = dict(data_dir=str(tmp_path), prompt_field="question", target_field="answer", split_train="training",
                 split_test="heldout")
    test = load("test", **flags)
    assert [(e.prompt, e.target) for e in test] == [(r["question"], r["answer"]) for r in rows[36:]]
    train, val = load("train", **flags), load("validation", **flags)  # validation: cut from training by hash
    assert len(train) + len(val) == 36 and val
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in val)


def test_data_files_single_path_and_split_pairs(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", ROWS[:30])
    test = write(tmp_path / "b.csv", ROWS[30:])
    pairs = f"train={train},test={test}"
    assert [e.prompt for e in load("test", data_files=pairs)] == [r["prompt"] for r in ROWS[30:]]
    assert len(load("train", data_files=str(train))) + len(load("validation", data_files=str(train))) + \
        len(load("test", data_files=str(train))) == 30


def test_prompt_template_over_any_column(tmp_path):
    rows = [{"a": f"x{i}", "b": f"y{i}", "answer": f"z{i}"} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:3])
    cfg = build_config(cli_overrides={"dataset": "custom", "data_dir": str(tmp_path), "target_field": "answer",
                                      "prompt_template": "A={a} B={b}\\nAnswer:", "model": "tiny-random-llama"})
    from lorasens.evaluation.runner import eval_examples

    examples = eval_examples(cfg, "test", 10, 0)
    assert [(e.prompt, e.target) for e in examples] == [(f"A=x{i} B=y{i}\nAnswer:", f"z{i}") for i in range(3)]


def test_hub_path_reads_a_local_dataset_folder_through_load_dataset(tmp_path):
    """`hf:` goes through datasets.load_dataset; a local folder in the Hub's parquet layout takes the same path."""
    (tmp_path / "data").mkdir()
    pd.DataFrame(ROWS[:32]).to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(ROWS[32:]).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    name = f"hf:{tmp_path}"
    test = load("test", dataset=name)
    assert [e.target for e in test] == [r["completion"] for r in ROWS[32:]]
    assert len(load("train", dataset=name)) + len(load("validation", dataset=name)) == 32
    with pytest.raises(UserError, match=r"has no split 'training' \(found: train, test\)"):
        load("train", dataset=name, split_train="training")


# ---------------------------------------------------------------------------------------- deterministic split


def test_hash_split_is_deterministic_disjoint_complete_and_sized(tmp_path):
    rows = [{"prompt": f"question number {i}", "completion": f"answer {i}"} for i in range(2000)]
    path = str(write_jsonl(tmp_path / "train.jsonl", rows))
    flags = dict(data_files=path, validation_fraction=0.15, test_fraction=0.05)
    parts = {s: [e.prompt for e in load(s, seed=1, **flags)] for s in ("train", "validation", "test")}
    again = {s: [e.prompt for e in load(s, seed=1, **flags)] for s in parts}
    other_seed = {s: [e.prompt for e in load(s, seed=7, **flags)] for s in parts}
    assert parts == again == other_seed  # by content only: runs that differ in seed share their held-out rows
    assert sorted(sum(parts.values(), [])) == sorted(r["prompt"] for r in rows)  # every row once, none in two
    assert abs(len(parts["validation"]) - 300) < 60 and abs(len(parts["test"]) - 100) < 35
    # defaults: 10 % each
    default = {s: len(load(s, data_files=path)) for s in ("validation", "test")}
    assert all(abs(n - 200) < 45 for n in default.values()), default


def test_held_out_split_too_small_says_how_to_fix(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:3])
    for split in ("validation", "test"):  # each split checked (a loop inside one pytest.raises stops at the first)
        with pytest.raises(UserError, match=f"raise --{split}_fraction"):
            load(split, data_files=str(path))


# ------------------------------------------------------------------------------------------------------ chat


CHAT = [
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Colour of the sky?"},
                  {"role": "assistant", "content": "Blue"},
                  {"role": "user", "content": "And of grass?\nBe brief."},
                  {"role": "assistant", "content": "Green,\nusually."}]},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    from lorasens.model.loading import load_model

    return load_model("smollm2-135m").tokenizer


def _assistant_spans(text: str, messages: list[dict], end_of_turn: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant answer + its end-of-turn marker in the rendered text, found
    by searching the text turn by turn (independent of how features.py segments it)."""
    spans, pos = [], 0
    for turn in messages:
        start = text.index(turn["content"], pos)
        end = start + len(turn["content"])
        if turn["role"] == "assistant":
            assert text[end:end + len(end_of_turn)] == end_of_turn
            spans.append((start, end + len(end_of_turn)))
        pos = end
    return spans


@pytest.mark.slow  # real SmolLM2-135M-Instruct (has a chat template): 3-5 s from its cache, 20 s+ on first use
def test_chat_loss_mask_is_exactly_the_assistant_turns_token_by_token(tmp_path, chat_tokenizer):
    tok = chat_tokenizer
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", CHAT)
    examples = load("train", data_dir=str(tmp_path))
    assert examples[0].messages and examples[0].target == "Green,\nusually."
    assert examples[0].prompt.startswith("system: Answer in one word.\nuser: Colour")
    features, stats = build_features(examples[:2], tok, 256)
    assert stats.examples == 2
    for ex, feature in zip(examples[:2], features):
        messages = list(ex.messages)
        text = tok.apply_chat_template(messages, tokenize=False)
        full = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert feature["input_ids"] == full["input_ids"]  # exactly the template's tokens, nothing added
        spans = _assistant_spans(text, messages, tok.eos_token)
        labelled = 0
        for token, label, (start, end) in zip(full["input_ids"], feature["labels"], full["offset_mapping"]):
            inside = any(lo <= start and end <= hi for lo, hi in spans)
            assert (label != IGNORE_INDEX) == inside, (tok.decode([token]), start, end)
            if label != IGNORE_INDEX:
                assert label == token
                labelled += 1
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert labelled == sum(len(tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]) for a in answers)
        # the evaluation prompt is the template's own rendering up to the generation prompt of the last answer
        prompt_text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert chat_prompt_ids(tok, ex.messages) == tok(prompt_text, add_special_tokens=False)["input_ids"]


def test_chat_rows_need_a_chat_template(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "train.jsonl", CHAT)
    examples = load("test", data_files=f"train={tmp_path / 'train.jsonl'},test={tmp_path / 'train.jsonl'}")
    with pytest.raises(UserError, match="has no chat template, which chat rows"):
        build_features(examples, tiny_llama.tokenizer, 64)


# --------------------------------------------------------------------------------------------------- metrics


PREDICTIONS = ["the cat sat on the mat", "Positive.", " yes  it is "]
REFERENCES = [["the cat lay on the mat"], ["positive"], ["no", "yes it is"]]


def test_text_metrics_on_a_hand_computed_case():
    scores = text_metrics(PREDICTIONS, REFERENCES, ("exact_match", "accuracy", "rouge_l", "bleu"))
    assert scores["exact_match"] == pytest.approx(1 / 3)  # only " yes  it is " (white space collapsed)
    assert scores["accuracy"] == pytest.approx(2 / 3)  # + "Positive." as the label "positive"
    # ROUGE-L F: LCS 5 of 6 tokens both ways; "positive" = "positive" after tokenisation; best reference of row 3
    assert scores["rouge_l"] == pytest.approx(100 * (5 / 6 + 1 + 1) / 3)
    # corpus BLEU, 13a tokens: n-gram matches 8/11, 5/8, 2/5, and no 4-gram (exp smoothing: 1/(2*3)); hypothesis
    # length 11 >= closest reference lengths 6 + 1 + 3, so no brevity penalty
    assert scores["bleu"] == pytest.approx(100 * math.exp((math.log(8 / 11) + math.log(5 / 8) + math.log(2 / 5)
                                                           + math.log(1 / 6)) / 4), abs=1e-6)
    assert sacrebleu_bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_metric_vocabulary_is_the_config_literal():
    from typing import get_args

    assert set(TEXT_METRIC_FUNCTIONS) == set(get_args(TextMetric))


def test_score_command_gives_the_chosen_metrics(tmp_path, capsys):
    rows = [{"id": str(i), "prompt": f"p{i}", "prediction": p, "references": r}
            for i, (p, r) in enumerate(zip(PREDICTIONS, REFERENCES))]
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    assert main(["score", "custom", str(path), "--metrics", "accuracy,exact_match"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"] == {"accuracy": pytest.approx(2 / 3), "exact_match": pytest.approx(1 / 3)}
    assert main(["score", "custom", str(path)]) == 0  # default: exact_match, rouge_l, bleu
    assert list(json.loads(capsys.readouterr().out)["metrics"]) == ["exact_match", "rouge_l", "bleu"]
    assert main(["score", "e2e", str(path), "--metrics", "bleu"]) == 2
    assert "only apply to your own data" in capsys.readouterr().err
    assert main(["score", "custom", str(path), "--metrics", "bleu,meteor"]) == 2
    assert "unknown metric 'meteor'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad input


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.parametrize("name, text, flags, message", [
    ("train.jsonl", None, ["--data_files", "{dir}/absent.jsonl"], "absent.jsonl: file not found"),
    ("train.jsonl", "", [], "train.jsonl: file is empty"),
    ("train.csv", "", [], "train.csv: file is empty"),
    ("train.jsonl", '{"question": "q", "answer": "a"}\n', [],
     "no column 'prompt', 'completion'; columns found: question, answer; choose them with --prompt_field / "
     "--target_field"),
    ("train.jsonl", '{"prompt": "q", "completion": "a"}\n', ["--target_field", "answer"], "no column 'answer'"),
    ("train.jsonl", '{"prompt": "q", "completion": "a"}\n{"prompt": "  ", "completion": "b"}\n'
     '{"prompt": "q", "completion": 3}\n', [],
     "2 row(s) with an empty or non-string prompt or completion (first: train row 2); refused rather than skipped"),
    ("train.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n', [],
     "train row 1: unknown role 'bot' in messages; valid: system, user, assistant"),
    ("train.jsonl", '{"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}]}\n', [],
     "the last message must be a non-empty assistant turn"),
    ("train.txt", "a\n", [], "has no train{.jsonl,.json,.csv,.parquet} (found: train.txt)"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, name, text, flags, message):
    data = tmp_path / "data"
    data.mkdir()
    if text is not None:
        _bad(data, name, text)
    flags = [f.replace("{dir}", str(data)) for f in flags]
    source = flags if "--data_files" in flags else ["--data_dir", str(data), *flags]
    code = main(["train", *FAST, "--dataset", "custom", *source, "--output_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "e2e", "--prompt_field", "q"], "--prompt_field only apply to your own data"),
    (["--dataset", "custom"], "needs --data_dir DIR"),
    (["--dataset", "custom", "--data_dir", "x", "--data_files", "y"], "give --data_files or --data_dir, not both"),
    (["--dataset", "hf:org/x", "--data_dir", "x"], "drop --data_dir / --data_files"),
    (["--dataset", "custom", "--data_files", "test=a.jsonl"], "has no train=PATH"),
    (["--dataset", "custom", "--data_files", "a.jsonl", "--metrics", "f1"], "unknown metric 'f1'"),
    (["--dataset", "custom", "--data_files", "a.jsonl", "--test_fraction", "1.5"], "--test_fraction must be in (0, 1)"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, flags, message):
    code = main(["train", *FAST, *flags, "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # a 4-step tiny-model run with evaluation, ablation, report and compare (~10-25 s)
def test_train_on_custom_data_runs_the_whole_pipeline(tmp_path, capsys):
    """Phases, tracking, evaluation, ablation, recommendation, report and `score` all work on a custom dataset."""
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(60)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    code = main(["train", *FAST, "--dataset", "custom", "--data_files", str(path), "--prompt_field", "question",
                 "--target_field", "answer", "--metrics", "exact_match,accuracy,rouge_l", "--max_steps", "4",
                 "--eval_steps", "2", "--phase_strategy", "both->mlp", "--eval_samples", "8",
                 "--max_new_tokens", "4", "--ablation_max_single", "2", "--analysis_samples", "8",
                 "--output_dir", str(tmp_path / "runs"),
                 "--experiment_name", "mine"])
    assert code == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "runs" / "mine"
    for name in (CONFIG_FILE, SUMMARY_FILE, REPORT_FILE, PHASES, LAYER_NORMS, ABLATION, SENSITIVITY,
                 RECOMMENDED_CONFIG, "custom_predictions.jsonl", "custom_evaluation.json"):
        assert (run / name).exists(), name
    phases = json.loads((run / PHASES).read_text())
    assert [(t["step"], t["label"]) for t in phases["transitions"]] == [(0, "both"), (2, "mlp")]
    evaluation = json.loads((run / "custom_evaluation.json").read_text())
    assert list(evaluation["metrics"]) == ["exact_match", "accuracy", "rouge_l"]
    predictions = [json.loads(line) for line in (run / "custom_predictions.jsonl").read_text().splitlines()]
    test_prompts = {e.prompt for e in load("test", data_files=str(path), prompt_field="question",
                                           target_field="answer")}
    assert {p["prompt"] for p in predictions} == test_prompts  # the hash-split test rows, all of them (< 8)
    capsys.readouterr()
    assert main(["score", "custom", str(run / "custom_predictions.jsonl"), "--metrics",
                 "exact_match,accuracy,rouge_l"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == evaluation["metrics"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluation"] == evaluation["metrics"] and summary["steps"] == 4
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0  # compare reads the custom metrics
    header = (tmp_path / "cmp" / "comparison_runs.csv").read_text().splitlines()[0]
    assert all(name in header for name in ("exact_match", "accuracy", "rouge_l")), header
    # `lorasens eval RUN --data_dir DIR`: the finished run scored on another folder (its test split).
    other = tmp_path / "official"
    other.mkdir()
    write_jsonl(other / "train.jsonl", rows[:10])
    official = [{"question": f"What is {i} minus {i}?", "answer": "0"} for i in range(5)]
    write_jsonl(other / "test.jsonl", official)
    assert main(["eval", str(run), "--data_dir", str(other), "--split", "test"]) == 0
    predictions = [json.loads(line) for line in (run / "custom_predictions.jsonl").read_text().splitlines()]
    assert {p["prompt"] for p in predictions} == {e.prompt for e in load("test", data_dir=str(other),
                                                                         prompt_field="question",
                                                                         target_field="answer")}
    assert len(predictions) == 5


def test_predictions_of_a_hub_named_dataset_get_a_plain_file_name():
    from lorasens.rundir.files import evaluation_file, predictions_file

    assert predictions_file("hf:org/name:cfg") == "hf_org_name_cfg_predictions.jsonl"
    assert evaluation_file("custom") == "custom_evaluation.json"


def test_score_rows_uses_the_runs_metrics():
    rows = [{"id": "0", "prompt": "p", "prediction": "Yes", "references": ["yes"]}]
    assert score_rows("custom", rows, DataConfig(dataset="custom", metrics="accuracy")) == {"accuracy": 1.0}
    assert score_rows("custom", rows) == text_metrics(["Yes"], [["yes"]], ("exact_match", "rouge_l", "bleu"))


@pytest.mark.slow  # SmolLM2-135M: two training steps and generation on CPU
def test_chat_data_trains_and_evaluates_end_to_end(tmp_path, capsys):
    """Chat rows through the whole run: template-rendered features, generation from the chat prompt's tokens."""
    chats = [{"messages": [{"role": "user", "content": f"Repeat the word number {i}."},
                           {"role": "assistant", "content": f"word{i}"}]} for i in range(24)]
    write_jsonl(tmp_path / "train.jsonl", chats)
    write_jsonl(tmp_path / "test.jsonl", chats[:2])
    code = main(["train", "--model", "smollm2-135m", "--dataset", "custom", "--data_dir", str(tmp_path),
                 "--validation_fraction", "0.2", "--max_steps", "2", "--batch_size", "2", "--r", "2",
                 "--max_length", "64", "--eval_steps", "0", "--ablation", "false", "--eval_samples", "2", "--analysis_samples", "2",
                 "--max_new_tokens", "6", "--metrics", "exact_match", "--output_dir", str(tmp_path / "runs"),
                 "--experiment_name", "chat"])
    assert code == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "runs" / "chat"
    rows = [json.loads(line) for line in (run / "custom_predictions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["references"]) for r in rows] == [("user: Repeat the word number 0.", ["word0"]),
                                                              ("user: Repeat the word number 1.", ["word1"])]
    assert all(isinstance(r["prediction"], str) and "<|im_end|>" not in r["prediction"] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["evaluation"]) == {"exact_match"} and summary["train_data"]["examples"] > 0
