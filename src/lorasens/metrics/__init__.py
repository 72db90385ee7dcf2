"""Metrics as pure functions `(predictions, references) -> dict[str, float]`; heavy scorers import lazily.

`references[i]` is the list of references of prediction `i` (a single string is one reference); every reference
counts, duplicates included, as in the official scorers. Scales follow the literature each dataset is compared
with: BLEU, METEOR and ROUGE in points (0-100, as in the LoRA paper's E2E table: BLEU 70.4, METEOR 46.8, ROUGE-L
71.8), NIST and CIDEr as they come (8.85, 2.53), accuracies as fractions.

- BLEU, NIST: mteval-v13a.pl, as the E2E scripts run it (case-insensitive, 13a tokens, all references); see
  `lorasens.metrics.mteval`.
- METEOR, ROUGE-L (E2E), CIDEr: METEOR 1.5, coco-caption ROUGE-L and CIDEr-D on PTB tokens, through pycocoevalcap,
  exactly as the E2E scripts; see `lorasens.metrics.coco`. They need Java; without it the pure-Python stand-ins
  are reported under other names (`meteor_nltk`, `rouge_l_13a`, `cider_13a`) with a `metrics_note` saying so.
- `meteor_nltk`: nltk `meteor_score` (METEOR 1.0-style exact/stem/WordNet matching, max over references,
  lowercased) on 13a tokens, averaged over segments: typically tens of points away from METEOR 1.5.
- ROUGE-1/2/L/Lsum for SAMSum: rouge-score with the Porter stemmer, F-measure, max over references; for Lsum
  sentences are split at . ! ? followed by white space (nltk's punkt model is not available offline).
"""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Sequence
from pathlib import Path

from lorasens.errors import UserError

References = Sequence[str | Sequence[str]]
# The repo's own WordNet folder (make setup -> scripts/fetch_wordnet.py); src/lorasens/evaluation/ -> repo root.
REPO_NLTK_DATA = Path(__file__).resolve().parents[3] / ".nltk_data"
logger = logging.getLogger(__name__)


def reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference")
    return refs


def prediction_columns(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(predictions, references) of prediction rows ({prediction, references, ...})."""
    return [r["prediction"] for r in rows], [r["references"] for r in rows]


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


def ensure_meteor_ready() -> None:
    """Fail before training, not after it, when METEOR cannot run: METEOR 1.5 needs Java, `meteor_nltk` WordNet."""
    from lorasens.metrics.coco import java_available

    if not java_available():
        ensure_wordnet()


# ------------------------------------------------------------------------------------------- single measures


def bleu(predictions: Sequence[str], references: References) -> float:
    from lorasens.metrics import mteval

    return mteval.bleu(predictions, reference_lists(predictions, references))


def nist(predictions: Sequence[str], references: References, n: int = 5) -> float:
    from lorasens.metrics import mteval

    return mteval.nist(predictions, reference_lists(predictions, references), n)


def meteor_nltk(predictions: Sequence[str], references: References) -> float:
    refs = reference_lists(predictions, references)
    ensure_wordnet()
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([tokenize(r) for r in rs], tokenize(p)) for p, rs in zip(predictions, refs)]
    return 100.0 * sum(scores) / len(scores)


def coco_metrics(predictions: Sequence[str], references: References) -> dict:
    """METEOR 1.5, ROUGE-L, CIDEr-D as the E2E scripts compute them, or (no Java) the named stand-ins + a note."""
    from lorasens.metrics import coco

    refs = reference_lists(predictions, references)
    if coco.java_available():
        return coco.official_scores(predictions, refs)
    logger.warning("%s", coco.NO_JAVA)
    return {"meteor_nltk": meteor_nltk(predictions, refs), **coco.approximate_scores(predictions, refs),
            "metrics_note": coco.NO_JAVA}


def _split_sentences(text: str) -> str:
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: Sequence[str], references: References) -> dict[str, float]:
    from rouge_score import rouge_scorer

    refs = reference_lists(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    sums = dict.fromkeys(kinds, 0.0)
    for p, rs in zip(predictions, refs):
        scores = scorer.score_multi([_split_sentences(r) for r in rs], _split_sentences(p))
        for k in kinds:
            sums[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(refs) for k, v in sums.items()}


# -------------------------------------------------------------------------------------------- per dataset


def e2e_metrics(predictions: Sequence[str], references: References) -> dict:
    """The official E2E set; call with one prediction per distinct MR and all of its references."""
    return {"bleu": bleu(predictions, references), "nist": nist(predictions, references),
            **coco_metrics(predictions, references)}


def samsum_metrics(predictions: Sequence[str], references: References) -> dict:
    scores = rouge(predictions, references)
    out: dict = {"rouge1": scores["rouge1"], "rouge2": scores["rouge2"], "rougeL": scores["rougeL"],
                 "rougeLsum": scores["rougeLsum"], "bleu": bleu(predictions, references)}
    coco = coco_metrics(predictions, references)
    # SAMSum reports METEOR only; ROUGE comes from rouge-score above.
    if "meteor" in coco:
        out["meteor"] = coco["meteor"]
    else:
        out["meteor_nltk"] = coco["meteor_nltk"]
        out["metrics_note"] = coco["metrics_note"]
    return out


# ------------------------------------------------------------------------ your own data (--dataset custom)
# Generic metrics for free-text answers, chosen with --metrics (names: config.TextMetric): sacreBLEU's standard
# corpus BLEU (case-sensitive, 13a; not the lowercased mteval BLEU of E2E), ROUGE-L from `rouge` above; exact match
# and accuracy compare normalised strings, best reference, as fractions.


def _squash(text: str) -> str:
    return " ".join(text.split())


def _label(text: str) -> str:
    """A label-like answer: its first non-empty line, lowercased, without surrounding white space or punctuation."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return _squash(line).strip(string.punctuation + " ").lower()


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Share of predictions equal to one of their references, after stripping and collapsing white space."""
    refs = reference_lists(predictions, references)
    return sum(_squash(p) in {_squash(r) for r in rs} for p, rs in zip(predictions, refs)) / len(refs)


def label_accuracy(predictions: Sequence[str], references: References) -> float:
    """Share of predictions whose first line names a reference's label (case and end punctuation ignored)."""
    refs = reference_lists(predictions, references)
    return sum(_label(p) in {_label(r) for r in rs} for p, rs in zip(predictions, refs)) / len(refs)


def rouge_l(predictions: Sequence[str], references: References) -> float:
    """ROUGE-L F-measure (rouge-score, Porter stemmer), max over references, mean in points."""
    return rouge(predictions, references)["rougeL"]


def sacrebleu_bleu(predictions: Sequence[str], references: References) -> float:
    """sacreBLEU corpus BLEU (0-100) with its defaults: 13a tokens, case-sensitive, exp smoothing, all references."""
    import sacrebleu

    refs = reference_lists(predictions, references)
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]  # sacrebleu skips the None
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


TEXT_METRIC_FUNCTIONS = {"exact_match": exact_match, "rouge_l": rouge_l, "bleu": sacrebleu_bleu,
                         "accuracy": label_accuracy}


def text_metrics(predictions: Sequence[str], references: References, names: Sequence[str]) -> dict[str, float]:
    """The metrics `names` (from `config.TextMetric`) of predictions against their references."""
    return {name: TEXT_METRIC_FUNCTIONS[name](predictions, references) for name in names}
