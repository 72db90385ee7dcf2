"""Plots drawn only from the files in a run directory, so any run can be redrawn later (`lorasens report`).

`common` holds the readers and the shared look (Okabe-Ito colours, phase lines, hatched frozen periods),
`run_plots` the plots of one run, `compare_plots` the overlays of several runs.
"""

from lorasens.presentation.plots.common import PALETTE, MissingInput, mark_phases, phase_boundaries, read_jsonl
from lorasens.presentation.plots.run_plots import (
    RUN_PLOTS,
    plot_ablation,
    plot_gradient_evolution,
    plot_gradient_norms,
    plot_layer_comparison,
    plot_layer_heatmap,
    plot_run,
    plot_sensitivity_heatmap,
    plot_training_loss,
)

__all__ = [
    "PALETTE", "MissingInput", "RUN_PLOTS", "mark_phases", "phase_boundaries", "plot_ablation",
    "plot_gradient_evolution", "plot_gradient_norms", "plot_layer_comparison", "plot_layer_heatmap", "plot_run",
    "plot_sensitivity_heatmap", "plot_training_loss", "read_jsonl",
]
