"""Overlay plots of several runs: losses and group gradient norms, one colour per configuration (seeds share it)."""

from __future__ import annotations

import logging
from pathlib import Path

from lorasens.presentation.plots.common import (
    EVAL_LOG,
    GROUP_NORMS,
    OKABE_ITO,
    TRAIN_LOG,
    MissingInput,
    mark_phases,
    new_figure,
    phase_boundaries,
    read_jsonl,
    read_table,
    save,
)

logger = logging.getLogger(__name__)
SEED_STYLES = ("-", "--", ":", "-.")
LEGEND_MAX_RUNS = 12  # above this, the legend lists configurations, not runs


def _styles(runs) -> list[tuple[str, str]]:
    """(colour, linestyle) per run: colour per configuration group, line style per seed within it."""
    groups = list(dict.fromkeys(r.group for r in runs))
    seen: dict[str, int] = {}
    styles = []
    for run in runs:
        index = seen.get(run.group, 0)
        seen[run.group] = index + 1
        styles.append((OKABE_ITO[groups.index(run.group) % len(OKABE_ITO)], SEED_STYLES[index % len(SEED_STYLES)]))
    return styles


def _label(run, many: bool) -> str:
    return run.group if many else run.name


def _legend(fig, axes) -> None:
    """One legend under the figure (runs, or configurations when there are many), not one per panel."""
    unique: dict = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique.update(zip(labels, handles))
    if unique:
        fig.legend(unique.values(), unique.keys(), fontsize=8, loc="outside lower center",
                   ncol=min(3, len(unique)), frameon=False)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _shared_phases(ax, runs) -> None:
    """Phase lines only when every run has the same boundaries (otherwise they would mislead)."""
    boundaries = {tuple(phase_boundaries(r.run_dir)) for r in runs}
    if len(boundaries) == 1 and next(iter(boundaries)):
        mark_phases(ax, runs[0].run_dir)


def plot_compare_losses(runs, out_dir: Path) -> Path:
    many = len(runs) > LEGEND_MAX_RUNS
    fig, (ax_train, ax_eval) = new_figure(1, 2, figsize=(13, 5.2), layout="constrained")
    drawn = False
    for run, (colour, style) in zip(runs, _styles(runs)):
        train = [r for r in read_jsonl(run.run_dir / TRAIN_LOG, tolerant=True) if r.get("loss") is not None]
        evals = [r for r in read_jsonl(run.run_dir / EVAL_LOG, tolerant=True) if r.get("eval_loss") is not None]
        if train:
            ax_train.plot([r["step"] for r in train], [r["loss"] for r in train], color=colour, linestyle=style,
                          linewidth=1.2, label=_label(run, many))
        if evals:
            ax_eval.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], color=colour, linestyle=style,
                         marker="o", markersize=3, label=_label(run, many))
        drawn |= bool(train or evals)
    if not drawn:
        plt_close(fig)
        raise MissingInput(f"no run has {TRAIN_LOG} or {EVAL_LOG}")
    for ax, title in ((ax_train, "Train loss"), (ax_eval, "Validation loss")):
        ax.set_title(title, fontsize=11)
        if not ax.lines:
            _empty(ax, f"no run recorded a {title.lower()}")
            continue
        _shared_phases(ax, runs)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.grid(alpha=0.3)
    _legend(fig, (ax_train, ax_eval))
    fig.suptitle("Loss per run (colour = configuration, line style = seed)", fontsize=11)
    return save(fig, Path(out_dir) / "comparison_losses.png")


def plot_compare_grad_norms(runs, out_dir: Path) -> Path:
    many = len(runs) > LEGEND_MAX_RUNS
    fig, axes = new_figure(1, 2, figsize=(13, 5.2), sharey=True, layout="constrained")
    missing = []
    for run, (colour, style) in zip(runs, _styles(runs)):
        try:
            table = read_table(run.run_dir, GROUP_NORMS, ("step", "attn", "mlp")).sort_values("step")
        except MissingInput as exc:
            missing.append(f"{run.name}: {exc}")
            continue
        for ax, group in zip(axes, ("attn", "mlp")):
            ax.plot(table["step"], table[group].astype(float), color=colour, linestyle=style, linewidth=1.2,
                    label=_label(run, many))
    if len(missing) == len(runs):
        plt_close(fig)
        raise MissingInput("; ".join(missing))
    for ax, title in zip(axes, ("Attention", "MLP")):
        _shared_phases(ax, runs)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title} LoRA gradient norm (gaps = frozen)", fontsize=11)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    axes[0].set_ylabel("LoRA gradient L2 norm")
    fig.suptitle("Group gradient norms per run (colour = configuration, line style = seed)", fontsize=11)
    if missing:
        logger.warning("comparison_grad_norms.png without: %s", "; ".join(missing))
    return save(fig, Path(out_dir) / "comparison_grad_norms.png")


def plt_close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


COMPARE_PLOTS = {
    "comparison_losses.png": (plot_compare_losses, "Train (left) and validation (right) loss of every run."),
    "comparison_grad_norms.png": (plot_compare_grad_norms, "Attention (left) and MLP (right) gradient norm of "
                                  "every run; a gap is a frozen period."),
}
