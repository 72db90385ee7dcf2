"""Paired comparisons that hold: seeds and test prompts as the sources of error, Holm's correction, verdicts.

A training unit is one trained adapter (a seed; for random placements a (set, seed) pair, so the random set is a
unit, not a fixed effect). Two arms are compared on the seeds both trained, paired by seed: every arm trains a seed
on the same data order, and the seed moves every arm's test loss together (on E2E by 0.02–0.03 nats/token, more
than most differences between arms), so an unpaired comparison of arms with different seeds measures the seeds. An
arm with several units at one seed (random sets) scores their mean there.

The difference is the mean over the k common seeds of the per-seed differences. Its variance has two parts: the
seeds' (the per-seed differences' sample variance / k) and the test prompts' (the variance of the difference over
bootstrap draws of the prompts, shared by both arms and every seed; a corpus metric such as BLEU is recomputed from
the drawn prompts' sufficient statistics). The interval and the p-value are Student-t with Welch-Satterthwaite
degrees of freedom: with 3-5 seeds a percentile bootstrap over the seeds would be far too narrow (on E2E's four
common seeds of `ranks` and EVA it gave p 0.02 where a paired t-test over the seeds gives 0.08). With fewer than
MIN_PAIRED_SEEDS common seeds there is no seed variance to estimate: the interval is the prompts' alone and no
verdict is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

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
    """score(a) - score(b) over the seeds both arms trained, paired by seed, with a 95% interval and a two-sided
    p-value (see the module docstring); None without a common seed."""
    seeds = sorted({u.seed for u in a} & {u.seed for u in b})
    if not seeds:
        return None
    units = [len(a), len(b)]
    a, b = [u for u in a if u.seed in seeds], [u for u in b if u.seed in seeds]  # other seeds play no part
    n, k = a[0].stats.shape[0], len(seeds)
    per_seed = np.array([seed_score(a, s, value) - seed_score(b, s, value) for s in seeds])
    difference = float(per_seed.mean())
    # Prompt draws in the order a draw-by-draw loop makes them, so the result does not depend on how it is computed.
    prompts = np.stack([rng.integers(0, n, n) for _ in range(draws)])
    counts = np.zeros((draws, n))
    np.add.at(counts, (np.arange(draws)[:, None], prompts), 1.0)  # how often each prompt is in each draw
    drawn = (_drawn_seed_scores(a, seeds, value, counts) - _drawn_seed_scores(b, seeds, value, counts)).mean(axis=1)
    prompt_var = float(np.var(drawn, ddof=1))
    result = {"difference": difference, "units": units, "seeds": seeds, "prompts": n,
              "per_seed": [float(d) for d in per_seed], "prompt_sd": prompt_var ** 0.5}
    if k < MIN_PAIRED_SEEDS:
        low, high = np.quantile(drawn, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        p = min(1.0, 2 * min(float((drawn <= 0).mean()), float((drawn >= 0).mean())))
        return {**result, "ci_low": float(low), "ci_high": float(high), "p_value": p, "df": None, "seed_sd": None}
    seed_var = float(np.var(per_seed, ddof=1)) / k
    se = (seed_var + prompt_var) ** 0.5
    # Welch-Satterthwaite: the prompts' part is estimated from many draws (infinite degrees of freedom).
    df = (k - 1) * ((seed_var + prompt_var) / seed_var) ** 2 if seed_var > 0 else math.inf
    if se == 0:
        low = high = difference
        p = 1.0 if difference == 0 else 0.0
    else:
        half = float(student_t.ppf((1 + LEVEL) / 2, df)) * se
        low, high = difference - half, difference + half
        p = float(2 * student_t.sf(abs(difference) / se, df))
    return {**result, "ci_low": low, "ci_high": high, "p_value": min(1.0, p),
            "df": df if math.isfinite(df) else None, "seed_sd": (seed_var * k) ** 0.5}  # JSON has no infinity


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
