"""Per-prompt sufficient statistics of a metric, so that a bootstrap over test prompts can recompute it exactly.

Each metric gives a prompts x k array whose column sums the metric's `value` turns into the score: corpus BLEU
from summed n-gram counts (sacreBLEU's statistics, lowercased 13a tokens and all references, as the E2E scripts'
mteval-v13a BLEU counts them), a mean metric (ROUGE-L, accuracy) from [sum of per-prompt values, count].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sacrebleu.metrics import BLEU

from lorasens.metrics.coco import Rouge, java_available, ptb_tokenize, simple_tokens


@dataclass(frozen=True)
class SegmentMetric:
    stats: np.ndarray  # prompts x k
    value: Callable[[np.ndarray], float]
    higher_is_better: bool = True


_BLEU = BLEU(lowercase=True)


def _bleu_value(total: np.ndarray) -> float:
    return float(_BLEU._compute_score_from_stats(list(total.astype(int))).score)


def _mean_value(total: np.ndarray) -> float:
    return float(100.0 * total[0] / total[1])


def bleu_segments(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> SegmentMetric:
    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    stats = np.asarray(_BLEU._extract_corpus_statistics(list(predictions), streams), dtype=float)
    return SegmentMetric(stats, _bleu_value)


def rouge_l_segments(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> SegmentMetric:
    """coco-caption's ROUGE-L per prompt (PTB tokens with Java, else the 13a stand-in), mean x 100 = its score."""
    if java_available():
        hyps, refs = ptb_tokenize(predictions, references)
    else:
        hyps = {i: [simple_tokens(p)] for i, p in enumerate(predictions)}
        refs = {i: [simple_tokens(r) for r in rs] for i, rs in enumerate(references)}
    _, per_prompt = Rouge().compute_score(refs, hyps)
    values = np.asarray(per_prompt, dtype=float)
    return SegmentMetric(np.stack([values, np.ones_like(values)], axis=1), _mean_value)


def accuracy_segments(correct: Sequence[bool]) -> SegmentMetric:
    values = np.asarray(correct, dtype=float)
    return SegmentMetric(np.stack([values, np.ones_like(values)], axis=1), _mean_value)
