"""The quickstart's recommendation does not depend on how fast the ablation is computed."""

from __future__ import annotations

import json
import shutil

import pytest

from lorasens.rundir import files


@pytest.mark.slow
def test_the_fast_ablation_gives_the_quickstart_the_recommendation_of_whole_decoder_passes(tmp_path, monkeypatch):
    """The quickstart preset (on the tiny model, few steps) with every module ablated singly, so that the ablation
    enters the ranking: its recommendation, rankings and deltas from the cached, folded engine equal those from
    whole-decoder passes (the engine without any shortcut)."""
    import lorasens.analysis.post as post
    from lorasens.analysis.ablation import run_ablation
    from lorasens.analysis.post import analyze_after_training, analyze_run
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    cfg = build_config("quickstart", cli_overrides=dict(
        model="tiny-random-llama", max_length=256, max_steps=6, train_samples=48, eval_samples=4, eval_steps=0,
        evaluate=False, analysis_samples=12, ablation_max_single=28, output_dir=str(tmp_path), experiment_name="fast"))
    fast_summary = run_experiment(cfg, after_training=(analyze_after_training,)).summary
    fast = tmp_path / "fast"
    plain = tmp_path / "plain"
    shutil.copytree(fast, plain)
    methods = []

    def whole_passes(*args, **kwargs):
        result = run_ablation(*args, **{**kwargs, "method": "decoder"})
        methods.append(result.method)
        return result

    monkeypatch.setattr(post, "run_ablation", whole_passes)
    plain_summary = analyze_run(plain)
    assert methods == ["decoder"] and fast_summary["ablation_method"] == "cached"

    def read(run, name):
        return json.loads((run / name).read_text())

    assert fast_summary["recommendation"] == plain_summary["recommendation"]
    assert read(fast, files.RECOMMENDED_CONFIG) == read(plain, files.RECOMMENDED_CONFIG)
    fast_sensitivity, plain_sensitivity = read(fast, files.SENSITIVITY), read(plain, files.SENSITIVITY)
    assert "ablation" in fast_sensitivity["budget"]["ranked_by"]  # every module ablated: the ablation ranks too
    assert fast_sensitivity["rankings"] == plain_sensitivity["rankings"]
    fast_deltas, plain_deltas = (s["measures"]["ablation"] for s in (fast_sensitivity, plain_sensitivity))
    assert len(fast_deltas) == 28 and max(abs(d) for d in fast_deltas.values()) > 1e-4
    assert fast_deltas == pytest.approx(plain_deltas, abs=1e-6)
