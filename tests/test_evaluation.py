"""Evaluation: batched generation, label log-likelihoods, the runner's files, `lorasens eval` and `lorasens score`."""

from __future__ import annotations

from types import SimpleNamespace

import json
from pathlib import Path

import pytest

from conftest import ci_requires
import torch

from lorasens.cli import main
from lorasens.config import ExperimentConfig, save_config
from lorasens.evaluation.generation import generate, label_loglikelihoods

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = ["Meaning representation: name[Aromi]\nDescription:", "Hi", "A much longer prompt, with more tokens in it than the others.",
           "Premise: a\nHypothesis: b\nAnswer:", "x" * 30, "Question: what?\nSQL:", "Table columns: A | B\nQuestion: q\nSQL:"]


@pytest.fixture(scope="module")
def lora_model():
    return _lora_model()


def _lora_model(seed: int = 0, perturb: bool = True):
    """tiny-random-llama with LoRA on every module; B set non-zero so the adapter changes the outputs."""
    from lorasens.model.lora import apply_lora, targets_for
    from lorasens.model.loading import load_model
    from lorasens.model.module_map import build_module_map

    loaded = load_model("tiny-random-llama", "fp32", seed=seed)
    model = apply_lora(loaded.model, targets_for(build_module_map(loaded.model), "both"), 8, 16.0, 0.0)
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval(), loaded.tokenizer


def test_batched_generation_equals_one_at_a_time(tiny_llama):
    model, tok = tiny_llama.model.eval(), tiny_llama.tokenizer
    kwargs = {"max_new_tokens": 10, "stop_strings": ("\n",)}
    single = [generate(model, tok, [p], batch_size=1, **kwargs)[0] for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, batch_size=4, **kwargs)
    assert batched == single
    assert len({len(s) for s in single}) > 1  # not all trivially empty or equal


def test_generation_equals_a_manual_greedy_loop_without_cache(tiny_llama):
    from lorasens.data.features import encode_prompt

    model, tok = tiny_llama.model.eval(), tiny_llama.tokenizer
    ids = encode_prompt(tok, PROMPTS[0])
    with torch.no_grad():
        for _ in range(10):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    manual = tok.decode(ids[len(encode_prompt(tok, PROMPTS[0])):], skip_special_tokens=True)
    got = generate(model, tok, [PROMPTS[0], PROMPTS[2]], max_new_tokens=10, batch_size=2, stop_strings=())[0]
    assert got == manual.strip()


def test_stop_strings_cut_the_prediction(tiny_llama):
    model, tok = tiny_llama.model.eval(), tiny_llama.tokenizer
    full = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=7, stop_strings=())
    stop = next(ch for text in full for ch in text[1:] if ch.isalnum())  # a character some prediction contains
    cut = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=7, stop_strings=(stop,))
    for a, b in zip(full, cut):
        assert b == a.split(stop)[0].strip() if stop in a else b == a


def test_label_loglikelihoods_equal_a_direct_computation(tiny_llama):
    from lorasens.data.features import encode_prompt

    model, tok = tiny_llama.model.eval(), tiny_llama.tokenizer
    labels = ["entailment", "neutral", "contradiction"]
    scores = label_loglikelihoods(model, tok, PROMPTS[:3], labels, batch_size=4)
    for p, prompt in enumerate(PROMPTS[:3]):
        for k, label in enumerate(labels):
            prefix = encode_prompt(tok, prompt)
            target = tok(" " + label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prefix + target])).logits[0], -1)
            expected = sum(float(logp[len(prefix) + i - 1, t]) for i, t in enumerate(target))
            assert scores[p][k] == pytest.approx(expected, abs=1e-4)


def _cfg(dataset: str, data_dir=None, **evaluation) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.model, cfg.model.precision = "tiny-random-llama", "fp32"
    cfg.data.dataset, cfg.data.data_dir, cfg.data.max_length, cfg.data.eval_samples = dataset, data_dir, 128, 5
    cfg.training.seed = 0
    cfg.evaluation.max_new_tokens, cfg.evaluation.eval_batch_size = 8, 4
    for key, value in evaluation.items():
        setattr(cfg.evaluation, key, value)
    return cfg


@pytest.mark.slow
def test_evaluate_after_training_writes_files_and_baseline(tmp_path, lora_model):
    from lorasens.evaluation.runner import evaluate_after_training
    from lorasens.model.loading import load_model

    model, tok = lora_model
    cfg = _cfg("synthetic", baseline=True)
    out = evaluate_after_training(SimpleNamespace(cfg=cfg, model=model, tokenizer=tok, run_dir=tmp_path))
    assert set(out["evaluation"]) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert set(out["evaluation_baseline"]) == set(out["evaluation"])
    result = json.loads((tmp_path / "synthetic_evaluation.json").read_text())
    assert result["dataset"] == "synthetic" and result["split"] == "test" and result["num_examples"] == 5
    assert result["settings"]["max_new_tokens"] == 8 and result["baseline"]["metrics"] == out["evaluation_baseline"]
    rows = [json.loads(line) for line in (tmp_path / "synthetic_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and len({r["prompt"] for r in rows}) == 5  # distinct MRs
    assert all(len(r["references"]) == 3 and {"id", "prompt", "prediction", "references"} <= set(r) for r in rows)
    # The baseline is the base model without LoRA: same predictions as the base model built on its own.
    base = load_model("tiny-random-llama", "fp32", seed=0).model.eval()
    plain = generate(base, tok, [r["prompt"] for r in rows], max_new_tokens=8, batch_size=4, max_prompt_tokens=128)
    assert [r["baseline_prediction"] for r in rows] == plain
    assert [r["prediction"] for r in rows] != plain  # the (perturbed) adapter changes the outputs
    assert model.training is False


def test_evaluation_off_returns_nothing(tmp_path):
    from lorasens.evaluation.runner import evaluate_after_training

    cfg = _cfg("synthetic")
    cfg.evaluation.evaluate = False
    assert evaluate_after_training(SimpleNamespace(cfg=cfg, model=None, tokenizer=None, run_dir=tmp_path)) == {}
    assert list(tmp_path.iterdir()) == []


def test_mnli_evaluation_scores_matched_and_mismatched(tmp_path, lora_model):
    from lorasens.evaluation.runner import evaluate_model, settings_from_config

    model, tok = lora_model
    cfg = _cfg("mnli", str(FIXTURES / "mnli"))
    result = evaluate_model(model, tok, cfg, settings_from_config(cfg), run_dir=tmp_path)
    m = result["metrics"]
    assert m["num_matched"] == 4 and m["num_mismatched"] == 3
    for key in ("accuracy_matched", "generated_accuracy_matched", "accuracy_mismatched", "generated_accuracy_mismatched"):
        assert 0.0 <= m[key] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "mnli_predictions.jsonl").read_text().splitlines()]
    assert {r["subset"] for r in rows} == {"matched", "mismatched"}
    assert all(r["ll_prediction"] in ("entailment", "neutral", "contradiction") for r in rows)
    gold = [r["references"][0] for r in rows if r["subset"] == "matched"]
    ll = [r["ll_prediction"] for r in rows if r["subset"] == "matched"]
    assert m["accuracy_matched"] == pytest.approx(sum(a == b for a, b in zip(ll, gold)) / 4)


def test_mnli_without_mismatched_is_unavailable(tmp_path, lora_model):
    from lorasens.evaluation.runner import evaluate_model, settings_from_config

    data = tmp_path / "mnli"
    data.mkdir()
    (data / "dev_matched.jsonl").write_text((FIXTURES / "mnli" / "dev_matched.jsonl").read_text() * 1)
    (data / "train.tsv").write_text((FIXTURES / "mnli" / "train.tsv").read_text())
    model, tok = lora_model
    cfg = _cfg("mnli", str(data))
    cfg.evaluation.max_new_tokens = 2
    m = evaluate_model(model, tok, cfg, settings_from_config(cfg))["metrics"]
    assert m["accuracy_mismatched"] is None and "dev_mismatched" in m["accuracy_mismatched_unavailable"]
    assert m["accuracy_matched"] is not None


def _fake_run(tmp_path: Path, lora_model, dataset: str = "wikisql") -> Path:
    """A run directory as `lorasens train` leaves it (config.json + final_model/), without training."""
    run_dir = tmp_path / "run"
    (run_dir / "final_model").mkdir(parents=True)
    save_config(_cfg(dataset, str(FIXTURES / dataset)), run_dir / "config.json")
    model, tok = lora_model
    model.save_pretrained(run_dir / "final_model")
    tok.save_pretrained(run_dir / "final_model")
    return run_dir


def test_eval_command_on_a_run_directory(tmp_path, capsys, lora_model):
    run_dir = _fake_run(tmp_path, lora_model)
    assert main(["eval", str(run_dir), "--num_samples", "3", "--batch_size", "2", "--baseline"]) == 0
    result = json.loads((run_dir / "wikisql_evaluation.json").read_text())
    assert result["num_examples"] == 3 and result["settings"]["batch_size"] == 2
    assert set(result["metrics"]) >= {"exact_string_match", "logical_form_accuracy", "execution_accuracy"}
    assert result["baseline"] is not None
    rows = [json.loads(line) for line in (run_dir / "wikisql_predictions.jsonl").read_text().splitlines()]
    assert all(r["table"]["header"] for r in rows)
    assert "wikisql_evaluation.json" in capsys.readouterr().out
    # The predictions file scores to the same numbers with `lorasens score`.
    assert main(["score", "wikisql", str(run_dir / "wikisql_predictions.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == result["metrics"]
    assert main(["eval", str(run_dir), "--split", "train"]) == 2  # never evaluate on the training split


@pytest.mark.slow
def test_python_api_on_a_run_and_on_a_base_model(tmp_path, lora_model):
    from lorasens.evaluation import evaluate_e2e, evaluate_wikisql

    run_dir = _fake_run(tmp_path, lora_model)
    m = evaluate_wikisql(model_path=str(run_dir), num_samples=2, batch_size=2, data_dir=str(FIXTURES / "wikisql"), max_new_tokens=6)
    assert set(m) >= {"exact_string_match", "logical_form_accuracy", "execution_accuracy"}
    m = evaluate_e2e(base_model_id="tiny-random-llama", num_samples=2, batch_size=2, data_dir=str(FIXTURES / "e2e"),
                     max_new_tokens=6, output_dir=str(tmp_path / "out"))
    from lorasens.metrics.coco import java_available

    official = {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert set(m) == (official if ci_requires(java_available(), "Java (official METEOR)") else {"bleu", "nist", "meteor_nltk", "rouge_l_13a", "cider_13a", "metrics_note"})
    rows = (tmp_path / "out" / "e2e_predictions.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(len(json.loads(r)["references"]) == 3 for r in rows)


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ('{"id": 1, "prompt": "p", "prediction": "x", "references": ["y"]}\n{"id": 2, "prompt": "p"\n', ":2: not valid JSON"),
    ('{"id": 1, "prompt": "p", "prediction": "x", "references": ["y"]}\n{"id": 2, "prompt": "p", "prediction": "x"}\n',
     r":2: missing field\(s\) references; required: id, prompt, prediction, references"),
    ('{"id": 1, "prompt": "p", "prediction": "x", "references": []}\n', ":1: references must be a non-empty list"),
    ('["not", "an", "object"]\n', ":1: line is not a JSON object"),
])
def test_score_bad_predictions_file_exits_2_naming_file_and_line(tmp_path, capsys, content, message):
    import re

    path = tmp_path / "preds.jsonl"
    path.write_text(content)
    assert main(["score", "e2e", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and re.search(message, err), err


def test_score_unknown_dataset_lists_choices(tmp_path, capsys):
    assert main(["score", "squad", str(tmp_path / "x.jsonl")]) == 2
    assert "valid: custom, e2e, mnli, samsum, synthetic, wikisql" in capsys.readouterr().err


@pytest.mark.slow
def test_score_e2e_groups_rows_by_mr(tmp_path, capsys):
    rows = [{"id": i, "prompt": mr, "prediction": hyp, "references": [ref]} for i, (mr, hyp, ref) in enumerate([
        ("MR1", "the cat sat on the mat", "the cat sat on the mat"), ("MR1", "the cat sat on the mat", "a cat is on a mat"),
        ("MR2", "a dog runs fast", "a dog runs"), ("MR2", "a dog runs fast", "the dog runs fast")])]
    path = tmp_path / "e2e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "e2e", str(path), "--output", str(tmp_path / "m.json")]) == 0
    bleu = json.loads(capsys.readouterr().out)["metrics"]["bleu"]
    assert bleu == pytest.approx(100 * 0.75**0.25)  # see test_metrics: hand computation
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["bleu"] == bleu


@pytest.mark.slow
def test_score_samsum_and_mnli_files(tmp_path, capsys):
    from rouge_score import rouge_scorer

    summaries = [("Amanda baked cookies and will bring Jerry some.", "Amanda baked cookies and will bring Jerry some tomorrow."),
                 ("Olivia votes liberal.", "Olivia and Olivier are voting for liberals in this election.")]
    path = tmp_path / "samsum.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": "p", "prediction": p, "references": [r]}) + "\n"
                            for i, (p, r) in enumerate(summaries)))
    assert main(["score", "samsum", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    expected = 100 * sum(scorer.score(r, p)["rouge2"].fmeasure for p, r in summaries) / 2
    assert metrics["rouge2"] == pytest.approx(expected)

    rows = [("entailment", "entailment", "matched", "neutral"), ("neutral", "contradiction", "matched", "neutral"),
            ("contradiction", "contradiction", "mismatched", "contradiction")]
    path = tmp_path / "mnli.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": "p", "prediction": gen, "references": [gold], "subset": sub,
                                        "ll_prediction": ll}) + "\n" for i, (gold, ll, sub, gen) in enumerate(rows)))
    assert main(["score", "mnli", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics == {"accuracy_matched": 0.5, "generated_accuracy_matched": 0.5, "num_matched": 2,
                       "unlabelled_excluded_matched": 0, "accuracy_mismatched": 1.0, "generated_accuracy_mismatched": 1.0,
                       "num_mismatched": 1, "unlabelled_excluded_mismatched": 0}


def test_score_mnli_with_glue_integer_labels_and_unlabelled_rows(tmp_path, capsys):
    # GLUE's integer ids (0 entailment, 1 neutral, 2 contradiction) in references and predictions, as JSON numbers or
    # text; -1 and "-" mark pairs without a gold label: excluded, and counted.
    rows = [(0, "entailment", "0"), (1, 1, "neutral"), (2, "2", 0), ("contradiction", 2, "2"), (-1, 0, "0"), ("-", 1, "1")]
    path = tmp_path / "mnli.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": "p", "prediction": gen, "references": [gold],
                                        "ll_prediction": ll}) + "\n" for i, (gold, ll, gen) in enumerate(rows)))
    assert main(["score", "mnli", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    # Labelled: 4 rows; log-likelihood labels all right; generated: row 2 says entailment for contradiction.
    assert metrics == {"accuracy_all": 1.0, "generated_accuracy_all": 0.75, "num_all": 4, "unlabelled_excluded_all": 2}
