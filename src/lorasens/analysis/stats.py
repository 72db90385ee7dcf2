"""Statistics of the analysis: paired bootstrap intervals of ablation deltas, rank intervals, rank correlation with
module size, and the overlap of recommended sets across seeds (with the overlap two random sets would have).

Pure numpy/scipy on arrays; no model and no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import hypergeom, spearmanr

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000
# A module's rank interval is "wide" when it spans more than this fraction of the ranked modules.
WIDE_RANK_FRACTION = 0.25


@dataclass(frozen=True)
class BootstrapResult:
    """Per ablation set: the delta (token-weighted mean loss off minus on), its CI, and, for the sets given as
    `ranked`, the rank (1 = largest delta) with its interval over the bootstrap replicates."""

    delta: np.ndarray  # (S,)
    low: np.ndarray  # (S,)
    high: np.ndarray  # (S,)
    rank: np.ndarray  # (R,) for the ranked sets, in the order given
    rank_low: np.ndarray  # (R,)
    rank_high: np.ndarray  # (R,)


def bootstrap_deltas(on: np.ndarray, off: np.ndarray, tokens: np.ndarray, ranked: Sequence[int] = (),
                     samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap over examples of the ablation deltas.

    on: (E,) per-example sum of target-token losses with everything on; off: (S, E) the same with set s switched
    off; tokens: (E,) target tokens per example. The delta of set s is (sum off_s - sum on) / sum tokens, the
    difference of two token-weighted means over the same tokens. Each replicate resamples examples (with
    replacement) once for all sets, so deltas, and ranks among the `ranked` sets, stay paired. Percentile intervals.
    """
    on = np.asarray(on, dtype=np.float64)
    off = np.atleast_2d(np.asarray(off, dtype=np.float64))
    tokens = np.asarray(tokens, dtype=np.float64)
    n = on.shape[0]
    if off.shape[1] != n or tokens.shape[0] != n or n == 0:
        raise ValueError(f"shapes do not match: on {on.shape}, off {off.shape}, tokens {tokens.shape}")
    diff = off - on  # (S, E)
    delta = diff.sum(axis=1) / tokens.sum()
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)  # (B, E) resample counts
    boot = (weights @ diff.T) / (weights @ tokens)[:, None]  # (B, S)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    ranked = list(ranked)
    if ranked:
        rank = _ranks(delta[ranked][None, :])[0]
        boot_ranks = _ranks(boot[:, ranked])
        rank_low, rank_high = np.percentile(boot_ranks, [tail, 100 - tail], axis=0)
        rank_low, rank_high = np.floor(rank_low), np.ceil(rank_high)
    else:
        rank = rank_low = rank_high = np.empty(0)
    return BootstrapResult(delta, low, high, rank, rank_low, rank_high)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Row-wise ranks, 1 = largest value (ties: first in order)."""
    order = np.argsort(-values, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, values.shape[1] + 1)[None, :].repeat(values.shape[0], 0), axis=1)
    return ranks.astype(np.float64)


def rank_interval_is_wide(low: float, high: float, num_ranked: int) -> bool:
    return num_ranked > 1 and (high - low) > WIDE_RANK_FRACTION * num_ranked


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float | None:
    """Spearman correlation over the keys both score (finite); None with fewer than 3 or a constant side."""
    common = [k for k in a if k in b and _finite(a[k]) and _finite(b[k])]
    x, y = [a[k] for k in common], [b[k] for k in common]
    if len(common) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def _finite(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def random_jaccard(total: int, k1: int, k2: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random sets of sizes k1 and k2 out of `total`.

    The intersection size is hypergeometric (total, k1, k2); Jaccard = i / (k1 + k2 - i), averaged exactly.
    """
    if not 0 <= k1 <= total or not 0 <= k2 <= total:
        raise ValueError(f"set sizes {k1}, {k2} out of {total}")
    if k1 + k2 == 0:
        return 1.0
    i = np.arange(max(0, k1 + k2 - total), min(k1, k2) + 1)
    return float((hypergeom.pmf(i, total, k1, k2) * i / (k1 + k2 - i)).sum())
