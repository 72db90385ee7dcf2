"""BLEU and NIST as NIST's mteval-v13a.pl computes them, the scorer behind published E2E NLG BLEU/NIST figures.

The E2E challenge scripts (tuetschek/e2e-metrics `measure_scores.py`) write every reference of a segment into the
mteval SGML files (fewer references pad with empty segments) and run `mteval-v13a-sig.pl` with its defaults:
case-insensitive (ASCII letters lowered, `tr/[A-Z]/[a-z]/`), the "13a" tokenisation, n-grams up to 4 (BLEU) and
5 (NIST), the whole corpus as one document.

- BLEU: sacrebleu's `corpus_bleu` is that algorithm (13a tokeniser, closest reference length, clipped counts over
  all references); sacrebleu's own `lowercase=True` uses Python's Unicode `lower()`, so the text is lowered here
  the way mteval does (ASCII only) and sacrebleu runs case-sensitively on the result. "CAFÉ" thus stays "cafÉ",
  as in mteval.
- NIST: no maintained package computes mteval's NIST (nltk's `corpus_nist` takes the best single reference and
  its own length rule), so it is written out below from `mteval-v13a.pl` (`compute_ngram_info`,
  `score_segment`, `nist_score`): information weights log2(count(w1..wn-1) / count(w1..wn)) over *all* reference
  segments of the corpus (duplicates counted), matches clipped by the largest count in any one reference, per
  order the information of the matches over the number of hypothesis n-grams, and the brevity penalty
  exp(-beta log^2(ratio)) with ratio = hypothesis words / (reference words / mean number of non-empty
  references per segment).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_TOKENIZER = Tokenizer13a()
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# mteval's NIST length penalty: a hypothesis 2/3 of the reference length scores half (ratio 1.5, score 0.5).
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def lower_ascii(text: str) -> str:
    """mteval's case folding: `tr/[A-Z]/[a-z]/` (ASCII letters only)."""
    return text.translate(_ASCII_LOWER)


def tokenize(text: str) -> list[str]:
    """mteval-v13a's tokens: lowered as mteval does, then the 13a tokeniser."""
    return _TOKENIZER(lower_ascii(text).strip()).split()


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of mteval-v13a; `references[i]` is the list of references of prediction `i`."""
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[lower_ascii(r[k]) if k < len(r) else None for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu([lower_ascii(p) for p in predictions], streams, tokenize="13a").score)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Corpus NIST of mteval-v13a (n-grams up to `n`)."""
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    # Information weights from the reference corpus: every reference segment, duplicates included.
    counts: Counter = Counter()
    words = 0
    for rs in refs:
        for r in rs:
            words += len(r)
            counts.update(_ngrams(r, n))

    def info(gram: tuple[str, ...]) -> float:
        prefix = gram[:-1]
        # mteval tests the joined prefix string for truth, and Perl's "0" is false: a prefix that is the single
        # token "0" falls back to the word total, like a unigram. Kept so that scores stay identical.
        denominator = counts[prefix] if prefix and prefix != ("0",) else words
        return math.log2(denominator / counts[gram])

    matched_info, hyp_ngrams = [0.0] * (n + 1), [0] * (n + 1)
    nonempty_refs = 0
    for hyp, rs in zip(hyps, refs):
        ref_max: Counter = Counter()
        for r in rs:
            ref_max |= _ngrams(r, n)  # | keeps the larger count: clipping by the best single reference
        nonempty_refs += sum(1 for r in rs if r)
        for k in range(1, n + 1):
            hyp_ngrams[k] += max(len(hyp) - k + 1, 0)
        for gram, count in _ngrams(hyp, n).items():
            if gram in ref_max:
                matched_info[len(gram)] += info(gram) * min(count, ref_max[gram])
    if not words or not hyp_ngrams[1]:
        return 0.0
    score = sum(matched_info[k] / max(hyp_ngrams[k], 1) for k in range(1, n + 1))
    mean_ref_words = words / (nonempty_refs / len(hyps))
    ratio = hyp_ngrams[1] / mean_ref_words
    penalty = 1.0 if ratio >= 1 else math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return score * penalty
