"""E2E metrics equal the official E2E NLG scorer's output on the same inputs (inputs: tests/official_e2e_cases.py).

How the expected values were obtained (once, outside the repository; nothing of the official code is in lorasens):
tuetschek/e2e-metrics at commit 1b9c4d87fd0bbb171ea966741cdc012588581ed4, its jar files taken from the PyPI wheel
pycocoevalcap 1.2 (git blob hashes identical to the ones the repository lists), Python 3.11 with numpy, future,
matplotlib, scikit-image; Perl 5.36 with XML::Twig (Debian libxml-twig-perl); OpenJDK 17.0.15. Each case was
written as the plain-text files `measure_scores.py` reads (SYS: one prediction a line; REF: one reference a line,
a blank line between instances) and scored with

    ./measure_scores.py REF.txt SYS.txt

whose default runs the Perl mteval-v13a-sig.pl for BLEU and NIST (printed with 4 decimals: BLEU 0-1, shown here
x100) and coco-caption for METEOR, ROUGE_L and CIDEr, whose full-precision values were read from the same run's
`COCOEvalCap.eval` (METEOR and ROUGE_L shown x100, lorasens' scale). The upper-cased variant shows why BLEU/NIST
lower ASCII letters only, as mteval's `tr/[A-Z]/[a-z]/` does: Python's `lower()` (sacrebleu `lowercase=True`)
turns "CAFÉ" into "café" and gives 56.27 / 7.243 there instead of the official 55.76 / 7.2795.

Tolerances: 0.01 BLEU points, 0.005 NIST (the official output has 4 decimals); METEOR, ROUGE-L and CIDEr are the
same code on the same tokens, so they must agree to rounding.
"""

from __future__ import annotations

import pytest

from conftest import ci_requires, shared_path
from lorasens import metrics as M
from lorasens.metrics.coco import NO_JAVA, java_available
from official_e2e_cases import CASES, HANDMADE, devset_case

requires_java = pytest.mark.skipif(not java_available(), reason=NO_JAVA.split(":")[0] + ": METEOR 1.5 and the PTB "
                                   "tokeniser cannot run (make test installs default-jre-headless where apt can run)")

# Official values: see the module docstring.
OFFICIAL = {
    "handmade": {"bleu": 67.14, "nist": 5.4629, "meteor": 54.38378008883696, "rouge_l": 76.32140240250531,
                 "cider": 5.031871590892999},
    "dev40_as_is": {"bleu": 56.27, "nist": 7.3130, "meteor": 43.086443105674477, "rouge_l": 64.70399187442857,
                    "cider": 1.5109644696876674},
    "dev40_lower": {"bleu": 56.27, "nist": 7.3130, "meteor": 43.086443105674477, "rouge_l": 64.70399187442857,
                    "cider": 1.5109644696876674},
    "dev40_upper": {"bleu": 55.76, "nist": 7.2795, "meteor": 43.086443105674477, "rouge_l": 64.70399187442857,
                    "cider": 1.5109644696876674},
    "devall_as_is": {"bleu": 59.95, "nist": 8.5789, "meteor": 44.981839096765414, "rouge_l": 65.28351319176511,
                     "cider": 1.8542754607258303},
    "devall_lower": {"bleu": 59.95, "nist": 8.5789, "meteor": 44.981839096765414, "rouge_l": 65.28351319176511,
                     "cider": 1.8542754607258303},
    "devall_upper": {"bleu": 59.19, "nist": 8.4987, "meteor": 44.981839096765414, "rouge_l": 65.28351319176511,
                     "cider": 1.8542754607258303},
}
TOLERANCE = {"bleu": 0.01, "nist": 0.005, "meteor": 1e-6, "rouge_l": 1e-6, "cider": 1e-6}


def _check(got: dict, expected: dict, names: tuple[str, ...]) -> None:
    for name in names:
        assert got[name] == pytest.approx(expected[name], abs=TOLERANCE[name]), name


def _handmade() -> tuple[list[str], list[list[str]]]:
    return [p for p, _ in HANDMADE], [r for _, r in HANDMADE]


def _dev(num_mrs: int | None, case: str) -> tuple[list[str], list[list[str]]]:
    return devset_case(shared_path("data", "e2e", "devset.csv"), num_mrs, case)


def test_bleu_nist_equal_official_on_handmade_sentences():
    preds, refs = _handmade()
    _check({"bleu": M.bleu(preds, refs), "nist": M.nist(preds, refs)}, OFFICIAL["handmade"], ("bleu", "nist"))


@requires_java
def test_meteor_rouge_cider_equal_official_on_handmade_sentences():
    preds, refs = _handmade()
    got = M.e2e_metrics(preds, refs)
    assert list(got) == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    _check(got, OFFICIAL["handmade"], tuple(TOLERANCE))


@pytest.mark.shared
@pytest.mark.parametrize("case", CASES)
def test_bleu_nist_equal_official_on_devset_file(case):
    preds, refs = _dev(40, case)
    assert len(preds) == 40 and sum(map(len, refs)) == 318
    _check({"bleu": M.bleu(preds, refs), "nist": M.nist(preds, refs)}, OFFICIAL[f"dev40_{case}"], ("bleu", "nist"))


@pytest.mark.slow
@pytest.mark.shared
@requires_java
@pytest.mark.parametrize("case", CASES)
def test_meteor_rouge_cider_equal_official_on_devset_file(case):
    preds, refs = _dev(40, case)
    _check(M.e2e_metrics(preds, refs), OFFICIAL[f"dev40_{case}"], tuple(TOLERANCE))


@pytest.mark.shared
def test_duplicate_references_count_as_the_official_scorer_counts_them():
    # Several of the 40 MRs repeat a reference; dropping the repeats changes the scores away from the official ones.
    preds, refs = _dev(40, "as_is")
    deduped = [list(dict.fromkeys(rs)) for rs in refs]
    assert sum(map(len, deduped)) < sum(map(len, refs))
    assert abs(M.nist(preds, deduped) - OFFICIAL["dev40_as_is"]["nist"]) > 0.005


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("case", CASES)
def test_all_metrics_equal_official_on_the_whole_devset(case):
    # All 547 dev MRs (4,125 references, 110 of them repeats within their MR); ~1 min per case on a loaded 2-core CPU.
    preds, refs = _dev(None, case)
    assert len(preds) == 547 and sum(map(len, refs)) == 4125
    got = M.e2e_metrics(preds, refs) if ci_requires(java_available(), "Java (official METEOR)") else {"bleu": M.bleu(preds, refs), "nist": M.nist(preds, refs)}
    _check(got, OFFICIAL[f"devall_{case}"], tuple(name for name in TOLERANCE if name in got))


@requires_java
def test_meteor_process_is_shared_then_stopped():
    # Last in this file: it stops the shared METEOR process (the next scoring starts a new one).
    from lorasens.metrics import coco

    first = coco.official_scores(["the pub is cheap"], [["the pub is cheap", "a cheap pub"]])
    process = coco._METEOR.meteor_p
    assert process.poll() is None  # running, kept for the next call
    assert coco.official_scores(["the pub is cheap"], [["the pub is cheap", "a cheap pub"]]) == first
    assert coco._METEOR.meteor_p is process
    coco.close_meteor()
    assert process.poll() is not None and coco._METEOR is None  # stopped and reaped
    assert process.stdin.closed and process.stdout.closed
    coco.close_meteor()  # a second close is harmless
