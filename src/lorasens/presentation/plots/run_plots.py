"""The plots of one run, each drawn from the run directory's files only.

Each `plot_*` function takes the run directory, writes one PNG there and returns its path; when an input file is
missing it raises `MissingInput` naming the file. `plot_run` draws all of them and reports what it could not draw.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from lorasens.errors import is_disk_error
from lorasens.presentation.plots.common import (
    ABLATION,
    EVAL_LOG,
    GROUP_NORMS,
    HEATMAP_CMAP,
    LAYER_NORMS,
    MODULE_NORMS,
    OKABE_ITO,
    PALETTE,
    SENSITIVITY,
    SENSITIVITY_CMAP,
    TRAIN_LOG,
    UPDATE_MAGNITUDE,
    MissingInput,
    colour_norm,
    frozen_handle,
    frozen_spans,
    mark_phases,
    masked_background,
    new_figure,
    phase_legend_handle,
    read_json,
    read_jsonl,
    read_table,
    save,
    shade_frozen,
    step_edges,
)

logger = logging.getLogger(__name__)

GROUP_LABELS = {"attn": "attention", "mlp": "MLP", "total": "all LoRA modules"}
# Hatches that tell the groups' frozen periods apart where they overlap.
GROUP_HATCH = {"attn": "///", "mlp": "\\\\\\"}
MEASURE_LABELS = {
    "grad_norm": "gradient L2 norm (mean over steps)",
    "importance": "importance |θ·∇θ| (bias-corrected EMA, last)",
    "update_magnitude": "‖ΔW‖_F = scaling·‖BA‖_F (final adapter)",
    "first_order": "-⟨B, ∂L/∂B⟩ predicted Δ loss (nats/token)",
    "ablation": "Δ analysis loss when removed (nats/token)",
    "combined": "combined score (mean normalised rank)",
}
ABLATION_KINDS = ("all", "group", "module_type", "layer", "module")
ABLATION_TOP = 20  # single-module bars shown (largest |Δ loss|)


def _title(ax, text: str, run_dir: Path) -> None:
    ax.set_title(f"{text} — {Path(run_dir).name}", fontsize=11)


def _markers(n: int) -> dict:
    return {"marker": "o", "markersize": 3} if n <= 60 else {}


def plot_training_loss(run_dir: Path) -> Path | None:
    """Train loss per logged step and validation loss per evaluation, with phase boundaries."""
    run_dir = Path(run_dir)
    train = [r for r in read_jsonl(run_dir / TRAIN_LOG, tolerant=True) if r.get("loss") is not None]
    evals = [r for r in read_jsonl(run_dir / EVAL_LOG, tolerant=True) if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = new_figure(figsize=(9, 4.8))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=PALETTE["train"], label="train loss",
                **_markers(len(train)))
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "s-", color=PALETTE["eval"],
                label="validation loss")
    handles, _ = ax.get_legend_handles_labels()
    if mark_phases(ax, run_dir):
        handles.append(phase_legend_handle())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    _title(ax, "Training and validation loss", run_dir)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="best")
    fig.tight_layout()
    return save(fig, run_dir / "training_loss.png")


def plot_gradient_norms(run_dir: Path) -> Path:
    """Group gradient norms (attention, MLP, all) per recorded step; frozen periods hatched per group."""
    run_dir = Path(run_dir)
    table = read_table(run_dir, GROUP_NORMS, ("step", "attn", "mlp", "total")).sort_values("step")
    steps = table["step"].tolist()
    fig, ax = new_figure(figsize=(9, 5))
    handles = []
    for group in ("attn", "mlp", "total"):
        values = table[group].astype(float).tolist()
        (line,) = ax.plot(steps, values, color=PALETTE[group], label=GROUP_LABELS[group],
                          linestyle="-" if group != "total" else ":", **_markers(len(steps)))
        handles.append(line)
        spans = frozen_spans(steps, values) if group != "total" else []
        if spans:
            shade_frozen(ax, spans, edge=PALETTE[group], hatch=GROUP_HATCH[group])
            handles.append(frozen_handle(f"{GROUP_LABELS[group]} frozen (no gradient)", PALETTE[group],
                                         GROUP_HATCH[group]))
    if mark_phases(ax, run_dir):
        handles.append(phase_legend_handle())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LoRA gradient L2 norm")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _title(ax, "Gradient norm per module group", run_dir)
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    return save(fig, run_dir / "gradient_norms.png")


def _layer_matrix(table, group: str, steps: list, layers: list) -> np.ndarray:
    pivot = table.pivot_table(index="layer", columns="step", values=group, aggfunc="first", dropna=False)
    return pivot.reindex(index=layers, columns=steps).to_numpy(dtype=float)


def plot_layer_heatmap(run_dir: Path) -> Path:
    """Layer x step gradient norm, attention above MLP, one shared colour scale; frozen cells hatched grey."""
    run_dir = Path(run_dir)
    table = read_table(run_dir, LAYER_NORMS, ("step", "layer", "attn", "mlp"))
    steps = sorted(table["step"].unique().tolist())
    layers = sorted(int(v) for v in table["layer"].unique())
    matrices = {g: _layer_matrix(table, g, steps, layers) for g in ("attn", "mlp")}
    norm, log = colour_norm(np.concatenate([m.ravel() for m in matrices.values()]).tolist())
    height = max(2.6, 0.18 * len(layers) + 1.4)
    fig, axes = new_figure(2, 1, figsize=(10, 2 * height + 1.0), sharex=True, layout="constrained")
    x_edges = step_edges(steps)
    y_edges = [layer - 0.5 for layer in layers] + [layers[-1] + 0.5]
    tick_every = max(1, len(layers) // 12)
    mesh = None
    for ax, group in zip(axes, ("attn", "mlp")):
        masked_background(ax)
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(matrices[group]), cmap=HEATMAP_CMAP,
                             norm=norm, shading="flat")
        mark_phases(ax, run_dir, color="white", annotate=group == "attn")
        ax.set_ylabel(f"{GROUP_LABELS[group]}\nlayer index")
        ax.set_yticks(layers[::tick_every])
        ax.set_ylim(layers[-1] + 0.5, layers[0] - 0.5)  # layer 0 at the top, as in the model
        ax.set_title(GROUP_LABELS[group], fontsize=10, loc="left")
    axes[-1].set_xlabel("optimizer step")
    bar = fig.colorbar(mesh, ax=list(axes), shrink=0.9)
    bar.set_label("LoRA gradient L2 norm" + (" (log scale)" if log else ""))
    fig.suptitle(f"Gradient norm per layer — {run_dir.name}", fontsize=11)
    fig.legend(handles=[frozen_handle(), phase_legend_handle()], loc="outside lower center", ncol=2, fontsize=8,
               frameon=False)
    return save(fig, run_dir / "layer_heatmap.png")


def plot_layer_comparison(run_dir: Path) -> Path:
    """Per layer: mean gradient norm of attention vs MLP over the steps they trained (and ‖ΔW‖ when recorded)."""
    run_dir = Path(run_dir)
    table = read_table(run_dir, LAYER_NORMS, ("step", "layer", "attn", "mlp"))
    layers = sorted(int(v) for v in table["layer"].unique())
    try:
        update = read_table(run_dir, UPDATE_MAGNITUDE, ("step", "layer", "group", "delta_w_norm"))
    except MissingInput as exc:
        logger.info("layer_comparison.png without the update panel: %s", exc)
        update = None
    fig, axes = new_figure(1 if update is None else 2, 1, figsize=(max(8, 0.45 * len(layers) + 3), 4.2 if update is None else 7.5),
                           squeeze=False)
    axes = axes[:, 0]
    x = np.arange(len(layers))
    width = 0.4
    stats = table.groupby("layer")[["attn", "mlp"]].agg(["mean", "std", "count"]).reindex(layers)
    ax = axes[0]
    for offset, group in ((-width / 2, "attn"), (width / 2, "mlp")):
        mean = stats[(group, "mean")].to_numpy(dtype=float)
        std = np.nan_to_num(stats[(group, "std")].to_numpy(dtype=float))
        ax.bar(x + offset, np.nan_to_num(mean), width, yerr=std, capsize=2, color=PALETTE[group],
               label=f"{GROUP_LABELS[group]} (mean ± std over trained steps)")
        never = np.isnan(mean)
        if never.any():  # a group that never trained in this layer: a hatched stub, not a zero bar
            top = np.nanmax(np.nan_to_num(mean)) or 1.0
            ax.bar(x[never] + offset, np.full(never.sum(), 0.04 * top), width, color="#e0e0e0", hatch="///",
                   edgecolor="#8c8c8c")
    handles, _ = ax.get_legend_handles_labels()
    if stats[[("attn", "mean"), ("mlp", "mean")]].isna().any().any():
        handles.append(frozen_handle("never trained in this layer"))
    ax.legend(handles=handles, fontsize=8)
    ax.set_ylabel("LoRA gradient L2 norm")
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_xlabel("layer index")
    ax.grid(alpha=0.3, axis="y")
    _title(ax, "Attention vs MLP per layer", run_dir)
    if update is not None:
        last = update[update["step"] == update["step"].max()].copy()
        last["sq"] = last["delta_w_norm"].astype(float) ** 2
        per = last.groupby(["layer", "group"])["sq"].sum(min_count=1).unstack("group").reindex(layers)
        ax2 = axes[1]
        for offset, group in ((-width / 2, "attn"), (width / 2, "mlp")):
            values = np.sqrt(per[group].to_numpy(dtype=float)) if group in per else np.full(len(layers), np.nan)
            ax2.bar(x + offset, np.nan_to_num(values), width, color=PALETTE[group], label=GROUP_LABELS[group])
        ax2.set_ylabel("‖ΔW‖_F of the group\n(root sum of squares)")
        ax2.set_xticks(x, [str(layer) for layer in layers])
        ax2.set_xlabel("layer index")
        ax2.set_title(f"Weight update at the end of training (step {int(update['step'].max())})", fontsize=10)
        ax2.grid(alpha=0.3, axis="y")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, run_dir / "layer_comparison.png")


def plot_gradient_evolution(run_dir: Path) -> Path:
    """How the gradient moves: norm per module type over steps, and each layer's share of the squared norm."""
    run_dir = Path(run_dir)
    missing = []
    try:
        modules = read_table(run_dir, MODULE_NORMS, ("step", "layer", "group", "module", "grad_norm"))
    except MissingInput as exc:
        modules, missing = None, missing + [str(exc)]
    try:
        layers = read_table(run_dir, LAYER_NORMS, ("step", "layer", "attn", "mlp"))
    except MissingInput as exc:
        layers, missing = None, missing + [str(exc)]
    if modules is None and layers is None:
        raise MissingInput("; ".join(missing))
    panels = [p for p in (modules, layers) if p is not None]
    fig, axes = new_figure(len(panels), 1, figsize=(9, 4.2 * len(panels)), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    if modules is not None:
        ax = axes.pop(0)
        modules = modules.assign(sq=modules["grad_norm"].astype(float) ** 2)
        per = modules.groupby(["step", "module"], sort=True)["sq"].sum(min_count=1).unstack("module")
        order = list(dict.fromkeys(modules.sort_values(["group"], kind="stable")["module"]))
        group_of = dict(zip(modules["module"], modules["group"]))
        handles = []
        for i, module in enumerate(order):
            values = np.sqrt(per[module].to_numpy(dtype=float))
            (line,) = ax.plot(per.index, values, color=OKABE_ITO[i % len(OKABE_ITO)],
                              linestyle="-" if group_of[module] == "attn" else "--",
                              label=f"{module} ({GROUP_LABELS.get(group_of[module], group_of[module])})",
                              **_markers(len(per)))
            handles.append(line)
        for group in ("attn", "mlp"):  # a band where the whole group is frozen, as in gradient_norms.png
            members = [m for m in order if group_of[m] == group]
            if not members:
                continue
            frozen = per[members].isna().all(axis=1)
            spans = frozen_spans(per.index.tolist(), [math.nan if f else 1.0 for f in frozen])
            if spans:
                shade_frozen(ax, spans, edge=PALETTE[group], hatch=GROUP_HATCH[group])
                handles.append(frozen_handle(f"{GROUP_LABELS[group]} frozen", PALETTE[group], GROUP_HATCH[group]))
        if mark_phases(ax, run_dir):
            handles.append(phase_legend_handle())
        ax.set_ylabel("gradient L2 norm\n(all layers, A and B)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        _title(ax, "Gradient per module type", run_dir)
    if layers is not None:
        ax = axes.pop(0)
        sq = layers.assign(sq=layers["attn"].astype(float).pow(2).fillna(0) + layers["mlp"].astype(float).pow(2).fillna(0))
        per = sq.pivot_table(index="step", columns="layer", values="sq", aggfunc="first").sort_index()
        totals = per.sum(axis=1)
        recorded = totals > 0
        share = per.div(totals.where(recorded), axis=0)
        import matplotlib.pyplot as plt

        colours = plt.get_cmap(HEATMAP_CMAP)(np.linspace(0, 1, max(2, per.shape[1])))
        ax.stackplot(share.index, np.nan_to_num(share.to_numpy(dtype=float).T), colors=colours[: per.shape[1]],
                     labels=[f"layer {c}" for c in per.columns])
        shade_frozen(ax, frozen_spans(share.index.tolist(), [np.nan if not r else 1.0 for r in recorded]))
        mark_phases(ax, run_dir, color="white" if modules is None else "#333333", annotate=modules is None)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of squared\ngradient norm")
        ncol = 1 if per.shape[1] <= 12 else 2
        ax.legend(fontsize=6, ncol=ncol, loc="center left", bbox_to_anchor=(1.01, 0.5), title="layer", title_fontsize=7)
        ax.set_title("Where the gradient goes: share per layer (layer 0 at the bottom)", fontsize=10)
    for ax in fig.axes:
        if ax.get_xlabel() == "" and ax is fig.axes[len(panels) - 1]:
            ax.set_xlabel("optimizer step")
    fig.tight_layout()
    return save(fig, run_dir / "gradient_evolution.png")


def _measure_order(measures: dict) -> list[str]:
    known = [m for m in MEASURE_LABELS if m in measures]
    return known + sorted(m for m in measures if m not in MEASURE_LABELS)


def plot_sensitivity_heatmap(run_dir: Path) -> Path:
    """Layer x module type, one panel per sensitivity measure (from sensitivity.json); unmeasured cells hatched."""
    run_dir = Path(run_dir)
    data = read_json(run_dir / SENSITIVITY, tolerant=True)
    if data is None:
        raise MissingInput(f"{SENSITIVITY} is missing")
    modules, measures = data.get("modules") or [], data.get("measures") or {}
    if not modules or not measures:
        raise MissingInput(f"{SENSITIVITY} has no modules or no measures")
    types = list(dict.fromkeys(m["module"] for m in sorted(modules, key=lambda m: (m["group"] != "attn",))))
    layers = sorted({int(m["layer"]) for m in modules})
    names = _measure_order(measures)
    ncols = 3 if len(names) > 4 else len(names)
    nrows = math.ceil(len(names) / ncols)
    height = max(3.2, 0.25 * len(layers) + 1.8)
    fig, axes = new_figure(nrows, ncols, figsize=(3.6 * ncols + 1, height * nrows + 0.6), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    any_missing = False
    # Modules whose ablation rank interval is wide (sensitivity.json "ablation"): their rank is not settled.
    wide = set((data.get("ablation") or {}).get("wide_rank_interval") or [])
    for ax, name in zip(axes.ravel(), names):
        scores = measures[name] or {}
        grid = np.full((len(layers), len(types)), np.nan)
        for m in modules:
            value = scores.get(m["key"])
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                grid[layers.index(int(m["layer"])), types.index(m["module"])] = float(value)
        any_missing |= bool(np.isnan(grid).any())
        masked_background(ax)
        norm, log = colour_norm(grid.ravel().tolist())
        mesh = ax.pcolormesh(np.arange(len(types) + 1) - 0.5, np.arange(len(layers) + 1) - 0.5,
                             np.ma.masked_invalid(grid), cmap=SENSITIVITY_CMAP, norm=norm)
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7 if len(layers) > 12 else 8)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        ax.set_xlabel("module type")
        ax.set_ylabel("layer index")
        ax.set_title(name, fontsize=10)
        if name == "ablation" and wide:
            cells = [(types.index(m["module"]), layers.index(int(m["layer"]))) for m in modules if m["key"] in wide]
            ax.scatter([x for x, _ in cells], [y for _, y in cells], marker="x", s=28, color="#d62728", linewidths=1.4)
        bar = fig.colorbar(mesh, ax=ax, shrink=0.9)
        bar.set_label(MEASURE_LABELS.get(name, name) + (" (log)" if log else ""), fontsize=8)
    fig.suptitle(f"Sensitivity per layer and module type — {run_dir.name}", fontsize=11)
    handles = [frozen_handle("not measured (not trained, not targeted, or beyond --ablation_max_single)")] if any_missing else []
    if wide:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="x", color="#d62728", linestyle="", label="ablation rank interval (95%) "
                              "spans more than a quarter of the ablated modules"))
    if handles:
        fig.legend(handles=handles, loc="lower center", fontsize=8, frameon=False, ncol=len(handles))
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 0.95))
    return save(fig, run_dir / "sensitivity_heatmap.png")


def plot_ablation(run_dir: Path) -> Path:
    """Δ validation loss when a group, module type, layer or single module is switched off (bars, per kind)."""
    run_dir = Path(run_dir)
    table = read_table(run_dir, ABLATION, ("kind", "name", "group", "loss", "delta_loss"))
    reference = (table["kind"] == "all") & (table["delta_loss"].fillna(0) == 0)  # the all-on row: Δ = 0 by definition
    full = table.loc[reference, "loss"]
    table = table[table["delta_loss"].notna() & ~reference]
    kinds = [k for k in ABLATION_KINDS if (table["kind"] == k).any()]
    if not kinds:
        raise MissingInput(f"{ABLATION} has no group/layer/module ablation rows")
    sizes = []
    for kind in kinds:
        rows = table[table["kind"] == kind]
        sizes.append(min(len(rows), ABLATION_TOP))
    fig, axes = new_figure(len(kinds), 1, figsize=(9, sum(0.28 * s + 1.1 for s in sizes) + 0.8),
                           gridspec_kw={"height_ratios": [s + 2 for s in sizes]}, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        rows = table[table["kind"] == kind].copy()
        title = {"all": "all LoRA modules", "group": "module group", "module_type": "module type", "layer": "layer",
                 "module": "single module"}[kind]
        if len(rows) > ABLATION_TOP:
            rows = rows.reindex(rows["delta_loss"].abs().sort_values(ascending=False).index[:ABLATION_TOP])
            title += f" (top {ABLATION_TOP} of {int((table['kind'] == kind).sum())} by |Δ|)"
        rows = rows.sort_values("delta_loss")
        colours = [PALETTE.get(str(g), PALETTE["layer"] if kind == "layer" else "#999999") for g in rows["group"].fillna("")]
        delta = rows["delta_loss"].astype(float)
        xerr = None
        if {"delta_ci_low", "delta_ci_high"} <= set(rows.columns) and rows["delta_ci_low"].notna().all():
            # The bootstrap 95% interval of each delta (paired over the analysis examples).
            xerr = np.vstack([(delta - rows["delta_ci_low"].astype(float)).clip(lower=0),
                              (rows["delta_ci_high"].astype(float) - delta).clip(lower=0)])
        ax.barh([str(n) for n in rows["name"]], delta, color=colours, xerr=xerr,
                error_kw={"ecolor": "#333333", "elinewidth": 0.8, "capsize": 2})
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_title(f"Switched off: {title}", fontsize=10, loc="left")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("Δ analysis-split loss when switched off (nats/token; > 0 = the modules matter; "
                           "bars: bootstrap 95% CI)")
    from matplotlib.patches import Patch

    handles = [Patch(color=PALETTE["attn"], label="attention"), Patch(color=PALETTE["mlp"], label="MLP"),
               Patch(color=PALETTE["layer"], label="whole layer"), Patch(color="#999999", label="everything")]
    fig.legend(handles=handles, fontsize=8, loc="upper right", ncol=3, frameon=False)
    suffix = f" (analysis loss with all LoRA on: {float(full.iloc[0]):.4f})" if len(full) else ""
    fig.suptitle(f"Ablation — {run_dir.name}{suffix}", fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, run_dir / "ablation.png")


def _training_loss_or_missing(run_dir: Path) -> Path:
    path = plot_training_loss(run_dir)
    if path is None:
        raise MissingInput(f"{TRAIN_LOG} and {EVAL_LOG} are missing or empty")
    return path


# File name -> (function, one-line "how to read it" shown under the image in the report).
RUN_PLOTS = {
    "training_loss.png": (_training_loss_or_missing, "Train loss per logged step and validation loss per evaluation; "
                          "dashed lines mark phase boundaries."),
    "gradient_norms.png": (plot_gradient_norms, "L2 norm of the LoRA gradient of each module group per step; a "
                           "hatched band means the group was frozen (no gradient), not a zero gradient."),
    "layer_heatmap.png": (plot_layer_heatmap, "Gradient norm per layer (rows, layer 0 on top) and step (columns); "
                          "hatched grey cells are frozen, white dashed lines are phase boundaries."),
    "layer_comparison.png": (plot_layer_comparison, "Per layer: mean gradient norm of attention vs MLP over the "
                             "steps they trained (error bar: std over steps); the weight update ‖ΔW‖ at the end."),
    "gradient_evolution.png": (plot_gradient_evolution, "Top: gradient norm per module type over steps (gaps = "
                               "frozen). Bottom: each layer's share of the squared gradient norm."),
    "sensitivity_heatmap.png": (plot_sensitivity_heatmap, "Each sensitivity measure per layer and module type; "
                                "brighter = more sensitive; hatched = not measured."),
    "ablation.png": (plot_ablation, "How much the validation loss rises when LoRA is switched off for a group, "
                     "module type, layer or single module; longer bars to the right matter more."),
}


def plot_run(run_dir: Path, redraw: bool = True) -> dict[str, Path | str]:
    """Draw every run plot. Returns file name -> path when drawn, or the reason (what is missing) when not.

    `redraw=False` keeps a PNG that already exists and draws only the absent ones.
    """
    run_dir = Path(run_dir)
    outcome: dict[str, Path | str] = {}
    for name, (function, _) in RUN_PLOTS.items():
        if not redraw and (run_dir / name).is_file():
            outcome[name] = run_dir / name
            continue
        try:
            outcome[name] = function(run_dir)
        except MissingInput as exc:
            logger.warning("%s not drawn: %s", name, exc)
            outcome[name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a malformed file must not stop the other plots or the report
            if is_disk_error(exc):  # read-only or full folder: every plot would fail; one line from the CLI instead
                raise
            logger.warning("%s not drawn: %s: %s", name, type(exc).__name__, exc, exc_info=True)
            outcome[name] = f"could not be drawn ({type(exc).__name__}: {exc})"
    return outcome
