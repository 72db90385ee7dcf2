"""Per-module sensitivity scores, rankings, agreement between measures, and the budget recommendation.

Every measure is "higher = the module matters more":
- grad_norm: mean over the recorded steps of the module's gradient norm sqrt(|grad A|^2 + |grad B|^2), counting
  only steps where it was trainable;
- importance: the last bias-corrected EMA of the first-order Taylor importance sum(|theta * grad|);
- update_magnitude: ||delta W||_F of the final adapter;
- first_order: -<B, dL/dB> = -<dL/dW, delta W> on the analysis split, the linear prediction of the ablation delta;
- ablation: analysis-split loss increase when only this module's LoRA is switched off (measured).
Each is also reported per LoRA parameter (divided by r * (in + out)): the budget is counted in LoRA parameters, so
value per parameter is what a budget buys (the greedy knapsack order), and it removes the size advantage of wide
modules. The recommendation ranks modules by the mean of their normalised ranks over the measures that score
*every* module (a measure with partial coverage, e.g. ablation of the top 64 only, would put the modules it covers
on a different scale than the rest) and fills the budget from the top.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorasens.analysis.budget import ModuleSize
from lorasens.analysis.csvlog import read_numeric_rows, read_rows
from lorasens.analysis.stats import spearman
from lorasens.model.lora import LoraParams
from lorasens.model.module_map import LoraModule, ModuleMap
from lorasens.rundir import files

MEASURES = ("grad_norm", "importance", "update_magnitude", "first_order", "ablation")
COMBINED = "combined"


def key_of(m: LoraModule) -> str:
    return files.module_key(m.layer, m.module_type)


def grad_norm_scores(run_dir: Path) -> dict[str, float]:
    """Mean module gradient norm over the steps where the module was recorded (frozen steps are left out)."""
    squares: dict[tuple[int, str], float] = defaultdict(float)
    for row in read_numeric_rows(run_dir / files.MODULE_NORMS, ("step", "layer"), ("grad_norm",)):
        if row["grad_norm"] is not None:
            squares[row["step"], files.module_key(row["layer"], row["module"])] += row["grad_norm"] ** 2
    per_module: dict[str, list[float]] = defaultdict(list)
    for (_, key), value in squares.items():
        per_module[key].append(math.sqrt(value))
    return {key: float(np.mean(values)) for key, values in per_module.items()}


def importance_scores(run_dir: Path) -> dict[str, float]:
    """The last recorded (EMA-smoothed) importance of each module."""
    last: dict[str, float] = {}
    for row in read_numeric_rows(run_dir / files.IMPORTANCE, ("layer",), ("importance",)):
        if row["importance"] is not None:
            last[files.module_key(row["layer"], row["module"])] = row["importance"]
    return last


def module_sizes(lora: Sequence[LoraParams]) -> list[ModuleSize]:
    """Input and output widths of every LoRA module (A is r x in, B is out x r), keyed like the measures."""
    return [ModuleSize(key_of(lp.module), int(lp.A.shape[1]), int(lp.B.shape[0])) for lp in lora]


def per_parameter(scores: dict[str, float], params: dict[str, int]) -> dict[str, float]:
    """Each score divided by the module's LoRA parameter count."""
    return {k: v / params[k] for k, v in scores.items()}


def size_correlation(measures: dict[str, dict[str, float]], params: dict[str, int]) -> dict[str, float | None]:
    """Spearman correlation of each measure with the modules' LoRA parameter counts (None if undefined)."""
    return {name: spearman(scores, params) for name, scores in measures.items()}


def full_coverage(keys: Sequence[str], measures: dict[str, dict[str, float]]) -> list[str]:
    """The measures that give a finite score to every module."""
    return [name for name, scores in measures.items()
            if all(k in scores and scores[k] is not None and not math.isnan(scores[k]) for k in keys)]


def ranking(scores: dict[str, float]) -> list[str]:
    """Keys by decreasing score (NaN left out); ties keep the module-map order of `scores`."""
    present = [(k, v) for k, v in scores.items() if not math.isnan(v)]
    return [k for k, _ in sorted(present, key=lambda kv: -kv[1])]


def agreement(measures: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """Spearman rank correlation for every pair of measures, over the modules both score (None if undefined)."""
    result: dict[str, float | None] = {}
    names = [m for m in MEASURES if m in measures]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            result[f"{a}~{b}"] = spearman(measures[a], measures[b])
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


EXPLICIT_LIST_MAX = 400  # modules; a longer list is written as one regular expression


def recommended_lora_config(selected: Sequence[LoraModule], module_map: ModuleMap, r: int, alpha: float,
                            dropout: float) -> dict:
    """Keyword arguments for `peft.LoraConfig` that put LoRA on exactly `selected`.

    A selection of whole module types (these types in every layer) is written as the list of types; any other selection as the explicit list of module paths (PEFT
    matches a list entry against each module's name or its dotted suffix), which can be read, diffed and pasted
    into an axolotl or LLaMA-Factory config. Only a selection of more than EXPLICIT_LIST_MAX modules is written as
    one regular expression over the module paths (PEFT full-matches a string `target_modules`).
    """
    config: dict = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "task_type": "CAUSAL_LM"}
    if module_map.architecture == "gpt2":
        config["fan_in_fan_out"] = True  # GPT-2's Conv1D weights, as lorasens.model.lora.apply_lora does
    types = list(dict.fromkeys(m.module_type for m in module_map.modules if m in set(selected)))
    layers = sorted({m.layer for m in selected})
    pairs = {(m.layer, m.module_type) for m in selected}
    if pairs == {(layer, t) for layer in layers for t in types} and len(layers) == module_map.num_layers:
        config["target_modules"] = types
        return config
    if len(selected) <= EXPLICIT_LIST_MAX:
        chosen = set(selected)
        config["target_modules"] = [m.name for m in module_map.modules if m in chosen]
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
