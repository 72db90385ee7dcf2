"""The arms of a validation: placements at one LoRA-parameter budget, as data (a rank per module key "L3.q_proj").

Families: `lorasens` (what lorasens recommends), `peer` (PEFT's own data-driven methods and GoRA's scoring rule),
`control` (heuristics and random placements that tell whether the choice of modules mattered at all).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from lorasens.analysis.budget import ModuleSize, allocate_ranks, eva_start, rank_allocation_config
from lorasens.errors import UserError
from lorasens.model.module_map import ModuleMap

MATCH_TOLERANCE = 0.05  # every matched arm holds the budget's LoRA parameters within 5% at training time
RANDOM_TRIES = 2000

# name -> (family, description); the order is the order of the tables.
ARMS = {
    "recommended": ("lorasens", "the probe run's recommendation (its modules at their ranks, with its start)"),
    "ranks": ("lorasens", "per-module ranks from the combined sensitivity (--allocate ranks)"),
    "ranks_floor": ("lorasens", "every module at rank 1, the rest of the budget by the combined sensitivity "
                    "(--allocate ranks --min_rank 1)"),
    "spread": ("lorasens", "every module at one rank, the most sensitive one rank higher with the rest of the budget "
               "(--allocate spread)"),
    "types": ("lorasens", "budget shares from the probe's group ablation deltas, split within each group by the "
              "module-type deltas, one rank per type in every layer (--allocate types)"),
    "value": ("lorasens", "first-order estimate per LoRA parameter as knapsack value (greedy fill)"),
    "eva_init": ("lorasens", "the recommendation's modules, EVA initialisation (no redistribution)"),
    "ranks_eva_init": ("lorasens", "the `ranks` arm's per-module ranks, EVA initialisation (no redistribution)"),
    "eva": ("peer", "PEFT EVA on every module, rank redistribution rho=2, rank budget searched to the parameters"),
    "adalora": ("peer", "PEFT AdaLoRA on every module, its final budget held at the parameters"),
    "gora": ("peer", "GoRA-style ranks proportional to mean |W * dL/dW| of the base weights"),
    "kappa": ("peer", "PEFT KappaTune's module order (lowest condition number first) filled to the budget"),
    "qv": ("control", "PEFT's default q_proj,v_proj in every layer, rank fitted to the budget"),
    "uniform": ("control", "every module at one lowered rank, fitted to the budget"),
    "mlp": ("control", "the MLP modules of every layer, rank fitted to the budget"),
    "random": ("control", "random module sets at the run's rank (each set a unit of the statistics)"),
    "random_typed": ("control", "the recommendation's module types and ranks, in random layers"),
    "ranks_shuffled": ("control", "the `ranks` arm's ranks permuted across layers within each module type"),
    "all": ("ceiling", "every module at the run's rank (not parameter-matched)"),
}
PEER_ARMS = tuple(name for name, (family, _) in ARMS.items() if family == "peer")


@dataclass(frozen=True)
class AdaLoraPlan:
    init_r: int
    target_total_rank: int  # where AdaLoRA's budget starts
    target_params: int | None = None  # the parameters the final adapter keeps (the budget)


@dataclass(frozen=True)
class Arm:
    """One trained configuration. `name` is unique (random sets are random_1, random_2, ...); `arm` is its ARMS key."""

    name: str
    arm: str
    ranks: dict[str, int]  # for AdaLoRA: the modules at init_r
    init: str = "default"  # default | eva
    eva_rho: float = 1.0
    adalora: AdaLoraPlan | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)  # costs and search details, reported as they are

    @property
    def family(self) -> str:
        return ARMS[self.arm][0]

    @property
    def matched(self) -> bool:
        return self.family != "ceiling"

    def params(self, sizes: dict[str, ModuleSize]) -> int:
        if self.adalora is not None:  # the planned final count
            return int(self.adalora.target_params)
        return sum(sizes[k].params(r) for k, r in self.ranks.items())

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> Arm:
        ada = data.get("adalora")
        return Arm(**{**data, "adalora": AdaLoraPlan(**ada) if ada else None})


def filled_in_order(order: list[str], sizes: dict[str, ModuleSize], r: int, target: int) -> dict[str, int]:
    """Modules taken in `order` at rank r while the total stays within the target (+ tolerance), then the one that
    brings the total closest to the target."""
    chosen, used = {}, 0
    for k in order:
        cost = sizes[k].params(r)
        if used + cost <= target:
            chosen[k] = r
            used += cost
    rest = [k for k in order if k not in chosen]
    if rest:
        last = min(rest, key=lambda k: abs(used + sizes[k].params(r) - target))
        if abs(used + sizes[last].params(r) - target) < abs(used - target):
            chosen[last] = r
    return chosen


def matched_random(keys: list[str], sizes: dict[str, ModuleSize], r: int, target: int, rng: random.Random) -> dict[str, int]:
    """A random module set at rank r within MATCH_TOLERANCE of `target`, centred on it (filled below the target, then
    the left-out module closest to it): filling up to +5% would give random sets systematically more parameters."""
    for _ in range(RANDOM_TRIES):
        order = keys[:]
        rng.shuffle(order)
        chosen = filled_in_order(order, sizes, r, target)
        used = sum(sizes[k].params(v) for k, v in chosen.items())
        if chosen and abs(used - target) <= MATCH_TOLERANCE * target:
            return {k: r for k in keys if k in chosen}
    raise UserError(f"no random module set at rank {r} holds {target} LoRA parameters within {MATCH_TOLERANCE:.0%}; "
                    "use a larger --budget")


def random_typed(ranks: dict[str, int], module_map: ModuleMap, rng: random.Random) -> dict[str, int]:
    """The same number of modules of each type at the same ranks, in layers drawn at random."""
    by_type: dict[str, list[str]] = {}
    for m in module_map.modules:
        by_type.setdefault(m.module_type, []).append(f"L{m.layer}.{m.module_type}")
    result = {}
    for module_type, keys in by_type.items():
        wanted = [r for k, r in ranks.items() if k in set(keys)]
        for k, r in zip(rng.sample(keys, len(wanted)), wanted):
            result[k] = r
    return {k: result[k] for k in sorted(result, key=list(ranks_order(module_map)).index)}


def ranks_order(module_map: ModuleMap) -> list[str]:
    return [f"L{m.layer}.{m.module_type}" for m in module_map.modules]


def shuffled_ranks(ranks: dict[str, int], module_map: ModuleMap, rng: random.Random) -> dict[str, int]:
    """Each module type's ranks (zeros included) permuted across layers: same parameters, same type mix."""
    result = {}
    by_type: dict[str, list[str]] = {}
    for key in ranks_order(module_map):
        by_type.setdefault(key.split(".", 1)[1], []).append(key)
    for keys in by_type.values():
        values = [ranks.get(k, 0) for k in keys]
        rng.shuffle(values)
        result.update({k: v for k, v in zip(keys, values) if v > 0})
    return {k: result[k] for k in ranks_order(module_map) if k in result}


def allocated_ranks(sizes: dict[str, ModuleSize], weights: dict[str, float], target: int,
                    min_rank: int = 0) -> dict[str, int]:
    """lorasens' rank allocator (ranks in proportion to `weights`, at least `min_rank` everywhere) at the budget;
    modules at rank 0 get no LoRA."""
    ranks = allocate_ranks(list(sizes.values()), weights, target, min_rank=min_rank)
    return {k: r for k, r in ranks.items() if r > 0}


def value_ranks(sizes: dict[str, ModuleSize], value_per_param: dict[str, float], r: int, target: int) -> dict[str, int]:
    """The knapsack greedy: modules by predicted loss reduction per LoRA parameter (highest first) at rank r."""
    finite = {k: v for k, v in value_per_param.items() if v is not None and math.isfinite(v) and k in sizes}
    if not finite:
        raise UserError("the run's sensitivity.json has no first_order measure (the value arm needs it)")
    order = sorted(finite, key=lambda k: -finite[k])
    return filled_in_order(order, sizes, r, target)


def check_matched(arm: Arm, params: int, target: int) -> None:
    """An arm outside the tolerance is a planning error, not a result to report."""
    if arm.matched and abs(params - target) > MATCH_TOLERANCE * target:
        raise UserError(f"arm {arm.name}: {params} LoRA parameters, {abs(params - target) / target:.1%} from the budget "
                        f"{target} (tolerance {MATCH_TOLERANCE:.0%})")


def adalora_schedule(max_steps: int) -> dict:
    """AdaLoRA's phases from the training length, in the proportions of its paper's GLUE runs: warm-up 10%, pruning
    until 80%, the final ranks fixed for the last 20%, reallocation every 5% (at least every step)."""
    tinit = max(1, round(0.10 * max_steps))
    tfinal = max(1, round(0.20 * max_steps))
    if tinit >= max_steps - tfinal:
        raise UserError(f"AdaLoRA needs more steps to prune in (--max_steps {max_steps}); give at least 5")
    return {"total_step": max_steps, "tinit": tinit, "tfinal": tfinal, "deltaT": max(1, round(0.05 * max_steps))}


def arm_config(arm: Arm, module_map: ModuleMap, r: int, alpha: float, max_steps: int) -> dict:
    """The PEFT config file of an arm (lorasens' own notes under "lorasens"). Every LoRA arm keeps alpha / r of the
    run at every module, so the arms differ in where and how much, not in their scaling."""
    paths = {f"L{m.layer}.{m.module_type}": m.name for m in module_map.modules}
    if arm.adalora is not None:
        ada = arm.adalora
        return {"peft_type": "ADALORA", "init_r": ada.init_r, "lora_alpha": alpha / r * ada.init_r,
                "target_modules": [paths[k] for k in arm.ranks], "target_r": max(1, ada.target_total_rank // len(arm.ranks)),
                **adalora_schedule(max_steps), "lorasens": {"adalora_target_total_rank": ada.target_total_rank,
                                                            "adalora_target_params": ada.target_params}}
    base = {"r": r, "lora_alpha": alpha, "target_modules": [paths[k] for k in paths if k in arm.ranks]}
    config = rank_allocation_config(base, {paths[k]: v for k, v in arm.ranks.items()})
    if arm.init == "eva":
        config.update(eva_start(arm.eva_rho))
    return config
