"""LoRA parameter budgets: counting, selecting modules within a budget, and allocating per-module ranks.

Pure functions over module sizes and scores (no model, no files), so the recommendation, `lorasens validate` and
the tests share one definition of "how many LoRA parameters does this placement hold":
a module with input width `in` and output width `out` carries `r * (in + out)` LoRA parameters at rank r
(A is r x in, B is out x r).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lorasens.errors import UserError, unknown_choice

BUDGET_UNITS: tuple[str, ...] = ("params", "modules")
DEFAULT_BUDGET = 0.5  # half of the all-modules total (of LoRA parameters, or of modules)
# Ranks a rank allocation may give a module; 0 = no LoRA on the module (left out of target_modules). Rank 1 is a
# choice because breadth pays: on E2E, below the budget of rank 1 on every module, the most sensitive modules at
# rank 1 train better than half as many at rank 2 (docs/RESULTS.md, "A small budget").
RANK_CHOICES: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)


def lora_param_count(r: int, in_features: int, out_features: int) -> int:
    """LoRA parameters of one module at rank r: A (r x in) + B (out x r)."""
    return r * (in_features + out_features)


@dataclass(frozen=True)
class ModuleSize:
    """The widths of one module that can carry LoRA; `key` names it (e.g. "L3.q_proj" or a module path)."""

    key: str
    in_features: int
    out_features: int

    def params(self, r: int) -> int:
        return lora_param_count(r, self.in_features, self.out_features)


@dataclass(frozen=True)
class Selection:
    """Modules chosen within a budget, and how much of it they use (in the budget's unit)."""

    keys: tuple[str, ...]  # in the order of the sizes given
    unit: str
    used: float  # LoRA parameters (unit params) or modules (unit modules) of the chosen modules
    limit: float  # the budget in the same unit
    params_used: int
    params_total: int  # all modules at the rank used

    def as_dict(self) -> dict:
        return {"unit": self.unit, "used": self.used, "limit": self.limit, "used_fraction": self.used / self.limit,
                "params_used": self.params_used, "params_total": self.params_total}


def budget_limit(budget: float | None, unit: str, sizes: Sequence[ModuleSize], r: int) -> float:
    """The budget as a count in `unit`: a value >= 1 is a count, a value < 1 a fraction of all modules' total."""
    if unit not in BUDGET_UNITS:
        raise unknown_choice("budget unit", unit, BUDGET_UNITS)
    budget = DEFAULT_BUDGET if budget is None else float(budget)
    if budget <= 0:
        raise UserError(f"--budget must be > 0 (a count >= 1 or a fraction < 1), got {budget}")
    total = len(sizes) if unit == "modules" else sum(s.params(r) for s in sizes)
    if budget >= 1:
        if unit == "modules" and not budget.is_integer():
            raise UserError(f"--budget must be a whole count of modules (>= 1) or a fraction (< 1), got {budget}")
        return budget
    return max(1.0, round(budget * total)) if unit == "modules" else budget * total


def select_within_budget(sizes: Sequence[ModuleSize], scores: Mapping[str, float], budget: float | None, unit: str,
                         r: int) -> Selection:
    """The best modules by `scores` (higher first; NaN last; ties in the given order) that fit the budget.

    unit "modules": the top K. unit "params": greedy in score order, skipping a module that no longer fits and
    continuing with smaller ones (so the budget is used as fully as the order allows); at least the best module
    is taken even if it alone exceeds the budget.
    """
    if not sizes:
        raise UserError("there are no LoRA modules to recommend from")
    limit = budget_limit(budget, unit, sizes, r)
    order = _by_score(sizes, scores)
    chosen: list[int] = []
    if unit == "modules":
        chosen = order[: min(int(limit), len(sizes))]
    else:
        chosen = _fill_in_order(order, [s.params(r) for s in sizes], limit) or order[:1]
    chosen.sort()
    params_used = sum(sizes[i].params(r) for i in chosen)
    return Selection(tuple(sizes[i].key for i in chosen), unit,
                     float(len(chosen)) if unit == "modules" else float(params_used), float(limit),
                     params_used, sum(s.params(r) for s in sizes))


def _by_score(sizes: Sequence[ModuleSize], scores: Mapping[str, float]) -> list[int]:
    """Indices of `sizes`, highest score first; NaN or missing scores last; ties in the given order."""
    return sorted(range(len(sizes)), key=lambda i: (-_score(scores, sizes[i].key), i))


def _fill_in_order(order: Sequence[int], costs: Sequence[float], limit: float) -> list[int]:
    """The indices of `order` taken greedily while their costs fit `limit` (one that no longer fits is skipped)."""
    chosen, used = [], 0.0
    for i in order:
        if used + costs[i] <= limit:
            chosen.append(i)
            used += costs[i]
    return chosen


def _score(scores: Mapping[str, float], key: str) -> float:
    value = scores.get(key, math.nan)
    return -math.inf if value is None or math.isnan(value) else float(value)


def allocate_ranks(sizes: Sequence[ModuleSize], weights: Mapping[str, float], budget_params: float,
                   choices: Sequence[int] = RANK_CHOICES, min_rank: int = 0) -> dict[str, int]:
    """Per-module ranks from `choices`, proportional to `weights`, holding at most `budget_params` LoRA parameters.

    min_rank > 0: every module (weight 0 included) first gets rank min_rank, and the rest of the budget is allocated
    as below on top of it (ranks min_rank + choices): a floor that keeps every module adapted, as a uniform placement
    does, while the weights decide where the extra capacity goes.

    1. The continuous allocation: rank t_i = c * w_i (capped at the largest choice), with c chosen so that
       sum t_i * (in_i + out_i) equals the budget (bisection; the capped total is monotone in c).
    2. Each module gets the largest choice <= t_i.
    3. Greedy top-up: while some module's next larger choice fits the remaining budget, raise the one whose
       rounded rank falls furthest short of its continuous rank (largest t_i / next choice; ties: earlier module).
    Negative or NaN weights count as 0; a module with weight 0 gets rank 0. The result never exceeds the budget.
    """
    if min_rank < 0:
        raise ValueError(f"min_rank must be >= 0, got {min_rank}")
    if min_rank:
        floor = sum(s.params(min_rank) for s in sizes)
        if floor > budget_params:
            raise UserError(f"--min_rank {min_rank} on all {len(sizes)} modules takes {floor} LoRA parameters, more "
                            f"than the budget's {budget_params:.0f}; lower --min_rank or raise --budget")
        extra = allocate_ranks(sizes, weights, budget_params - floor, choices)
        return {k: r + min_rank for k, r in extra.items()}
    choices = sorted(set(int(c) for c in choices))
    if not choices or choices[0] < 0:
        raise ValueError(f"rank choices must be >= 0, got {choices}")
    if 0 not in choices:
        choices = [0, *choices]
    top = choices[-1]
    w = [max(0.0, _score(weights, s.key)) for s in sizes]  # NaN scores to -inf, then 0
    width = [s.in_features + s.out_features for s in sizes]

    def total(c: float) -> float:
        return sum(min(c * wi, top) * wd for wi, wd in zip(w, width))

    if budget_params <= 0 or not any(w):
        return {s.key: 0 for s in sizes}
    lo, hi = 0.0, 1.0
    while total(hi) < budget_params and hi < 1e30:
        if all(wi == 0 or hi * wi >= top for wi in w):
            break  # every weighted module is at the top rank: the budget is larger than they can take
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < budget_params else (lo, mid)
    target = [min(hi * wi, top) for wi in w]
    ranks = [max(c for c in choices if c <= t + 1e-9) for t in target]
    used = sum(r * wd for r, wd in zip(ranks, width))
    while True:
        best, best_gap = None, -1.0
        for i, (r, t) in enumerate(zip(ranks, target)):
            if w[i] == 0 or r == top:
                continue
            nxt = choices[choices.index(r) + 1]
            if used + (nxt - r) * width[i] > budget_params:
                continue
            gap = t / nxt
            if gap > best_gap:
                best, best_gap = i, gap
        if best is None:
            break
        nxt = choices[choices.index(ranks[best]) + 1]
        used += (nxt - ranks[best]) * width[best]
        ranks[best] = nxt
    return {s.key: r for s, r in zip(sizes, ranks)}


def allocate_spread_ranks(sizes: Sequence[ModuleSize], scores: Mapping[str, float],
                          budget_params: float) -> dict[str, int]:
    """Every module at one rank b, the largest that the budget holds on all of them; then, highest score first,
    modules raised to b + 1 while the budget allows (one that no longer fits is skipped and the next tried). Below
    rank 1 on every module (b = 0) that is the highest-scored modules at rank 1. Never exceeds the budget.

    Why breadth first: on both benchmark tasks the budget spread over all modules at one low rank trained level with
    ranks in proportion to sensitivity, and the sensitivity order mattered only where the budget could not reach
    every module (docs/RESULTS.md). So here the scores decide only the remainder.
    """
    width = [s.params(1) for s in sizes]
    base = int(max(0.0, budget_params) // sum(width)) if sizes else 0
    raised = set(_fill_in_order(_by_score(sizes, scores), width, budget_params - base * sum(width)))
    return {s.key: base + int(i in raised) for i, s in enumerate(sizes)}


def pattern_key(module_path: str) -> str:
    """A `rank_pattern`/`alpha_pattern` key that matches exactly this module path.

    PEFT matches a pattern key as the regular expression `(.*\\.)?(KEY)$` against each module's name, so a raw
    path's dots are wildcards; escaping them and anchoring at a dot boundary makes "model.layers.3.self_attn.q_proj"
    match neither layer 13 nor "model.layers.3xself_attn..." (tested against PEFT's own matcher).
    """
    return re.escape(module_path)


def rank_allocation_config(base: dict, ranks_by_path: Mapping[str, int]) -> dict:
    """`base` (LoraConfig keyword arguments for the modules with rank > 0) plus `rank_pattern` and `alpha_pattern`.

    Every module with a rank gets an explicit entry; alpha keeps base["lora_alpha"] / base["r"] constant, so each
    module's scaling alpha / r is the one of the base config. `r` becomes the most common allocated rank.
    """
    used = {p: r for p, r in ranks_by_path.items() if r > 0}
    if not used:
        raise UserError("the rank allocation gives every module rank 0; raise the budget")
    ratio = float(base["lora_alpha"]) / float(base["r"])
    counts: dict[int, int] = {}
    for r in used.values():
        counts[r] = counts.get(r, 0) + 1
    common = max(sorted(counts), key=lambda r: counts[r])
    return {**base, "r": common, "lora_alpha": common * ratio,
            "rank_pattern": {pattern_key(p): r for p, r in used.items()},
            "alpha_pattern": {pattern_key(p): r * ratio for p, r in used.items()}}


def eva_start(rho: float = 1.0) -> dict:
    """The LoraConfig keys of EVA's start (PEFT's init_lora_weights "eva"); at rho 1 every module keeps its rank
    (lorasens.initialize_eva)."""
    return {"init_lora_weights": "eva", "eva_config": {"rho": rho}}


def starts_with_eva(config: Mapping) -> bool:
    """Whether LoraConfig keyword arguments ask for EVA's start."""
    return config.get("init_lora_weights") == "eva"


def fit_ranks(keys: list[str], sizes: dict[str, ModuleSize], target: int) -> dict[str, int]:
    """Ranks for `keys` holding about `target` LoRA parameters: rank b everywhere, b+1 on an evenly spread subset."""
    unit = sum(sizes[k].in_features + sizes[k].out_features for k in keys)
    base = int(target // unit)
    ranks = {k: base for k in keys}
    used = base * unit
    for index in spread_order(len(keys)):
        k = keys[index]
        cost = sizes[k].in_features + sizes[k].out_features
        if abs(used + cost - target) < abs(used - target):
            ranks[k] += 1
            used += cost
    return {k: r for k, r in ranks.items() if r > 0}


def spread_order(n: int) -> list[int]:
    """0..n-1 in an order that keeps any prefix spread out: 0, n/2, n/4, 3n/4, n/8, ... then whatever is left."""
    seen: dict[int, None] = {}
    denominator = 1
    while len(seen) < n and denominator <= 2 * n:
        for numerator in range(denominator):
            seen.setdefault((numerator * n) // denominator, None)
        denominator *= 2
    for i in range(n):
        seen.setdefault(i, None)
    return list(seen)


def ablation_type_shares(type_deltas: Mapping[str, float], group_of_type: Mapping[str, str],
                         group_deltas: Mapping[str, float]) -> dict[str, float]:
    """Each module type's share of the budget from the ablation: its group's share of the group deltas (all attention
    or all MLP LoRA switched off), split within the group by the module-type deltas (negative, NaN or missing deltas
    count 0; a group with a positive delta and no positive type delta splits by nothing: its types share it evenly).

    Why two levels: the type deltas are sub-additive within a group. Switching off one type leaves the group's
    other types to carry the adapter, so the types' deltas sum to much less than the group's (on E2E the three MLP
    types sum to +0.125 against the MLP group's +0.331, on WikiSQL +0.073 against +0.453), and shares from the type
    deltas alone understate the group that carries the adapter (WikiSQL: 62% of the budget on the MLP instead of
    85%). A group without a group delta (an older ablation file) takes the sum of its types' deltas."""
    def positive(value: float | None) -> float:
        return value if value is not None and value > 0 else 0.0  # NaN > 0 is False

    members: dict[str, list[str]] = {}
    for module_type, group in group_of_type.items():
        members.setdefault(group, []).append(module_type)
    shares: dict[str, float] = {}
    group_weight = {group: positive(group_deltas[group]) if group in group_deltas
                    else sum(positive(type_deltas.get(t)) for t in types) for group, types in members.items()}
    total = sum(group_weight.values())
    if total <= 0:
        raise UserError("--allocate types needs a positive ablation delta for at least one module group; the "
                        f"ablation gives groups {dict(group_deltas)}, module types {dict(type_deltas)}")
    for group, types in members.items():
        weights = {t: positive(type_deltas.get(t)) for t in types}
        within = sum(weights.values())
        for t in types:
            shares[t] = group_weight[group] / total * (weights[t] / within if within > 0 else 1 / len(types))
    return shares


def allocate_type_ranks(sizes: Sequence[ModuleSize], type_of: Mapping[str, str], type_shares: Mapping[str, float],
                        budget_params: float) -> dict[str, int]:
    """Ranks by module type: each type gets `type_shares[type]` of the budget (`ablation_type_shares`), spread over
    the type's modules in every layer as one rank (rank b, b+1 on an evenly spread subset: `fit_ranks`).

    The ablation measures what each type's adapter does for the loss; the per-module measures mostly tell layers
    apart, and on E2E the layer order added nothing measurable (a permuted rank profile trained as well)."""
    members: dict[str, list[str]] = {}
    for s in sizes:
        members.setdefault(type_of[s.key], []).append(s.key)
    by_key = {s.key: s for s in sizes}
    ranks = {s.key: 0 for s in sizes}
    for module_type, keys in members.items():
        ranks.update(fit_ranks(keys, by_key, budget_params * type_shares.get(module_type, 0.0)))
    return ranks
