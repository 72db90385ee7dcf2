"""CIDEr-D (Vedantam et al. 2015), as computed by the coco-caption code the E2E NLG challenge scripts call.

Implemented here because no package on PyPI that provides it is kept up to date (pycocoevalcap's last release,
1.2, dates from 2020 and pulls in pycocotools and Java for tokenisation). This is a line-for-line reading of
coco-caption's `pycocoevalcap/cider/cider_scorer.py` (CIDEr-D): TF-IDF weighted n-gram vectors (n = 1..4),
document frequencies over the references of the evaluated corpus, candidate counts clipped by the reference
counts, a Gaussian length penalty (sigma = 6), the mean over references and n, times 10. One quirk is kept on
purpose so that scores match the published ones: the "length" in the penalty counts *bigrams* (the original
tests `n == 1` on the 0-based n-gram index). tests/test_metrics.py checks a value computed by pycocoevalcap 1.2.
"""

from __future__ import annotations

import math
from collections import Counter


def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def cider_d(hypotheses: list[list[str]], references: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D of tokenised hypotheses, each against its own list of tokenised references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        return 0.0
    hyp_counts = [_ngrams(h, n) for h in hypotheses]
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update(set(g for counts in refs for g in counts))
    log_num_docs = math.log(float(len(ref_counts)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # bigram count, as in coco-caption (see module docstring)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(hyp, ref) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        out = []
        for k in range(n):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * penalty)
        return out

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hv = vector(hyp)
        total = [0.0] * n
        for ref in refs:
            total = [a + b for a, b in zip(total, similarity(hv, vector(ref)))]
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores)
