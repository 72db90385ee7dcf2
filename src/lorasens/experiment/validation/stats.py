"""Paired comparisons that hold: a bootstrap over training units and test prompts, Holm's correction, verdicts.

A training unit is one trained adapter (a seed; for random placements a (set, seed) pair, so the random set is a
unit, not a fixed effect). Each bootstrap draw resamples the units of each arm and, shared by both arms, the test
prompts: the difference of the two arms' scores over the drawn prompts, averaged over the drawn units. Loss is the
token-weighted mean over prompts; a corpus metric (BLEU) is recomputed from the drawn prompts' sufficient statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_DRAWS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class UnitScores:
    """One trained adapter's per-prompt scores: `stats[p]` is a vector whose sum over prompts the `value` function
    of its metric turns into the score (loss: [nll, tokens]; BLEU: n-gram counts; a mean metric: [value, 1])."""

    stats: np.ndarray  # prompts x k


def loss_value(total: np.ndarray) -> float:
    return float(total[..., 0] / total[..., 1])


def mean_value(total: np.ndarray) -> float:
    return float(total[..., 0] / total[..., 1])


def score(units: list[UnitScores], value, prompts: np.ndarray | None = None) -> float:
    """The arm's score: mean over units of value(summed stats over `prompts`)."""
    return float(np.mean([value(u.stats[prompts].sum(0) if prompts is not None else u.stats.sum(0)) for u in units]))


def compare(a: list[UnitScores], b: list[UnitScores], value, rng: np.random.Generator,
            draws: int = BOOTSTRAP_DRAWS) -> dict:
    """score(a) - score(b) with a percentile bootstrap CI and a two-sided bootstrap p-value (the share of draws on
    the other side of 0, doubled)."""
    n = a[0].stats.shape[0]
    # The draws first, in the order a draw-by-draw loop makes them (prompts, then each arm's units), so the CIs do
    # not depend on how the scores are computed; then every unit's score under every draw at once.
    prompts, picks_a, picks_b = np.empty((draws, n), int), np.empty((draws, len(a)), int), np.empty((draws, len(b)), int)
    for i in range(draws):
        prompts[i] = rng.integers(0, n, n)
        picks_a[i] = rng.integers(0, len(a), len(a))
        picks_b[i] = rng.integers(0, len(b), len(b))
    counts = np.zeros((draws, n))
    np.add.at(counts, (np.arange(draws)[:, None], prompts), 1.0)  # how often each prompt is in each draw
    diffs = (_drawn_scores(a, value, counts, picks_a) - _drawn_scores(b, value, counts, picks_b))
    low, high = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p = min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
    return {"difference": score(a, value) - score(b, value), "ci_low": float(low), "ci_high": float(high),
            "p_value": p, "units": [len(a), len(b)], "prompts": n}


def _drawn_scores(units: list[UnitScores], value, counts: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Per draw, the arm's score: the mean over its drawn units of value(stats summed over the drawn prompts)."""
    totals = np.einsum("dn,unk->duk", counts, np.stack([u.stats for u in units]))
    values = np.fromiter((value(t) for t in totals.reshape(-1, totals.shape[-1])), float, totals.shape[0] * totals.shape[1])
    values = values.reshape(totals.shape[:2])
    return np.take_along_axis(values, picks, axis=1).mean(axis=1)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone), by name."""
    order = sorted(p_values, key=p_values.get)
    m = len(order)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def verdict(difference: float, adjusted_p: float, lower_is_better: bool, alpha: float = 1 - LEVEL) -> str:
    """wins / ties / loses for the first arm of a comparison."""
    if adjusted_p >= alpha:
        return "ties"
    better = difference < 0 if lower_is_better else difference > 0
    return "wins" if better else "loses"
