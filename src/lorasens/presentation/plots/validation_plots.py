"""The plot of `lorasens validate`: every arm's test loss (and first metric), one row per arm, a dot per training.

Drawn from placement_validation.csv / .json only, so a validation folder can be redrawn later.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lorasens.presentation.plots.common import OKABE_ITO, MissingInput, new_figure, save
from lorasens.rundir.files import VALIDATION_CSV as CSV_FILE
from lorasens.rundir.files import VALIDATION_JSON as JSON_FILE
from lorasens.rundir.files import VALIDATION_PNG as PNG_FILE

FAMILY_COLOUR = {"lorasens": OKABE_ITO[3], "peer": OKABE_ITO[0], "control": OKABE_ITO[7], "ceiling": OKABE_ITO[2]}


def _group(arm: str) -> str:
    return "random" if arm.startswith("random_") else arm


def plot_placement_validation(out_dir: str | Path) -> Path:
    """Left: test loss; right (when generated): the dataset's first metric. Rows: arms, best mean loss on top;
    small dots: single trainings (random: each set x seed); large marker: the arm's mean."""
    out_dir = Path(out_dir)
    for name in (CSV_FILE, JSON_FILE):
        if not (out_dir / name).exists():
            raise MissingInput(f"{name} is missing in {out_dir}")
    with (out_dir / CSV_FILE).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    summary = json.loads((out_dir / JSON_FILE).read_text())
    metric_columns = [c for c in (rows[0] if rows else {}) if c.startswith("metric_")]
    panels = [("test_loss", "test loss (nats/target token)")]
    if metric_columns:
        panels.append((metric_columns[0], metric_columns[0].removeprefix("metric_")))
    arms = {g: e for g, e in summary["arms"].items() if e.get("test_loss") is not None}
    order = sorted(arms, key=lambda g: -arms[g]["test_loss"])
    fig, axes = new_figure(figsize=(5.2 * len(panels), 0.42 * len(order) + 1.8), ncols=len(panels))
    axes = axes if isinstance(axes, (list, tuple)) or hasattr(axes, "__len__") else [axes]
    for ax, (column, label) in zip(axes, panels):
        for y, group in enumerate(order):
            colour = FAMILY_COLOUR.get(arms[group]["family"], OKABE_ITO[1])
            values = [float(r[column]) for r in rows if _group(r["arm"]) == group and r.get(column) not in ("", None)]
            ax.scatter(values, [y] * len(values), s=14, color=colour, alpha=0.45, zorder=2)
            if values:
                ax.scatter([sum(values) / len(values)], [y], s=70, marker="D" if group == "recommended" else "o",
                           color=colour, edgecolor="black", linewidth=0.6, zorder=3)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([f"{g} (lr {arms[g]['lr']:g})" if arms[g].get("lr") else g for g in order], fontsize=8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    settings = summary["settings"]
    fig.suptitle(f"{summary['model']} on {summary['dataset']}: {settings['max_steps']} steps, "
                 f"{summary['budget']['lora_params']:,} LoRA parameters (±5%); colours: lorasens / peer / control / all",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir / PNG_FILE)
