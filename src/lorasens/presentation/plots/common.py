"""Shared plot helpers: reading run files, phase boundaries, frozen periods, colour-blind-safe colours.

Plots read only files of the run directory (never live training objects), so `lorasens report RUN_DIR` can redraw
any run. An empty CSV cell means "frozen / not recorded", never 0: it stays NaN here and is drawn as a hatched grey
area, so a frozen module never looks like a module whose gradient is zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# The run-directory module owns the names of the files plots read; safeio the JSON readers (tolerant=True here).
from lorasens.rundir.files import (  # noqa: E402, F401 - re-exported for the plot modules
    ABLATION, EVAL_LOG, GROUP_NORMS, IMPORTANCE, LAYER_NORMS, MODULE_NORMS, PHASES, SENSITIVITY, TRAIN_LOG,
    UPDATE_MAGNITUDE,
)
from lorasens.safeio import read_json, read_jsonl  # noqa: E402, F401 - re-exported for the plot modules

# Okabe-Ito: a colour-blind-safe palette (Okabe & Ito 2008).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
PALETTE = {"train": "#0072B2", "eval": "#D55E00", "attn": "#0072B2", "mlp": "#E69F00", "total": "#000000",
           "layer": "#009E73", "phase": "#555555"}
# Sequential maps that stay readable in grey scale and for colour-blind readers.
HEATMAP_CMAP = "viridis"
SENSITIVITY_CMAP = "cividis"
# Frozen / not recorded: hatched light grey, a texture no colour map produces.
FROZEN_FACE, FROZEN_EDGE, FROZEN_HATCH = "#e0e0e0", "#8c8c8c", "///"
FROZEN_LABEL = "frozen / not recorded (no gradient)"
DPI = 110
MAX_PHASE_LABELS = 8  # more boundaries (e.g. LISA resampling) get thin unlabelled lines instead of a text pile-up

class MissingInput(Exception):
    """A plot cannot be drawn because an input file is absent, empty or lacks columns; the message names it."""


def read_table(run_dir: Path, name: str, columns: tuple[str, ...]):
    """A tidy CSV of the run as a DataFrame (empty cells = NaN); `MissingInput` names what is absent."""
    import pandas as pd

    path = Path(run_dir) / name
    if not path.is_file():
        raise MissingInput(f"{name} is missing")
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise MissingInput(f"{name} is unreadable ({str(exc).splitlines()[0]})") from None
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise MissingInput(f"{name} lacks column(s) {', '.join(absent)}")
    if table.empty:
        raise MissingInput(f"{name} has no rows")
    return table


def phase_boundaries(run_dir: Path) -> list[tuple[int, str]]:
    """(step, label) of each phase start after the first, from phases.json (empty for static runs).

    A transition at step s is applied before optimizer step s+1, so the boundary lies between steps s and s+1.
    """
    phases = read_json(Path(run_dir) / PHASES, tolerant=True) or {}
    return [(int(t["step"]), str(t.get("label", t.get("phase", "")))) for t in phases.get("transitions", [])
            if t.get("step", 0) > 0]


def mark_phases(ax, run_dir: Path, color: str = PALETTE["phase"], annotate: bool = True) -> bool:
    """Dashed vertical lines at the phase boundaries, labelled with the phase that starts; True if any."""
    boundaries = phase_boundaries(run_dir)
    many = len(boundaries) > MAX_PHASE_LABELS
    for step, label in boundaries:
        ax.axvline(step + 0.5, color=color, linestyle="--", linewidth=0.6 if many else 1.2, zorder=3)
        if annotate and not many:
            ax.annotate(f"→ {label}", (step + 0.5, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color=color)
    return bool(boundaries)


def phase_legend_handle():
    from matplotlib.lines import Line2D

    return Line2D([], [], color=PALETTE["phase"], linestyle="--", label="phase boundary")


def frozen_spans(steps, values) -> list[tuple[float, float]]:
    """Step intervals over which `values` are NaN (frozen), as (start, end) half a step around each step."""
    spans: list[tuple[float, float]] = []
    start = None
    previous = None
    for step, value in zip(steps, values):
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        if missing and start is None:
            start = step
        if not missing and start is not None:
            spans.append((start - 0.5, previous + 0.5))
            start = None
        previous = step
    if start is not None:
        spans.append((start - 0.5, previous + 0.5))
    return spans


def shade_frozen(ax, spans, edge: str = FROZEN_EDGE, hatch: str = FROZEN_HATCH) -> None:
    for start, end in spans:
        ax.axvspan(start, end, facecolor=FROZEN_FACE, edgecolor=edge, hatch=hatch, alpha=0.5, linewidth=0, zorder=0)


def frozen_handle(label: str = FROZEN_LABEL, edge: str = FROZEN_EDGE, hatch: str = FROZEN_HATCH) -> Patch:
    return Patch(facecolor=FROZEN_FACE, edgecolor=edge, hatch=hatch, label=label)


def step_edges(steps) -> list[float]:
    """Cell edges for a heatmap column per recorded step (steps may be irregular, e.g. every N steps)."""
    steps = [float(s) for s in steps]
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]


def colour_norm(values):
    """Log colour scale when all values are positive and span more than two decades, else linear."""
    from matplotlib.colors import LogNorm, Normalize

    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return Normalize(0, 1), False
    low, high = min(finite), max(finite)
    if low > 0 and high / low > 100:
        return LogNorm(low, high), True
    if low == high:
        return Normalize(low - 0.5 if low == 0 else low * 0.9, high + 0.5 if high == 0 else high * 1.1), False
    return Normalize(low, high), False


def masked_background(ax) -> None:
    """Hatched grey behind a heatmap whose NaN cells are transparent: frozen cells show this texture."""
    ax.set_facecolor(FROZEN_FACE)
    ax.patch.set_hatch(FROZEN_HATCH)
    ax.patch.set_edgecolor(FROZEN_EDGE)


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def new_figure(nrows: int = 1, ncols: int = 1, figsize=(9, 5), **kwargs):
    return plt.subplots(nrows, ncols, figsize=figsize, **kwargs)
