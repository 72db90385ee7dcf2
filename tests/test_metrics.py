"""Metrics on fixed inputs: against the scoring library's own result, a hand computation, or a documented value."""

from __future__ import annotations

import math

import pytest

from lorasens import metrics as M
from lorasens.data.e2e import group_e2e_rows
from lorasens.data.mnli import mnli_metrics
from lorasens.evaluation.predictions import score_rows

# Two MRs x three references, one row per reference (as the E2E files and loaders have it).
MR1_REFS = ["the cat sat on the mat", "a cat is on a mat", "there is a cat"]
MR2_REFS = ["a dog runs", "the dog runs fast", "dogs run"]
ROWS = [{"id": f"r{i}", "prompt": mr, "prediction": hyp, "references": [ref]}
        for i, (mr, hyp, ref) in enumerate([("MR1", "the cat sat on the mat", r) for r in MR1_REFS]
                                           + [("MR2", "a dog runs fast", r) for r in MR2_REFS])]


@pytest.mark.slow
def test_e2e_grouping_bleu_matches_hand_computation(monkeypatch):
    from lorasens.metrics import coco

    monkeypatch.setattr(coco, "java_available", lambda: False)  # BLEU only here: no METEOR process needed
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


def test_grouping_keeps_duplicate_references_as_the_official_scorer_does():
    from lorasens.data.e2e import make_examples
    from lorasens.data.registry import group_by_prompt

    pairs = [("MR1", "A pub."), ("MR1", "A cheap pub."), ("MR1", "A pub."), ("MR2", "A shop.")]
    # Loader form: every row of an MR carries all of its references.
    grouped = group_by_prompt(make_examples(pairs, "test"))
    assert [ex.references for ex in grouped] == [("A pub.", "A cheap pub.", "A pub."), ("A shop.",)]
    # Predictions-file form: one reference per row.
    rows = [{"id": i, "prompt": mr, "prediction": "A pub.", "references": [ref]} for i, (mr, ref) in enumerate(pairs)]
    assert [r["references"] for r in group_e2e_rows(rows)] == [["A pub.", "A cheap pub.", "A pub."], ["A shop."]]


def test_bleu_is_sacrebleu_13a_case_insensitive_like_mteval():
    import sacrebleu

    hyps = ["The Eagle is a cheap pub.", "Blue Spice serves Italian food near the river."]
    refs = [["The Eagle is a cheap pub in the centre.", "A cheap pub: The Eagle."], ["Blue Spice is Italian, by the river.", "Blue Spice serves Italian food."]]
    expected = sacrebleu.corpus_bleu([h.lower() for h in hyps], [[r[0].lower() for r in refs], [r[1].lower() for r in refs]]).score
    assert M.bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 100
    # mteval lowers both sides: the case of the output does not matter.
    assert M.bleu([h.upper() for h in hyps], refs) == pytest.approx(expected, abs=1e-9)
    assert M.bleu([h.lower() for h in hyps], refs) == pytest.approx(expected, abs=1e-9)
    # ...but like mteval's `tr/[A-Z]/[a-z]/` only ASCII letters are folded: "CAFÉ" stays "cafÉ", not "café".
    ref = [["café serves food near the town"]]
    assert M.bleu(["CAFÉ SERVES FOOD NEAR THE TOWN"], ref) < 100
    assert M.bleu(["CAFé SERVES FOOD NEAR THE TOWN"], ref) == pytest.approx(100)


def test_nist_by_hand_with_mteval_information_weights():
    # One segment, hypothesis = reference "a b": info(a) = info(b) = log2(2 words / 1) = 1, info(a b) =
    # log2(count(a) / count(a b)) = 0; NIST = (1 + 1) / 2 unigrams + 0 / 1 bigram = 1, no length penalty.
    assert M.nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    # Case-insensitive, 13a tokens: "A, B" is "a , b", three tokens of information log2(3) each; higher orders 0.
    assert M.nist(["A, B"], [["a , b"]]) == pytest.approx(math.log2(3))
    # "1 x" against "1 x y": unigrams log2(3) each over 2 unigrams, bigram "1 x" log2(1/1) = 0, and the length
    # penalty at ratio 2/3 is exactly 0.5 (mteval's beta puts 0.5 at ratio 1/1.5): NIST = log2(3) / 2.
    assert M.nist(["1 x"], [["1 x y"]]) == pytest.approx(math.log2(3) / 2)
    # mteval tests the bigram's prefix "0" for truth, and Perl's "0" is false: "0 x" gets log2(3 words / 1)
    # instead of 0. (The official scorer prints 1.5850 for this case.)
    assert M.nist(["0 x"], [["0 x y"]]) == pytest.approx(math.log2(3))
    # Every reference counts, duplicates too: doubling a reference changes nothing here (all counts double).
    assert M.nist(["a b"], [["a b", "a b"]]) == pytest.approx(1.0)
    assert M.nist(["a b"], [["a b", "c d e f"]]) != pytest.approx(1.0)
    # Orders no hypothesis reaches contribute 0; empty hypotheses score 0.
    assert M.nist(["", ""], [["a b"], ["c"]]) == 0.0


@pytest.mark.slow
def test_meteor_nltk_equals_nltk_and_uses_wordnet():
    from nltk.translate.meteor_score import meteor_score

    hyps = ["the cat sat on the mat", "a dog runs quickly"]
    refs = [["the cat is sitting on the mat"], ["a dog runs fast", "the dog is running"]]
    M.ensure_wordnet()
    expected = 100 * (meteor_score([r.split() for r in refs[0]], hyps[0].split())
                      + meteor_score([r.split() for r in refs[1]], hyps[1].split())) / 2
    assert M.meteor_nltk(hyps, refs) == pytest.approx(expected, abs=1e-9)
    # Synonyms through WordNet: "sick" matches "ill", "green" matches nothing. (nltk looks synonyms up after
    # Porter stemming, so the pair must be stems already.)
    synonym = M.meteor_nltk(["the child was sick today"], [["the child was ill today"]])
    unrelated = M.meteor_nltk(["the child was green today"], [["the child was ill today"]])
    assert synonym > unrelated + 10


def test_meteor_without_wordnet_is_a_clear_user_error(monkeypatch, tmp_path):
    import nltk

    from lorasens.errors import UserError

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(UserError, match="WordNet.*make setup"):
        M.meteor_nltk(["a b"], [["a b"]])


def test_meteor_readiness_needs_wordnet_only_without_java(monkeypatch, tmp_path):
    import nltk

    from lorasens.errors import UserError
    from lorasens.metrics import coco

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(coco, "java_available", lambda: True)
    M.ensure_meteor_ready()  # METEOR 1.5 brings its own synonym and paraphrase tables
    monkeypatch.setattr(coco, "java_available", lambda: False)
    with pytest.raises(UserError, match="WordNet"):
        M.ensure_meteor_ready()


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


def test_rouge_l_13a_is_the_coco_definition():
    from lorasens.metrics.coco import approximate_scores

    def rouge_l(hyps, refs):
        return approximate_scores(hyps, refs)["rouge_l_13a"]

    # Single reference: LCS("the cat sat on the mat", "the cat is on the mat") = 5 tokens -> P = R = 5/6, F = 5/6
    # (case and punctuation tokens do not count).
    assert rouge_l(["The cat sat on the mat."], [["the cat is on the mat"]]) == pytest.approx(100 * 5 / 6)
    # Two references: best precision and best recall come from different references, then F with beta 1.2.
    # hyp "a b c d": ref1 "a b" -> LCS 2, P 2/4, R 2/2; ref2 "a b c d e f g h" -> LCS 4, P 4/4, R 4/8.
    p, r, beta = 1.0, 1.0, 1.2
    assert rouge_l(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(100 * (1 + beta**2) * p * r / (r + beta**2 * p))


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


def test_samsum_rouge_pinned_to_rouge_score_with_stemming_and_max_over_references():
    from rouge_score import rouge_scorer

    # Stemming: "baked"/"bakes", "cookies"/"cookie" match; the best of two references counts, per measure.
    hyp = "Amanda baked cookies. She will bring them tomorrow."
    refs = ["Amanda bakes a cookie and brings it tomorrow.", "Jerry wants cookies."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    got = M.rouge([hyp], [refs])
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(100 * max(scorer.score(r, hyp)[key].fmeasure for r in refs))
    split_hyp = "Amanda baked cookies.\nShe will bring them tomorrow."
    assert got["rougeLsum"] == pytest.approx(100 * max(scorer.score(r, split_hyp)["rougeLsum"].fmeasure for r in refs))
    unstemmed = rouge_scorer.RougeScorer(["rouge1"]).score(refs[0], hyp)["rouge1"].fmeasure
    assert got["rouge1"] > 100 * unstemmed + 10


def test_samsum_metrics_keys_and_perfect_prediction(monkeypatch):
    from lorasens.metrics import coco

    refs = ["Amanda baked cookies and will bring Jerry some tomorrow."]
    monkeypatch.setattr(coco, "java_available", lambda: False)
    m = M.samsum_metrics(refs, refs)
    assert set(m) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "meteor_nltk", "metrics_note"}
    assert m["rouge1"] == pytest.approx(100) and m["bleu"] == pytest.approx(100) and "Java" in m["metrics_note"]


def test_cider_13a_equals_a_pycocoevalcap_value():
    # Documented value: pycocoevalcap 1.2 CiderScorer(n=4, sigma=6.0) on exactly these whitespace tokens
    # = 4.932146847537337 (computed with that package before lorasens depended on it).
    hyps = ["the eagle is a cheap pub in the city centre", "blue spice serves italian food near the river", "a coffee shop"]
    refs = [["the eagle is a cheap pub located in the city centre", "in the city centre there is a cheap pub called the eagle"],
            ["blue spice is an italian restaurant by the riverside", "near the river blue spice serves italian food", "blue spice offers italian food"],
            ["aromi is a coffee shop", "there is a coffee shop called aromi"]]
    from lorasens.metrics.coco import approximate_scores

    # Upper case and punctuation go (lowercased 13a tokens without punctuation): the same tokens, the same value.
    shouted = [h.upper() + "." for h in hyps]
    assert approximate_scores(shouted, refs)["cider_13a"] == pytest.approx(4.932146847537337, rel=1e-12)


@pytest.mark.slow
def test_e2e_metrics_without_java_use_other_names_and_say_so(monkeypatch):
    from lorasens.metrics import coco

    monkeypatch.setattr(coco, "java_available", lambda: False)
    refs = [MR1_REFS, MR2_REFS]
    m = M.e2e_metrics([MR1_REFS[0], MR2_REFS[1]], refs)
    assert list(m) == ["bleu", "nist", "meteor_nltk", "rouge_l_13a", "cider_13a", "metrics_note"]
    assert "not comparable with published" in m["metrics_note"]
    assert m["bleu"] == pytest.approx(100) and m["rouge_l_13a"] == pytest.approx(100) and m["meteor_nltk"] > 99
    empty = M.e2e_metrics(["", ""], refs)
    assert {k: v for k, v in empty.items() if k != "metrics_note"} == {
        "bleu": 0.0, "nist": 0.0, "meteor_nltk": 0.0, "rouge_l_13a": 0.0, "cider_13a": 0.0}


def test_mnli_labels_words_glue_ids_and_unlabelled_rows():
    from lorasens.errors import UserError

    preds = ["entailment", " Neutral.", "contradiction because ...", "yes", "", "1", "2", "entailment"]
    refs = ["entailment", "neutral", "neutral", "entailment", "neutral", "1", "0", "-1"]
    # 7 labelled pairs (the last reference is GLUE's -1, excluded); correct: #0, #1 and #5 ("1" = neutral = "1").
    assert mnli_metrics(preds, refs) == {"accuracy": pytest.approx(3 / 7), "unlabelled_excluded": 1}
    assert mnli_metrics(["0", "x"], ["entailment", "-"]) == {"accuracy": 1.0, "unlabelled_excluded": 1}
    assert mnli_metrics(["0"], ["-"]) == {"accuracy": None, "unlabelled_excluded": 1}
    with pytest.raises(UserError, match="'maybe' are not one of entailment, neutral, contradiction"):
        mnli_metrics(["entailment"], ["maybe"])


def test_scorer_lookup_lists_valid_names():
    from lorasens.data.registry import get_dataset_spec
    from lorasens.errors import UserError
    from lorasens.data.e2e import score_e2e_rows

    # The dataset's registry entry names its scorer: the synthetic set is E2E-shaped and scored like E2E.
    assert get_dataset_spec("synthetic").evaluation.score_rows is score_e2e_rows
    assert get_dataset_spec("e2e").evaluation.score_rows is score_e2e_rows
    with pytest.raises(UserError, match="valid: custom, e2e, mnli, samsum, synthetic, wikisql"):
        get_dataset_spec("squad")


def test_mismatched_lengths_are_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.bleu(["a", "b"], [["a"]])
    assert math.isfinite(M.bleu(["a b c d"], ["a b c d"]))
