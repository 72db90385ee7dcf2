"""Metrics on fixed inputs: against the scoring library's own result, a hand computation, or a documented value."""

from __future__ import annotations

import math

import pytest

from lorasens.evaluation import metrics as M
from lorasens.evaluation.predictions import group_e2e_rows, score_rows

# Two MRs x three references, one row per reference (as the E2E files and loaders have it).
MR1_REFS = ["the cat sat on the mat", "a cat is on a mat", "there is a cat"]
MR2_REFS = ["a dog runs", "the dog runs fast", "dogs run"]
ROWS = [{"id": f"r{i}", "prompt": mr, "prediction": hyp, "references": [ref]}
        for i, (mr, hyp, ref) in enumerate([("MR1", "the cat sat on the mat", r) for r in MR1_REFS]
                                           + [("MR2", "a dog runs fast", r) for r in MR2_REFS])]


def test_e2e_grouping_bleu_matches_hand_computation():
    grouped = group_e2e_rows(ROWS)
    assert [r["prompt"] for r in grouped] == ["MR1", "MR2"]
    assert [r["references"] for r in grouped] == [MR1_REFS, MR2_REFS]
    # By hand: MR1's hypothesis equals a reference (6/6, 5/5, 4/4, 3/3 n-grams, closest ref length 6);
    # MR2 "a dog runs fast": unigrams 4/4, bigrams 3/3 (a dog, dog runs | runs fast), trigrams 2/2, 4-gram 0/1,
    # closest ref length 4. Corpus: 10/10, 8/8, 6/6, 3/4, c = r = 10 -> BLEU = (3/4)^(1/4).
    expected = 100 * (3 / 4) ** 0.25
    assert M.bleu([r["prediction"] for r in grouped], [r["references"] for r in grouped]) == pytest.approx(expected, abs=1e-9)
    assert score_rows("e2e", ROWS)["bleu"] == pytest.approx(expected, abs=1e-9)
    # Scoring each row against its single reference (what the replaced tool did) gives a different, lower number.
    per_row = M.bleu([r["prediction"] for r in ROWS], [r["references"] for r in ROWS])
    assert per_row < expected - 10


def test_bleu_equals_sacrebleu():
    import sacrebleu

    hyps = ["The Eagle is a cheap pub.", "Blue Spice serves Italian food near the river."]
    refs = [["The Eagle is a cheap pub in the centre.", "A cheap pub: The Eagle."], ["Blue Spice is Italian, by the river.", "Blue Spice serves Italian food."]]
    expected = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs], [r[1] for r in refs]]).score
    assert M.bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 100


def test_nist_equals_nltk_on_13a_tokens():
    from nltk.translate.nist_score import corpus_nist

    hyps = ["the eagle is a cheap pub in the city centre", "blue spice serves italian food"]
    refs = [["the eagle is a cheap pub located in the city centre"], ["blue spice is an italian place", "blue spice serves italian food near the river"]]
    expected = corpus_nist([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps], n=5)
    assert M.nist(hyps, refs) == pytest.approx(expected, abs=1e-9)
    assert expected > 1


def test_meteor_equals_nltk_and_uses_wordnet():
    from nltk.translate.meteor_score import meteor_score

    hyps = ["the cat sat on the mat", "a dog runs quickly"]
    refs = [["the cat is sitting on the mat"], ["a dog runs fast", "the dog is running"]]
    M.ensure_wordnet()
    expected = 100 * (meteor_score([r.split() for r in refs[0]], hyps[0].split())
                      + meteor_score([r.split() for r in refs[1]], hyps[1].split())) / 2
    assert M.meteor(hyps, refs) == pytest.approx(expected, abs=1e-9)
    # Synonyms through WordNet: "sick" matches "ill", "green" matches nothing. (nltk looks synonyms up after
    # Porter stemming, so the pair must be stems already.)
    synonym = M.meteor(["the child was sick today"], [["the child was ill today"]])
    unrelated = M.meteor(["the child was green today"], [["the child was ill today"]])
    assert synonym > unrelated + 10


def test_meteor_without_wordnet_is_a_clear_user_error(monkeypatch, tmp_path):
    import nltk

    from lorasens.errors import UserError

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(UserError, match="WordNet.*make setup"):
        M.meteor(["a b"], [["a b"]])


def test_nltk_data_defaults_to_the_repo_folder(monkeypatch):
    import os

    import nltk

    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    if not (M.REPO_NLTK_DATA / "corpora" / "wordnet").exists():
        pytest.skip("WordNet not installed in the repo's .nltk_data (run make setup)")
    M.ensure_wordnet()
    assert os.environ["NLTK_DATA"] == str(M.REPO_NLTK_DATA)
    assert nltk.data.path[0] == str(M.REPO_NLTK_DATA)


def test_rouge_l_coco_definition():
    # Single reference: LCS("the cat sat on the mat", "the cat is on the mat") = 5 tokens -> P = R = 5/6, F = 5/6.
    assert M.rouge_l_coco(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(100 * 5 / 6)
    # Two references: best precision and best recall come from different references, then F with beta 1.2.
    # hyp "a b c d": ref1 "a b" -> LCS 2, P 2/4, R 2/2; ref2 "a b c d e f g h" -> LCS 4, P 4/4, R 4/8.
    p, r, beta = 1.0, 1.0, 1.2
    assert M.rouge_l_coco(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(100 * (1 + beta**2) * p * r / (r + beta**2 * p))


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    hyp = "She stayed at work. He went home early."
    ref = "He went home early. She stayed at work!"
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True).score(
        "He went home early.\nShe stayed at work!", "She stayed at work.\nHe went home early.")
    got = M.rouge([hyp], [ref])
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert got[key] == pytest.approx(100 * scores[key].fmeasure)
    # Sentences in swapped order: the summary-level LCS (Lsum) matches everything, plain LCS only one sentence.
    assert got["rougeLsum"] == pytest.approx(100) and got["rougeL"] < 60


def test_samsum_metrics_keys_and_perfect_prediction():
    refs = ["Amanda baked cookies and will bring Jerry some tomorrow."]
    m = M.samsum_metrics(refs, refs)
    assert set(m) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "meteor"}
    assert m["rouge1"] == pytest.approx(100) and m["bleu"] == pytest.approx(100)


def test_cider_d_equals_pycocoevalcap_value():
    # Documented value: pycocoevalcap 1.2 CiderScorer(n=4, sigma=6.0) on exactly these whitespace tokens
    # (computed once with that package; it is not a dependency) = 4.932146847537337.
    hyps = ["the eagle is a cheap pub in the city centre", "blue spice serves italian food near the river", "a coffee shop"]
    refs = [["the eagle is a cheap pub located in the city centre", "in the city centre there is a cheap pub called the eagle"],
            ["blue spice is an italian restaurant by the riverside", "near the river blue spice serves italian food", "blue spice offers italian food"],
            ["aromi is a coffee shop", "there is a coffee shop called aromi"]]
    from lorasens.evaluation.cider import cider_d

    assert cider_d([h.split() for h in hyps], [[r.split() for r in rs] for rs in refs]) == pytest.approx(4.932146847537337, rel=1e-12)
    assert M.cider(hyps, refs) == pytest.approx(4.932146847537337, rel=1e-12)  # lowercase, no punctuation: same tokens


def test_e2e_metrics_perfect_and_empty_predictions():
    refs = [MR1_REFS, MR2_REFS]
    perfect = M.e2e_metrics([MR1_REFS[0], MR2_REFS[1]], refs)
    assert perfect["bleu"] == pytest.approx(100) and perfect["rouge_l"] == pytest.approx(100)
    assert perfect["meteor"] > 99 and perfect["nist"] > 2 and perfect["cider"] > 0
    empty = M.e2e_metrics(["", ""], refs)
    assert empty == {"bleu": 0.0, "nist": 0.0, "meteor": 0.0, "rouge_l": 0.0, "cider": 0.0}


def test_mnli_generated_label_accuracy():
    preds = ["entailment", " Neutral.", "contradiction because ...", "yes", ""]
    refs = ["entailment", "neutral", "neutral", "entailment", "neutral"]
    assert M.mnli_metrics(preds, refs) == {"accuracy": pytest.approx(2 / 5)}


def test_scorer_lookup_lists_valid_names():
    from lorasens.data.registry import get_dataset_spec
    from lorasens.errors import UserError
    from lorasens.evaluation.predictions import score_e2e_rows

    # The dataset's registry entry names its scorer: the synthetic set is E2E-shaped and scored like E2E.
    assert get_dataset_spec("synthetic").evaluation.score_rows is score_e2e_rows
    assert get_dataset_spec("e2e").evaluation.score_rows is score_e2e_rows
    with pytest.raises(UserError, match="valid: e2e, mnli, samsum, synthetic, wikisql"):
        get_dataset_spec("squad")


def test_mismatched_lengths_are_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.bleu(["a", "b"], [["a"]])
    assert math.isfinite(M.bleu(["a b c d"], ["a b c d"]))


def test_nist_with_hypotheses_shorter_than_five_tokens():
    from nltk.translate.nist_score import corpus_nist

    # nltk divides by zero when no hypothesis has a 5-gram; mteval counts such orders as 0, so n drops to 2 here.
    hyps, refs = ["a b", "c"], [["a b c d e f"], ["c d"]]
    assert M.nist(hyps, refs) == pytest.approx(corpus_nist([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps], n=2))
    assert M.nist(["", ""], refs) == 0.0
