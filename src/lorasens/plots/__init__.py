"""Plots drawn only from the files in a run directory, so any run can be redrawn later."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# Okabe-Ito: a colour-blind-safe palette.
PALETTE = {"train": "#0072B2", "eval": "#D55E00", "attn": "#0072B2", "mlp": "#E69F00", "total": "#000000",
           "phase": "#999999"}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def phase_boundaries(run_dir: Path) -> list[tuple[int, str]]:
    """(step, label) of each phase start after the first, from phases.json (empty for static runs)."""
    path = run_dir / "phases.json"
    if not path.exists():
        return []
    transitions = json.loads(path.read_text()).get("transitions", [])
    return [(t["step"], t["label"]) for t in transitions if t["step"] > 0]


def mark_phases(ax, run_dir: Path) -> None:
    for step, label in phase_boundaries(run_dir):
        ax.axvline(step, color=PALETTE["phase"], linestyle="--", linewidth=1)
        ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="#555555")


def plot_training_loss(run_dir: Path) -> Path | None:
    run_dir = Path(run_dir)
    train = read_jsonl(run_dir / "train_log.jsonl")
    evals = read_jsonl(run_dir / "eval_log.jsonl")
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=PALETTE["train"], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=PALETTE["eval"],
                label="validation loss")
    mark_phases(ax, run_dir)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"Training loss — {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "training_loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
