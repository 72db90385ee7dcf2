"""A run's loss figures from its logs: the late fall of the validation loss that says whether training flattened."""

import json

import pytest

from lorasens.rundir.metrics import read_run_metrics


def _logs(run_dir, evals, train_steps=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval_log.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in evals))
    steps = train_steps or [s for s, _ in evals]
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0}) + "\n" for s in steps))
    return run_dir


def test_late_fall_is_the_loss_at_three_quarters_of_the_steps_minus_the_final_loss(tmp_path):
    # Evaluations every 25 of 150 steps: 3/4 of 150 is 112.5, so the fall counts from step 100.
    evals = [(25, 1.63), (50, 1.57), (75, 1.50), (100, 1.40), (125, 1.37), (150, 1.3421)]
    m = read_run_metrics(_logs(tmp_path / "still", evals))
    assert m.late_eval_fall == pytest.approx(1.40 - 1.3421)
    assert m.still_falling() is True  # 0.058 > 1% of 1.3421
    assert m.still_falling(tolerance=0.05) is False


def test_a_flat_ending_is_not_falling_and_too_few_evaluations_give_none(tmp_path):
    flat = read_run_metrics(_logs(tmp_path / "flat", [(100, 1.30), (200, 1.25), (300, 1.246), (400, 1.244)]))
    # 3/4 of 400 is 300: 1.246 - 1.244, under 1% of 1.244
    assert flat.late_eval_fall == pytest.approx(0.002) and flat.still_falling() is False
    rising = read_run_metrics(_logs(tmp_path / "rising", [(50, 1.20), (100, 1.25)]))
    assert rising.late_eval_fall == pytest.approx(-0.05) and rising.still_falling() is False
    assert read_run_metrics(_logs(tmp_path / "one", [(150, 1.3)])).late_eval_fall is None
    # The only other evaluation lies in the last quarter: nothing to measure the late fall from.
    late_only = read_run_metrics(_logs(tmp_path / "late", [(140, 1.31), (150, 1.30)]))
    assert late_only.late_eval_fall is None and late_only.still_falling() is None
