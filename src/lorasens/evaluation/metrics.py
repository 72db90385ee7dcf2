"""Metrics as pure functions `(predictions, references) -> dict[str, float]`; heavy scorers import lazily.

`references[i]` is the list of references of prediction `i` (a single string is one reference). Scales follow
the literature each dataset is compared with: BLEU, METEOR and ROUGE in points (0-100, as in the LoRA paper's E2E
table: BLEU 70.4, METEOR 46.8, ROUGE-L 71.8), NIST and CIDEr as they come (8.85, 2.53), accuracies as fractions.

- BLEU: sacrebleu `corpus_bleu`, 13a tokenisation (mteval-v13a, what the E2E scripts use), references of unequal
  number per segment padded with None (sacrebleu skips them).
- NIST: nltk `corpus_nist`, n = 5, on 13a tokens.
- METEOR: nltk `meteor_score` (max over references, lowercased, WordNet synonyms) on 13a tokens, averaged over
  segments. nltk's METEOR is a re-implementation of METEOR 1.0-style matching (exact, stem, synonym); the E2E
  scripts run METEOR 1.5 in Java, so small differences from published METEOR values are expected.
- ROUGE-L for E2E: coco-caption's multi-reference definition (the E2E scripts call it): the LCS precision and
  recall of the best reference each, combined with beta = 1.2; LCS precision/recall come from rouge-score.
- ROUGE-1/2/L/Lsum for SAMSum: rouge-score with the Porter stemmer, F-measure, max over references; for Lsum
  sentences are split at . ! ? followed by white space (nltk's punkt model is not available offline).
- CIDEr: CIDEr-D, see `lorasens.evaluation.cider`, on lowercased 13a tokens without punctuation tokens (the
  coco-caption PTB tokeniser drops punctuation).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Sequence
from pathlib import Path

from lorasens.errors import UserError

References = Sequence[str | Sequence[str]]
# The repo's own WordNet folder (make setup -> scripts/fetch_wordnet.py); src/lorasens/evaluation/ -> repo root.
REPO_NLTK_DATA = Path(__file__).resolve().parents[3] / ".nltk_data"
_PUNCT = set(string.punctuation)


def _ref_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference")
    return refs


def tokenize(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.strip()).split()


def ensure_wordnet() -> None:
    """Point nltk at WordNet (NLTK_DATA, else the repo's .nltk_data) or raise a `UserError` saying how to get it."""
    if not os.environ.get("NLTK_DATA"):
        os.environ["NLTK_DATA"] = str(REPO_NLTK_DATA)
    import nltk

    for folder in reversed(os.environ["NLTK_DATA"].split(os.pathsep)):
        if folder and folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        raise UserError(
            f"METEOR needs WordNet, not found in NLTK_DATA={os.environ['NLTK_DATA']}: run `make setup` (it runs "
            "scripts/fetch_wordnet.py .nltk_data) or point NLTK_DATA at a folder holding corpora/wordnet"
        ) from None


# ------------------------------------------------------------------------------------------- single measures


def bleu(predictions: Sequence[str], references: References) -> float:
    import sacrebleu

    refs = _ref_lists(predictions, references)
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def nist(predictions: Sequence[str], references: References, n: int = 5) -> float:
    from nltk.translate.nist_score import corpus_nist

    refs = _ref_lists(predictions, references)
    hyps = [tokenize(p) for p in predictions]
    # An order no hypothesis reaches contributes 0 (mteval), but nltk divides by its zero count: leave it out.
    n = min(n, max(len(h) for h in hyps))
    if n == 0:
        return 0.0
    return float(corpus_nist([[tokenize(r) for r in rs] for rs in refs], hyps, n=n))


def meteor(predictions: Sequence[str], references: References) -> float:
    refs = _ref_lists(predictions, references)
    ensure_wordnet()
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([tokenize(r) for r in rs], tokenize(p)) for p, rs in zip(predictions, refs)]
    return 100.0 * sum(scores) / len(scores)


def rouge_l_coco(predictions: Sequence[str], references: References, beta: float = 1.2) -> float:
    from rouge_score import rouge_scorer

    refs = _ref_lists(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    total = 0.0
    for p, rs in zip(predictions, refs):
        scores = [scorer.score(r, p)["rougeL"] for r in rs]
        prec, rec = max(s.precision for s in scores), max(s.recall for s in scores)
        if prec and rec:
            total += (1 + beta**2) * prec * rec / (rec + beta**2 * prec)
    return 100.0 * total / len(refs)


def _split_sentences(text: str) -> str:
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: Sequence[str], references: References) -> dict[str, float]:
    from rouge_score import rouge_scorer

    refs = _ref_lists(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    sums = dict.fromkeys(kinds, 0.0)
    for p, rs in zip(predictions, refs):
        scores = scorer.score_multi([_split_sentences(r) for r in rs], _split_sentences(p))
        for k in kinds:
            sums[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(refs) for k, v in sums.items()}


def cider(predictions: Sequence[str], references: References) -> float:
    from lorasens.evaluation.cider import cider_d

    def toks(text: str) -> list[str]:
        return [t for t in tokenize(text.lower()) if not all(c in _PUNCT for c in t)]

    refs = _ref_lists(predictions, references)
    return cider_d([toks(p) for p in predictions], [[toks(r) for r in rs] for rs in refs])


# -------------------------------------------------------------------------------------------- per dataset


def e2e_metrics(predictions: Sequence[str], references: References) -> dict[str, float]:
    """The official E2E set; call with one prediction per distinct MR and all of its references."""
    return {
        "bleu": bleu(predictions, references),
        "nist": nist(predictions, references),
        "meteor": meteor(predictions, references),
        "rouge_l": rouge_l_coco(predictions, references),
        "cider": cider(predictions, references),
    }


def samsum_metrics(predictions: Sequence[str], references: References) -> dict[str, float]:
    scores = rouge(predictions, references)
    return {
        "rouge1": scores["rouge1"], "rouge2": scores["rouge2"], "rougeL": scores["rougeL"],
        "rougeLsum": scores["rougeLsum"], "bleu": bleu(predictions, references), "meteor": meteor(predictions, references),
    }


def first_label_word(text: str) -> str:
    """The label a generation names: its first word, lowercased, without punctuation."""
    match = re.search(r"[A-Za-z]+", text)
    return match.group(0).lower() if match else ""


def mnli_metrics(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Accuracy of generated labels (the first word of each prediction against the gold label)."""
    refs = _ref_lists(predictions, references)
    correct = sum(first_label_word(p) == rs[0].strip().lower() for p, rs in zip(predictions, refs))
    return {"accuracy": correct / len(refs)}
