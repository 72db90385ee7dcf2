"""Paired comparisons that hold: a bootstrap over training seeds and test prompts, Holm's correction, verdicts.

A training unit is one trained adapter (a seed; for random placements a (set, seed) pair, so the random set is a
unit, not a fixed effect). Two arms are compared on the seeds both trained, paired by seed: every arm trains a seed
on the same data order, and the seed moves every arm's test loss together (on E2E by 0.02–0.03 nats/token, more
than most differences between arms), so an unpaired comparison of arms with different seeds measures the seeds.
Each bootstrap draw resamples the common seeds and the test prompts, both shared by the two arms: the difference of
the two arms' scores over the drawn prompts, averaged over the drawn seeds (an arm with several units at one seed,
random sets, scores their mean there). Loss is the token-weighted mean over prompts; a corpus metric (BLEU) is
recomputed from the drawn prompts' sufficient statistics. With fewer than MIN_PAIRED_SEEDS common seeds the interval
holds only the prompts' variation, so no verdict is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_DRAWS = 2000
LEVEL = 0.95
MIN_PAIRED_SEEDS = 2  # below this a comparison has no seed-to-seed variation in its interval: no verdict
TOO_FEW_SEEDS = "too few seeds"


@dataclass(frozen=True)
class UnitScores:
    """One trained adapter's per-prompt scores: `stats[p]` is a vector whose sum over prompts the `value` function
    of its metric turns into the score (loss: [nll, tokens]; BLEU: n-gram counts; a mean metric: [value, 1])."""

    stats: np.ndarray  # prompts x k
    seed: int  # the training seed: units of two arms at the same seed trained on the same data order


def loss_value(total: np.ndarray) -> float:
    return float(total[..., 0] / total[..., 1])


def mean_value(total: np.ndarray) -> float:
    return float(total[..., 0] / total[..., 1])


def score(units: list[UnitScores], value, prompts: np.ndarray | None = None) -> float:
    """The arm's score: mean over units of value(summed stats over `prompts`)."""
    return float(np.mean([value(u.stats[prompts].sum(0) if prompts is not None else u.stats.sum(0)) for u in units]))


def compare(a: list[UnitScores], b: list[UnitScores], value, rng: np.random.Generator,
            draws: int = BOOTSTRAP_DRAWS) -> dict | None:
    """score(a) - score(b) over the seeds both arms trained, paired by seed, with a percentile bootstrap CI and a
    two-sided bootstrap p-value (the share of draws on the other side of 0, doubled); None without a common seed."""
    seeds = sorted({u.seed for u in a} & {u.seed for u in b})
    if not seeds:
        return None
    n = a[0].stats.shape[0]
    # The draws first, in the order a draw-by-draw loop makes them (prompts, then seeds), so the CIs do not depend on
    # how the scores are computed; then every seed's score under every draw at once.
    prompts, picks = np.empty((draws, n), int), np.empty((draws, len(seeds)), int)
    for i in range(draws):
        prompts[i] = rng.integers(0, n, n)
        picks[i] = rng.integers(0, len(seeds), len(seeds))
    counts = np.zeros((draws, n))
    np.add.at(counts, (np.arange(draws)[:, None], prompts), 1.0)  # how often each prompt is in each draw
    per_seed = _drawn_seed_scores(a, seeds, value, counts) - _drawn_seed_scores(b, seeds, value, counts)
    diffs = np.take_along_axis(per_seed, picks, axis=1).mean(axis=1)
    low, high = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p = min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
    difference = float(np.mean([seed_score(a, s, value) - seed_score(b, s, value) for s in seeds]))
    return {"difference": difference, "ci_low": float(low), "ci_high": float(high), "p_value": p,
            "units": [len(a), len(b)], "seeds": seeds, "prompts": n}


def seed_score(units: list[UnitScores], seed: int, value, prompts: np.ndarray | None = None) -> float:
    """The arm's score at one seed: the mean over its units at that seed."""
    return score([u for u in units if u.seed == seed], value, prompts)


def _drawn_seed_scores(units: list[UnitScores], seeds: list[int], value, counts: np.ndarray) -> np.ndarray:
    """(draws, seeds): per draw, the arm's score at each seed (its units' mean of value(stats summed over the drawn
    prompts))."""
    totals = np.einsum("dn,unk->duk", counts, np.stack([u.stats for u in units]))
    values = np.fromiter((value(t) for t in totals.reshape(-1, totals.shape[-1])), float, totals.shape[0] * totals.shape[1])
    values = values.reshape(totals.shape[:2])
    return np.stack([values[:, [i for i, u in enumerate(units) if u.seed == s]].mean(axis=1) for s in seeds], axis=1)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone), by name."""
    order = sorted(p_values, key=p_values.get)
    m = len(order)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def verdict(difference: float, adjusted_p: float | None, lower_is_better: bool, alpha: float = 1 - LEVEL) -> str:
    """wins / ties / loses for the first arm of a comparison (no adjusted p: too few seeds)."""
    if adjusted_p is None:
        return TOO_FEW_SEEDS
    if adjusted_p >= alpha:
        return "ties"
    better = difference < 0 if lower_is_better else difference > 0
    return "wins" if better else "loses"
