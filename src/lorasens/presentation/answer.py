"""The answer of a run in a few sentences: where the LoRA budget goes, the evidence behind it, the verdict.

Read only from the run directory's files (sensitivity.json, sensitivity_ablation.csv, validation/), so the
report's answer box and the terminal summary say the same thing. Each field is optional: a run without an
ablation or a validation says so instead of failing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorasens.analysis.budget import lora_param_count
from lorasens.rundir.files import SENSITIVITY, VALIDATION_DIR, VALIDATION_JSON
from lorasens.rundir.load import read_ablation
from lorasens.safeio import read_json

TOP_LAYERS = 3


@dataclass
class Answer:
    split: str | None = None  # "62% of the recommended LoRA parameters go to attention, 38% to MLP"
    layers: str | None = None  # "most of it in layers 0, 1, 3"
    evidence: str | None = None  # group ablation with CI, agreement of the measures
    trusted: str | None = None  # which measure the ranking trusts, and why
    verdict: str | None = None  # placement validation, when `lorasens validate` ran
    grid: dict = field(default_factory=dict)  # layers, module types, score per cell, selected cells

    def lines(self) -> list[str]:
        return [line for line in (self.split, self.layers, self.evidence, self.trusted, self.verdict) if line]


def _pct(part: float, whole: float) -> int:
    return round(100 * part / whole) if whole else 0


def _num(value: float) -> str:
    return f"{value:+.3f}" if abs(value) >= 0.001 else f"{value:+.2g}"


def _recommended_params(module: dict, rank: int | None) -> float:
    """A recommended module's LoRA parameters: at its allocated rank, else at the run's (sensitivity.json's)."""
    if rank is None:
        return module.get("lora_params", 0)
    return lora_param_count(rank, module.get("in_features", 0), module.get("out_features", 0))


def _rank_range(ranks: dict, selected: list[str]) -> str:
    values = [ranks[k] for k in selected if k in ranks]
    if not values:
        return ""
    low, high = min(values), max(values)
    return f" at rank {low}" if low == high else f" at ranks {low}–{high}"


def read_group_ablation(run_dir: Path) -> dict[str, dict]:
    """{group: {delta, low, high}} from sensitivity_ablation.csv's group rows (empty without an ablation)."""
    return {name: asdict(d) for name, d in read_ablation(run_dir, "group").items()}


def read_verdict(run_dir: Path) -> str | None:
    """The validation verdict, read defensively: a "verdict" string, or a "verdicts" list / dict of strings."""
    data = read_json(run_dir / VALIDATION_DIR / VALIDATION_JSON, tolerant=True)
    if not isinstance(data, dict):
        return None
    verdict = data.get("verdict")
    if isinstance(verdict, str) and verdict:
        return verdict
    verdicts = data.get("verdicts")
    if isinstance(verdicts, dict):
        parts = [f"{k}: {v if isinstance(v, str) else v.get('verdict', v) if isinstance(v, dict) else v}"
                 for k, v in verdicts.items()]
        return "; ".join(parts) or None
    if isinstance(verdicts, list):
        return "; ".join(str(v) for v in verdicts) or None
    return None


def build_answer(run_dir: str | Path) -> Answer:
    run_dir = Path(run_dir)
    answer = Answer(verdict=None)
    data = read_json(run_dir / SENSITIVITY, tolerant=True)
    verdict = read_verdict(run_dir)
    if verdict:
        head, sep, _ = verdict.partition("; test loss:")  # the primary comparison; every arm is in its section
        answer.verdict = f"Validation: {head}" + (" (every comparison: Placement validation below)" if sep else "")
    if not isinstance(data, dict):
        return answer
    modules = {m["key"]: m for m in data.get("modules") or [] if isinstance(m, dict) and "key" in m}
    budget = data.get("budget") if isinstance(data.get("budget"), dict) else {}
    selected = [k for k in budget.get("selected") or [] if k in modules]
    ranks = budget.get("ranks") or {}  # --allocate ranks: each module's own rank, not the run's
    if selected:
        by_group: dict[str, float] = {}
        by_layer: dict[int, float] = {}
        for key in selected:
            m = modules[key]
            params = _recommended_params(m, ranks.get(key))
            by_group[m["group"]] = by_group.get(m["group"], 0) + params
            by_layer[m["layer"]] = by_layer.get(m["layer"], 0) + params
        used = sum(by_group.values())
        counts = {g: (sum(1 for k in selected if modules[k]["group"] == g),
                      sum(1 for m in modules.values() if m["group"] == g)) for g in ("attn", "mlp")}
        fraction = budget.get("used_fraction")
        of_all = _pct(used, budget.get("params_total") or 0)
        answer.split = (
            f"Put LoRA on {len(selected)} of {len(modules)} modules{_rank_range(ranks, selected)} ({of_all}% of the "
            "all-module LoRA parameters): "
            f"{_pct(by_group.get('attn', 0), used)}% of them on attention ({counts['attn'][0]} of "
            f"{counts['attn'][1]} modules), {_pct(by_group.get('mlp', 0), used)}% on MLP ({counts['mlp'][0]} of "
            f"{counts['mlp'][1]})" + (f"; {round(100 * fraction)}% of the budget is used" if fraction else "")
            + ("; LoRA starts from EVA (lorasens.initialize_eva in your own script)." if budget.get("init") == "eva"
               else "."))
        top = sorted(by_layer, key=lambda layer: -by_layer[layer])[:TOP_LAYERS]
        answer.layers = (f"Top layers: {', '.join(str(layer) for layer in top)} "
                         f"({_pct(sum(by_layer[layer] for layer in top), used)}% of the recommended parameters).")
    groups = read_group_ablation(run_dir)
    if groups:
        parts = []
        for name in ("attn", "mlp"):
            g = groups.get(name)
            if g:
                ci = f" (95% CI [{_num(g['low'])}, {_num(g['high'])}])" if g["low"] is not None else ""
                parts.append(f"{'attention' if name == 'attn' else 'MLP'} {_num(g['delta'])}{ci}")
        answer.evidence = ("Evidence: switching off all LoRA of a group raises the held-out loss by "
                           + " and ".join(parts) + " nats/token.")
        if "attn" in groups and "mlp" in groups and selected:
            attn_share = _pct(by_group.get("attn", 0), used)
            ablation_share = _pct(max(groups["attn"]["delta"], 0),
                                  max(groups["attn"]["delta"], 0) + max(groups["mlp"]["delta"], 0))
            if abs(attn_share - ablation_share) >= 25:
                answer.evidence += (f" The group ablation puts {ablation_share}% of the measured effect on "
                                    f"attention, the recommendation {attn_share}% of its parameters: they disagree.")
    ranked_by = budget.get("ranked_by") or []
    agreement = data.get("agreement") or {}
    if ranked_by:
        scale = budget.get("ranking_scale", "raw")
        if "ablation" in ranked_by:
            pairs = [v for k, v in agreement.items() if isinstance(v, (int, float)) and "ablation" in k.split("~")]
            agree = f"; its mean Spearman ρ with the other measures is {sum(pairs) / len(pairs):.2f}" if pairs else ""
            answer.trusted = (f"The ranking combines {', '.join(ranked_by)} ({scale} scale); the one to trust is "
                              f"the ablation: it measures the held-out loss directly, with bootstrap intervals{agree}.")
        else:
            pairs = [v for v in agreement.values() if isinstance(v, (int, float))]
            agree = f", which agree with mean Spearman ρ {sum(pairs) / len(pairs):.2f}" if pairs else ""
            answer.trusted = (f"The ranking averages {', '.join(ranked_by)} ({scale} scale){agree}; the ablation, the "
                              "direct measure, did not rank every module here"
                              + (", so weigh the group ablation above against the split." if groups else "."))
    answer.grid = _grid(data, modules, set(selected))
    return answer


def _grid(data: dict, modules: dict, selected: set) -> dict:
    measures = data.get("measures_per_param") or data.get("measures") or {}
    name = next((n for n in ("ablation", "first_order", "importance", "grad_norm") if measures.get(n)), None)
    scores = measures.get(name) or {} if name else {}
    layers = sorted({m["layer"] for m in modules.values()})
    types: list[str] = []
    for m in modules.values():
        if m["module"] not in types:
            types.append(m["module"])
    return {"measure": name, "layers": layers, "types": types,
            "cells": {k: scores.get(k) for k in modules}, "selected": sorted(selected)}


def grid_html(grid: dict, esc) -> str:
    """Layers × module types, cell shade by the per-parameter score, recommended cells outlined and marked ●."""
    if not grid.get("layers"):
        return ""
    values = [v for v in grid["cells"].values() if isinstance(v, (int, float))]
    top = max(values) if values else 0
    selected = set(grid["selected"])
    head = "".join(f"<th>{esc(t)}</th>" for t in grid["types"])
    rows = []
    for layer in grid["layers"]:
        cells = []
        for module in grid["types"]:
            key = f"L{layer}.{module}"
            if key not in grid["cells"]:
                cells.append("<td></td>")
                continue
            value = grid["cells"][key]
            shade = (max(value, 0) / top) if isinstance(value, (int, float)) and top > 0 else 0
            style = f"background:rgba(11,61,99,{0.08 + 0.8 * shade:.2f});color:{'#fff' if shade > 0.5 else '#111'}"
            mark = "●" if key in selected else ""
            cls = ' class="sel"' if key in selected else ""
            cells.append(f'<td{cls} style="{style}" title="{esc(key)}">{mark}</td>')
        rows.append(f"<tr><th>L{layer}</th>{''.join(cells)}</tr>")
    return (f'<table class="grid" id="answer-grid"><thead><tr><th>layer</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
            f'<p class="note">Shade: {esc(grid.get("measure"))} per LoRA parameter (darker = more sensitive); '
            "● = recommended.</p>")
