"""Plots drawn from a tiny real run's directory: every file, valid PNGs, frozen periods where the phases say."""

from __future__ import annotations

import json
import math

import pytest
from report_helpers import copy_run, png_size, tiny_run_dir

from lorasens.presentation.plots import RUN_PLOTS, plot_run, plot_sensitivity_heatmap
from lorasens.presentation.plots.common import frozen_spans, phase_boundaries, read_table, step_edges

EXPECTED = ("training_loss.png", "gradient_norms.png", "layer_heatmap.png", "layer_comparison.png",
            "gradient_evolution.png", "sensitivity_heatmap.png", "ablation.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory)


@pytest.mark.slow
def test_every_plot_is_drawn_from_the_run_files(run_dir, tmp_path):
    # Redraw into a copy without the model: the plots need nothing but the files.
    copy = copy_run(run_dir, tmp_path / "copy")
    for name in EXPECTED:
        (copy / name).unlink(missing_ok=True)
    outcome = plot_run(copy)
    assert set(outcome) == set(EXPECTED) == set(RUN_PLOTS)
    for name in EXPECTED:
        assert outcome[name] == copy / name, f"{name}: {outcome[name]}"
        width, height = png_size(copy / name)
        assert width >= 400 and height >= 300, (name, width, height)
        assert (copy / name).stat().st_size > 5_000  # a drawn figure, not an empty canvas


@pytest.mark.slow
def test_the_run_itself_wrote_every_plot(run_dir):
    for name in EXPECTED:
        assert png_size(run_dir / name)[0] >= 400


def test_frozen_spans_follow_the_phase_schedule(run_dir):
    # both (steps 1-2) -> mlp (3-4) -> attn (5-6): attention is frozen in 3-4, the MLP in 5-6.
    assert phase_boundaries(run_dir) == [(2, "mlp"), (4, "attn")]
    table = read_table(run_dir, "gradient_analysis.group_norms.csv", ("step", "attn", "mlp")).sort_values("step")
    steps = table["step"].tolist()
    assert steps == [1, 2, 3, 4, 5, 6]
    assert frozen_spans(steps, table["attn"].tolist()) == [(2.5, 4.5)]
    assert frozen_spans(steps, table["mlp"].tolist()) == [(4.5, 6.5)]
    # Frozen is NaN, not zero: the trained group has a positive norm at the same steps.
    assert all(v > 0 for v in table["mlp"].iloc[2:4]) and all(math.isnan(v) for v in table["attn"].iloc[2:4])


def test_frozen_spans_and_step_edges_on_known_input():
    nan = float("nan")
    assert frozen_spans([1, 2, 3, 4, 5], [1.0, nan, nan, 0.0, nan]) == [(1.5, 3.5), (4.5, 5.5)]
    assert frozen_spans([10, 20], [0.0, 0.0]) == []  # a zero gradient is not frozen
    assert step_edges([10, 20, 40]) == [5.0, 15.0, 30.0, 50.0]
    assert step_edges([7]) == [6.5, 7.5]


@pytest.mark.slow
def test_missing_files_are_named_and_the_rest_is_drawn(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path / "partial")
    for name in ("gradient_analysis.layer_norms.csv", "sensitivity.json", *EXPECTED):
        (copy / name).unlink(missing_ok=True)
    outcome = plot_run(copy)
    assert outcome["layer_heatmap.png"] == "gradient_analysis.layer_norms.csv is missing"
    assert outcome["layer_comparison.png"] == "gradient_analysis.layer_norms.csv is missing"
    assert outcome["sensitivity_heatmap.png"] == "sensitivity.json is missing"
    for name in ("training_loss.png", "gradient_norms.png", "gradient_evolution.png", "ablation.png"):
        assert outcome[name] == copy / name and png_size(copy / name)[0] >= 400


@pytest.mark.slow
def test_sensitivity_heatmap_draws_a_measure_with_unmeasured_modules(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path / "sens")
    data = json.loads((copy / "sensitivity.json").read_text())
    measure = next(iter(data["measures"]))
    first = data["modules"][0]["key"]
    data["measures"][measure].pop(first)  # not measured -> a hatched cell, not a crash
    (copy / "sensitivity.json").write_text(json.dumps(data))
    assert plot_sensitivity_heatmap(copy) == copy / "sensitivity_heatmap.png"
    assert png_size(copy / "sensitivity_heatmap.png")[0] >= 400
