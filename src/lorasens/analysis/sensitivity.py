"""Per-module sensitivity scores, rankings, agreement between measures, and the budget recommendation.

Every measure is "higher = the module matters more":
- grad_norm: mean over the recorded steps of the module's gradient norm sqrt(|grad A|^2 + |grad B|^2), counting
  only steps where it was trainable;
- importance: the last EMA-smoothed first-order Taylor importance sum(|theta * grad|) recorded for the module;
- update_magnitude: ||delta W||_F of the final adapter;
- ablation: validation loss increase when only this module's LoRA is switched off.
The recommendation ranks modules by the mean of their normalised ranks over the measures available for them (so
one measure's scale or outliers cannot dominate) and fills the budget from the top.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorasens.rundir import files
from lorasens.analysis.csvlog import read_rows
from lorasens.errors import UserError, unknown_choice
from lorasens.lora import LoraParams
from lorasens.module_map import LoraModule, ModuleMap

MEASURES = ("grad_norm", "importance", "update_magnitude", "ablation")
COMBINED = "combined"


def key_of(m: LoraModule) -> str:
    return files.module_key(m.layer, m.module_type)


def grad_norm_scores(run_dir: Path) -> dict[str, float]:
    """Mean module gradient norm over the steps where the module was recorded (frozen steps are left out)."""
    squares: dict[tuple[int, str], float] = defaultdict(float)
    for row in read_rows(run_dir / files.MODULE_NORMS):
        if row["grad_norm"] != "":
            squares[int(row["step"]), files.module_key(int(row["layer"]), row["module"])] += float(row["grad_norm"]) ** 2
    per_module: dict[str, list[float]] = defaultdict(list)
    for (_, key), value in squares.items():
        per_module[key].append(math.sqrt(value))
    return {key: float(np.mean(values)) for key, values in per_module.items()}


def importance_scores(run_dir: Path) -> dict[str, float]:
    """The last recorded (EMA-smoothed) importance of each module."""
    last: dict[str, float] = {}
    for row in read_rows(run_dir / files.IMPORTANCE):
        if row["importance"] != "":
            last[files.module_key(int(row["layer"]), row["module"])] = float(row["importance"])
    return last


def ranking(scores: dict[str, float]) -> list[str]:
    """Keys by decreasing score (NaN left out); ties keep the module-map order of `scores`."""
    present = [(k, v) for k, v in scores.items() if not math.isnan(v)]
    return [k for k, _ in sorted(present, key=lambda kv: -kv[1])]


def agreement(measures: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """Spearman rank correlation for every pair of measures, over the modules both score (None if undefined)."""
    from scipy.stats import spearmanr

    result: dict[str, float | None] = {}
    names = [m for m in MEASURES if m in measures]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = [k for k in measures[a] if k in measures[b] and not math.isnan(measures[a][k])
                      and not math.isnan(measures[b][k])]
            x = [measures[a][k] for k in common]
            y = [measures[b][k] for k in common]
            rho = None
            if len(common) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
                rho = float(spearmanr(x, y).statistic)
            result[f"{a}~{b}"] = rho
    return result


def combined_scores(keys: Sequence[str], measures: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over measures of the normalised rank in [0, 1] (1 = highest score of that measure)."""
    from scipy.stats import rankdata

    sums = dict.fromkeys(keys, 0.0)
    counts = dict.fromkeys(keys, 0)
    for scores in measures.values():
        present = [k for k in keys if k in scores and not math.isnan(scores[k])]
        if not present:
            continue
        ranks = rankdata([scores[k] for k in present])  # 1 = lowest, ties averaged
        for k, r in zip(present, ranks):
            sums[k] += (r - 1) / (len(present) - 1) if len(present) > 1 else 1.0
            counts[k] += 1
    return {k: sums[k] / counts[k] if counts[k] else math.nan for k in keys}


def select_budget(lora: Sequence[LoraParams], scores: dict[str, float], budget: float | None,
                  unit: str) -> list[LoraModule]:
    """The top modules by `scores` within the budget (default: half the modules), in module-map order."""
    modules = [lp.module for lp in lora]
    if not modules:
        raise UserError("the run has no LoRA modules to recommend from")
    budget = 0.5 if budget is None else budget
    order = sorted(range(len(modules)), key=lambda i: (-np.nan_to_num(scores[key_of(modules[i])], nan=-1.0), i))
    if unit == "modules":
        if budget > 1 and not float(budget).is_integer():
            raise UserError(f"--budget_modules must be a whole count (>= 1) or a fraction (< 1), got {budget}")
        count = int(budget) if budget >= 1 else max(1, round(budget * len(modules)))
        chosen = order[: min(count, len(modules))]
    elif unit == "params":
        sizes = [lp.A.numel() + lp.B.numel() for lp in lora]
        limit = budget if budget >= 1 else budget * sum(sizes)
        chosen, used = [], 0
        for i in order:
            if used + sizes[i] <= limit:
                chosen.append(i)
                used += sizes[i]
        chosen = chosen or order[:1]  # the single best module even if it alone exceeds the budget
    else:
        raise unknown_choice("budget unit", unit, ("modules", "params"))
    return [modules[i] for i in sorted(chosen)]


def recommended_lora_config(selected: Sequence[LoraModule], module_map: ModuleMap, r: int, alpha: float,
                            dropout: float) -> dict:
    """Keyword arguments for `peft.LoraConfig` that put LoRA on exactly `selected`.

    A selection that is a full product (these module types in these layers) is written the readable way, as
    `target_modules` + `layers_to_transform`; any other selection as one regular expression over the module paths
    (PEFT full-matches a string `target_modules` against each module's name).
    """
    config: dict = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "task_type": "CAUSAL_LM"}
    if module_map.architecture == "gpt2":
        config["fan_in_fan_out"] = True  # GPT-2's Conv1D weights, as lorasens.lora.apply_lora does
    types = list(dict.fromkeys(m.module_type for m in module_map.modules if m in set(selected)))
    layers = sorted({m.layer for m in selected})
    pairs = {(m.layer, m.module_type) for m in selected}
    if pairs == {(layer, t) for layer in layers for t in types}:
        config["target_modules"] = types
        if len(layers) < module_map.num_layers:
            config["layers_to_transform"] = layers
            config["layers_pattern"] = module_map.layers_path.split(".")[-1]
        return config
    prefix = module_map.layers_path + "."
    by_path: dict[str, list[int]] = defaultdict(list)  # path inside a layer -> layers
    for m in selected:
        inside = m.name[len(prefix):].split(".", 1)[1]
        by_path[inside].append(m.layer)
    alternatives = [
        rf"{re.escape(module_map.layers_path)}\.(?:{'|'.join(str(x) for x in sorted(ls))})\.{re.escape(inside)}"
        for inside, ls in by_path.items()
    ]
    config["target_modules"] = "^(?:" + "|".join(alternatives) + ")$"
    return config
