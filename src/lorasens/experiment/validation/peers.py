"""The peer arms that need the base model or training data to plan: EVA, GoRA, KappaTune, AdaLoRA.

Each returns an `Arm` at the budget and records its planning cost in `extra` (seconds), which the summary reports
as a fraction of one training.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
from peft import EvaConfig, LoraConfig
from peft.helpers import KappaTuneSelector
from peft.tuners.lora.eva import get_eva_state_dict

from lorasens.analysis.budget import ModuleSize, rank_allocation_config, spread_order
from lorasens.experiment.validation.arms import (MATCH_TOLERANCE, AdaLoraPlan, Arm, allocated_ranks, filled_in_order,
                                      ranks_order)
from lorasens.model.module_map import ModuleMap
from lorasens.training.peft_methods import eva_batches
from lorasens.training.trainer import padded_collator

logger = logging.getLogger(__name__)

EVA_RHO = 2.0  # PEFT's default redistribution
GORA_BATCHES = 32


def _key_of_path(module_map: ModuleMap) -> dict[str, str]:
    return {m.name: f"L{m.layer}.{m.module_type}" for m in module_map.modules}


def spread_ranks(keys: list[str], total_rank: int) -> dict[str, int]:
    """`total_rank` over `keys` as evenly as integers allow: base rank everywhere, one more on an evenly spread subset
    (EVA's rank budget is the sum of the modules' ranks, so this sets it to any integer, not a multiple of modules)."""
    base, extra = divmod(total_rank, len(keys))
    plus = set(spread_order(len(keys))[:extra])
    ranks = {k: base + (i in plus) for i, k in enumerate(keys)}
    return {k: r for k, r in ranks.items() if r > 0}  # rank 0: no LoRA on that module


def eva_ranks(model: torch.nn.Module, module_map: ModuleMap, batches: list[dict], ranks: dict[str, int],
              rho: float) -> dict[str, int]:
    """The ranks PEFT's EVA gives every module of the map when each starts at `ranks` (a rank budget of their sum,
    redistributed by explained variance up to rank x rho per module): its own SVD pass on the batches."""
    paths = {f"L{m.layer}.{m.module_type}": m.name for m in module_map.modules}
    config = rank_allocation_config({"r": 1, "lora_alpha": 1.0, "target_modules": [paths[k] for k in ranks]},
                                    {paths[k]: v for k, v in ranks.items()})
    lora_config = LoraConfig(**config, init_lora_weights="eva", eva_config=EvaConfig(rho=rho))
    keys = {path: key for key, path in paths.items()}
    model.eval()
    with torch.no_grad():
        state = get_eva_state_dict(copy.deepcopy(model), batches, peft_config=lora_config, show_progress_bar=False)
    return {keys[name]: int(w.shape[0]) for name, w in state.items() if name in keys and w.shape[0] > 0}


def eva_arm(model, module_map: ModuleMap, sizes: dict[str, ModuleSize], features: list[dict], tokenizer,
            batch_size: int, target: int) -> Arm:
    """EVA with redistribution whose *parameters* match the budget: EVA keeps the total rank, not the parameter
    count, so the total rank is searched (secant steps on params(total rank), at most 6 SVD passes)."""
    started = time.time()
    batches = eva_batches(features, tokenizer, batch_size)
    keys = list(sizes)
    mean_width = sum(s.in_features + s.out_features for s in sizes.values()) / len(sizes)
    tried: dict[int, tuple[int, dict]] = {}

    def params_at(total: int) -> int:
        if total not in tried:
            ranks = eva_ranks(model, module_map, batches, spread_ranks(keys, total), EVA_RHO)
            tried[total] = (sum(sizes[k].params(v) for k, v in ranks.items()), ranks)
        return tried[total][0]

    total = max(1, round(target / mean_width))
    for _ in range(6):
        p = params_at(total)
        if abs(p - target) <= MATCH_TOLERANCE * target / 2:
            break
        guess = max(1, round(total * target / p))
        if guess in tried:
            break
        total = guess
    best = min(tried, key=lambda k: abs(tried[k][0] - target))
    params, ranks = tried[best]
    return Arm("eva", "eva", spread_ranks(keys, best), init="eva", eva_rho=EVA_RHO,
               note=f"total rank {best} before redistribution: {params} parameters after it",
               extra={"planned_params": params, "eva_total_rank": best, "eva_ranks": ranks,
                      "search": {str(k): v[0] for k, v in tried.items()}, "plan_seconds": round(time.time() - started, 2)})


def gora_importance(model, module_map: ModuleMap, features: list[dict], tokenizer, batch_size: int,
                    batches: int = GORA_BATCHES) -> dict[str, float]:
    """Mean |W * dL/dW| per module over training batches, the gradient of the base weights (GoRA's importance)."""
    collate = padded_collator(tokenizer)
    weights = {f"L{m.layer}.{m.module_type}": model.get_submodule(m.name).weight for m in module_map.modules}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    totals = {k: 0.0 for k in weights}
    model.train()
    count = 0
    try:
        for start in range(0, min(len(features), batches * batch_size), batch_size):
            batch = collate([dict(f) for f in features[start:start + batch_size]])
            loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (k, w), g in zip(weights.items(), grads):
                totals[k] += float((w.detach() * g).abs().mean())
            count += 1
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return {k: v / count for k, v in totals.items()}


def gora_arm(model, module_map, sizes, features, tokenizer, batch_size: int, target: int) -> Arm:
    started = time.time()
    importance = gora_importance(model, module_map, features, tokenizer, batch_size)
    ranks = allocated_ranks(sizes, importance, target)
    return Arm("gora", "gora", ranks, extra={"importance": importance, "plan_seconds": round(time.time() - started, 2)})


def kappa_arm(model, module_map, sizes, r: int, target: int) -> Arm:
    """KappaTune ranks modules by the condition number of their weights (lowest first); filled to the budget."""
    started = time.time()
    keys = _key_of_path(module_map)
    selector = KappaTuneSelector(model, show_progress=False)
    order = [keys[name] for name in selector.get_best_targets() if name in keys]
    order += [k for k in ranks_order(module_map) if k not in order]  # modules it could not analyse go last
    return Arm("kappa", "kappa", filled_in_order(order, sizes, r, target),
               extra={"order": order, "plan_seconds": round(time.time() - started, 2)})


def adalora_arm(sizes: dict[str, ModuleSize], target: int) -> Arm:
    """AdaLoRA on every module. Its budget is a total rank; lorasens' allocation callback re-aims it at the
    parameter budget after every reallocation (target parameters / the kept ranks' mean width), so the final
    adapter holds the budget's parameters whichever modules keep their ranks. It starts at init_r =
    ceil(1.5 T / modules), T the total rank at the mean module width (AdaLoRA's paper starts 1.5x above)."""
    width = sum(s.in_features + s.out_features + 1 for s in sizes.values()) / len(sizes)
    total = max(1, round(target / width))
    init_r = max(1, math.ceil(1.5 * total / len(sizes)))
    return Arm("adalora", "adalora", {k: init_r for k in sizes}, adalora=AdaLoraPlan(init_r, total, target),
               note=f"{target} parameters kept in the end (about {total} ranks), starting from {init_r} per module")
