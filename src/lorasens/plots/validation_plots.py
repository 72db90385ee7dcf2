"""The plot of `lorasens validate`: test loss against LoRA parameters, one point per placement (mean, 95% CI).

Drawn from placement_validation.csv / .json only, so a validation folder can be redrawn later.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lorasens.rundir.files import VALIDATION_CSV as CSV_FILE
from lorasens.rundir.files import VALIDATION_JSON as JSON_FILE
from lorasens.rundir.files import VALIDATION_PNG as PNG_FILE
from lorasens.plots.common import OKABE_ITO, MissingInput, new_figure, save
KIND_STYLE = {  # colour, marker, legend label
    "recommended": (OKABE_ITO[3], "*", "recommended"),
    "matched_random": (OKABE_ITO[7], "o", "random, matched LoRA parameters"),
    "heuristic": (OKABE_ITO[0], "s", "heuristic at the same budget"),
    "ceiling": (OKABE_ITO[2], "^", "all modules (ceiling)"),
    "complement": (OKABE_ITO[1], "v", "complement of the recommendation"),
}


def plot_placement_validation(out_dir: str | Path) -> Path:
    """Each seed's test loss as a small dot; per placement the mean over seeds with its 95% CI as an error bar.

    The x axis is the placement's LoRA parameter count (log scale): placements at the budget share one column, so
    the recommendation is read against the random sets and heuristics directly above and below it.
    """
    out_dir = Path(out_dir)
    for name in (CSV_FILE, JSON_FILE):
        if not (out_dir / name).exists():
            raise MissingInput(f"{name} is missing in {out_dir}")
    with (out_dir / CSV_FILE).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    summary = json.loads((out_dir / JSON_FILE).read_text())
    fig, ax = new_figure(figsize=(9, 5.2))
    seen_kinds: set[str] = set()
    shown = {name: e for name, e in summary["placements"].items() if name != "matched_random"}  # sets one by one
    xs = dodged_positions({name: e["lora_params"] for name, e in shown.items()})
    for name, entry in shown.items():
        kind = entry["kind"]
        colour, marker, label = KIND_STYLE[kind]
        x = xs[name]
        seeds = [float(r["test_loss"]) for r in rows if r["placement"] == name]
        ax.scatter([x] * len(seeds), seeds, s=12, color=colour, alpha=0.35, zorder=2)
        loss = entry["test_loss"]
        err = None
        if loss["ci_low"] is not None:
            err = [[loss["mean"] - loss["ci_low"]], [loss["ci_high"] - loss["mean"]]]
        ax.errorbar([x], [loss["mean"]], yerr=err, fmt=marker, color=colour, markersize=11 if kind == "recommended" else 7,
                    capsize=4, zorder=3, label=None if kind in seen_kinds else label)
        seen_kinds.add(kind)
        ax.annotate(name, (x, loss["mean"]), textcoords="offset points", xytext=(7, -3), fontsize=8)
    ax.axvline(summary["budget_lora_params"], color="#999999", linestyle=":", linewidth=1, zorder=1)
    ax.set_xscale("log")
    ax.set_xlabel("LoRA parameters (log scale; dotted: the recommendation's budget; placements of about the same size "
                  "are spread sideways)", fontsize=9)
    ax.set_ylabel("test loss (nats/target token)")
    ax.set_title(f"Placement validation — {summary.get('model')} on {summary.get('dataset')}, "
                 f"{len(summary['seeds'])} seed(s), {summary['max_steps']} steps\nmean and 95% CI over seeds; dots: single seeds",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save(fig, out_dir / PNG_FILE)


def dodged_positions(params: dict[str, int], spread: float = 0.07, same: float = 0.06) -> dict[str, float]:
    """x positions: placements within `same` (relative) of each other share a column and are spread around it by
    factors of (1 + spread) on the log axis, in the given order, so their markers and labels do not overlap."""
    positions: dict[str, float] = {}
    groups: list[list[str]] = []
    for name, value in params.items():
        group = next((g for g in groups if abs(params[g[0]] - value) <= same * params[g[0]]), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    for group in groups:
        centre = params[group[0]]
        for i, name in enumerate(group):
            positions[name] = centre * (1 + spread) ** (i - (len(group) - 1) / 2)
    return positions
