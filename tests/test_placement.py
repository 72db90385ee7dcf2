"""Size-aware, uncertainty-aware placement: the first-order ablation estimate, per-parameter measures, full-coverage
combined ranking, bootstrap confidence intervals and the across-seed statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorasens.analysis.ablation import lora_switched_off, validation_batches, validation_loss
from lorasens.analysis.first_order import first_order_estimates
from lorasens.model.lora import PEFT_PREFIX
from test_sensitivity import features, tiny_lora


def test_b_dot_grad_b_equals_delta_w_dot_grad_w_formed_explicitly():
    model, _, lora, tokenizer = tiny_lora()
    torch.manual_seed(1)
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.05)
    batches = validation_batches(features(tokenizer), 3, tokenizer.pad_token_id, "cpu")
    estimates = first_order_estimates(model, lora, batches)
    tokens = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    for i in (0, 5, 13, 27):  # q_proj L0, gate_proj L0, up_proj L1, down_proj L3
        lp = lora[i]
        base = model.get_submodule(PEFT_PREFIX + lp.module.name).base_layer.weight
        base.requires_grad_(True)
        grad_w = torch.zeros_like(base, dtype=torch.float64)
        model.eval()
        for batch in batches:  # dL/dW0 = dL/dW of the effective weight W0 + delta W
            logits = model(**batch.inputs).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            grad_w += torch.autograd.grad(nll / tokens, base)[0].double()
        base.requires_grad_(False)
        delta_w = lp.scaling * (lp.B.detach().double() @ lp.A.detach().double())  # (out, in), formed explicitly
        assert estimates[i] == pytest.approx(-float((delta_w * grad_w).sum()), rel=1e-6, abs=1e-12)
        assert estimates[i] != 0.0
    assert all(not lp.B.requires_grad or lp.B.grad is None for lp in lora)  # nothing left behind


def test_first_order_estimate_predicts_small_ablations():
    model, _, lora, tokenizer = tiny_lora()
    torch.manual_seed(2)
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.02)  # a small update: the loss is close to linear in it
    batches = validation_batches(features(tokenizer, 8), 4, tokenizer.pad_token_id, "cpu")
    estimates = first_order_estimates(model, lora, batches)
    reference = validation_loss(model, batches)
    measured = []
    for lp in lora:
        with lora_switched_off(model, [lp.module]):
            measured.append(validation_loss(model, batches) - reference)
    r = np.corrcoef(estimates, measured)[0, 1]
    assert r > 0.9, (r, estimates[:4], measured[:4])


def synthetic_ablation(n, seed, true_delta=0.3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 16, size=n).astype(float)
    on = tokens * rng.gamma(2.0, 0.5, size=n)  # per-example sum of target-token losses
    off = np.stack([on + tokens * (true_delta + rng.normal(0, 0.8, size=n)),  # true delta 0.3 nats/token
                    on + tokens * (0.1 + rng.normal(0, 0.8, size=n))])
    return on, off, tokens


def test_bootstrap_ci_contains_the_true_mean_and_shrinks_with_more_examples():
    from lorasens.analysis.stats import bootstrap_deltas

    widths = []
    covered = 0
    for seed in range(20):
        on, off, tokens = synthetic_ablation(200, seed)
        result = bootstrap_deltas(on, off, tokens, samples=500, seed=seed)
        assert result.delta[0] == pytest.approx((off[0] - on).sum() / tokens.sum())
        covered += result.low[0] <= 0.3 <= result.high[0]
        widths.append(result.high[0] - result.low[0])
    assert covered >= 17  # a 95% interval: 19 of 20 expected; 17 or more is all but certain
    on, off, tokens = synthetic_ablation(3200, 99)
    big = bootstrap_deltas(on, off, tokens, samples=500)
    assert big.low[0] <= 0.3 <= big.high[0]
    # 16 times the examples: the width shrinks about 4-fold (1/sqrt(n)).
    assert (big.high[0] - big.low[0]) < 0.35 * np.mean(widths)


def test_rank_intervals_are_tight_for_separated_sets_and_wide_for_ties():
    from lorasens.analysis.stats import bootstrap_deltas, rank_interval_is_wide

    rng = np.random.default_rng(0)
    n = 300
    tokens = np.full(n, 10.0)
    on = rng.normal(20, 1, n)
    # Sets 0 and 1 clearly apart (deltas 1.0, 0.5 nats/token); 2 and 3 equal in expectation (0.1).
    off = np.stack([on + tokens * (d + rng.normal(0, 0.5, n)) for d in (1.0, 0.5, 0.1, 0.1)])
    result = bootstrap_deltas(on, off, tokens, ranked=[0, 1, 2, 3], samples=400)
    assert list(result.rank[:2]) == [1, 2]
    assert (result.rank_low[0], result.rank_high[0]) == (1, 1) and (result.rank_low[1], result.rank_high[1]) == (2, 2)
    assert result.rank_low[2] == 3 and result.rank_high[2] == 4
    # Wide = spanning more than a quarter of the ranked modules.
    assert not rank_interval_is_wide(1, 1, 4) and not rank_interval_is_wide(4, 9, 20) and rank_interval_is_wide(4, 10, 20)


def test_jaccard_and_its_random_baseline():
    from lorasens.analysis.stats import jaccard, random_jaccard, spearman

    assert jaccard(["a", "b", "c"], ["b", "c", "d"]) == 0.5
    # Two random 2-of-4 sets: intersection 0 (p 1/6), 1 (p 4/6), 2 (p 1/6) -> Jaccard 0, 1/3, 1: mean 1/6*0 + 4/6*1/3 + 1/6.
    assert random_jaccard(4, 2, 2) == pytest.approx(4 / 18 + 1 / 6)
    rng = np.random.default_rng(0)
    simulated = np.mean([jaccard(rng.choice(30, 10, replace=False), rng.choice(30, 12, replace=False)) for _ in range(4000)])
    assert random_jaccard(30, 10, 12) == pytest.approx(simulated, abs=0.01)
    assert spearman({"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 10, "b": 30, "c": 20, "d": 40}) == pytest.approx(0.8)
    assert spearman({"a": 1, "b": 2}, {"a": 1, "b": 2}) is None


def test_partial_coverage_no_longer_moves_ranks():
    from lorasens.analysis.sensitivity import combined_scores, full_coverage, ranking

    keys = [f"m{i}" for i in range(154)]  # TinyLlama's 154 modules
    grad_norm = {k: float(154 - i) for i, k in enumerate(keys)}  # m0 highest
    ablation = {k: float(154 - i) / 1000 for i, k in enumerate(keys[:64])}  # concordant, top 64 only
    measures = {"grad_norm": grad_norm, "ablation": ablation}
    # The defect: normalising each measure within its own coverage puts the 63rd module at the bottom of the
    # ablation's scale (1/63) but the rest at their grad_norm rank alone: m62 falls from 63rd to 106th, m63 to 108th.
    old = ranking(combined_scores(keys, measures))
    assert old.index("m62") + 1 == 106 and old.index("m63") + 1 == 108
    used = full_coverage(keys, measures)
    assert used == ["grad_norm"]
    assert ranking(combined_scores(keys, {n: measures[n] for n in used})) == keys  # every rank in place
    assert full_coverage(keys, {**measures, "ablation": {k: 1.0 / (i + 1) for i, k in enumerate(keys)}}) == \
        ["grad_norm", "ablation"]


def test_per_parameter_measures_on_hand_computed_modules():
    from lorasens.analysis.budget import ModuleSize
    from lorasens.analysis.sensitivity import per_parameter, size_correlation

    sizes = [ModuleSize("L0.q_proj", 576, 576), ModuleSize("L0.k_proj", 576, 192), ModuleSize("L0.up_proj", 576, 1536)]
    params = {s.key: s.params(8) for s in sizes}
    assert params == {"L0.q_proj": 9216, "L0.k_proj": 6144, "L0.up_proj": 16896}
    raw = {"L0.q_proj": 9.216, "L0.k_proj": 12.288, "L0.up_proj": 16.896}
    assert per_parameter(raw, params) == pytest.approx({"L0.q_proj": 1e-3, "L0.k_proj": 2e-3, "L0.up_proj": 1e-3})
    # up_proj leads raw (the size advantage); per parameter k_proj leads.
    corr = size_correlation({"raw": raw, "per_param": per_parameter(raw, params)}, params)
    assert corr["raw"] == pytest.approx(0.5) and corr["per_param"] == pytest.approx(-0.8660254)


def test_ablation_plot_draws_ci_error_bars_and_heatmap_marks_wide_rank_intervals(tmp_path, monkeypatch):
    import json

    from lorasens.rundir import files
    from lorasens.presentation.plots import run_plots

    figures = {}
    monkeypatch.setattr(run_plots, "save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    rows = [("all", "all_on", "", "", "", 0, 2.0, 0.0, 0.0, 0.0, "", "", ""),
            ("all", "all_off", "", "", "", 4, 2.5, 0.5, 0.4, 0.6, "", "", ""),
            ("module", "L0.q_proj", 0, "attn", "q_proj", 1, 2.3, 0.3, 0.25, 0.36, 1, 1, 1),
            ("module", "L0.up_proj", 0, "mlp", "up_proj", 1, 2.1, 0.1, -0.05, 0.2, 2, 2, 4),
            ("module", "L1.q_proj", 1, "attn", "q_proj", 1, 2.08, 0.08, -0.02, 0.15, 3, 2, 4),
            ("module", "L1.up_proj", 1, "mlp", "up_proj", 1, 2.0, 0.0, -0.01, 0.01, 4, 3, 4)]
    lines = [",".join(files.ABLATION_COLUMNS)] + [",".join(str(v) for v in r) for r in rows]
    (tmp_path / files.ABLATION).write_text("\n".join(lines) + "\n")
    modules = [{"key": f"L{layer}.{t}", "layer": layer, "group": "attn" if t == "q_proj" else "mlp", "module": t}
               for layer in (0, 1) for t in ("q_proj", "up_proj")]
    deltas = {r[1]: r[7] for r in rows if r[0] == "module"}
    (tmp_path / files.SENSITIVITY).write_text(json.dumps({
        "modules": modules, "measures": {"ablation": deltas, "combined": {k: 0.5 for k in deltas}},
        "ablation": {"wide_rank_interval": ["L0.up_proj", "L1.q_proj"]}}))
    run_plots.plot_ablation(tmp_path)
    singles = figures["ablation.png"].axes[-1]
    bars = sorted((p.get_width(), p) for p in singles.patches)
    assert [round(w, 3) for w, _ in bars] == [0.0, 0.08, 0.1, 0.3]
    caps = [c for c in singles.containers if c.__class__.__name__ == "BarContainer"]
    assert caps and caps[0].errorbar is not None  # the CI whiskers belong to the bars
    segments = caps[0].errorbar.lines[2][0].get_segments()
    assert sorted((round(seg[0][0], 3), round(seg[1][0], 3)) for seg in segments) == \
        [(-0.05, 0.2), (-0.02, 0.15), (-0.01, 0.01), (0.25, 0.36)]
    run_plots.plot_sensitivity_heatmap(tmp_path)
    panel = next(ax for ax in figures["sensitivity_heatmap.png"].axes if ax.get_title() == "ablation")
    marked = sorted(tuple(xy) for c in panel.collections if c.__class__.__name__ == "PathCollection"
                    for xy in c.get_offsets().tolist())
    assert marked == [(0.0, 1.0), (1.0, 0.0)]  # (module type column, layer row): L1.q_proj and L0.up_proj


def test_trainer_eval_loss_is_the_token_weighted_loss_of_the_ablation(tmp_path):
    from lorasens.config import build_config
    from lorasens.training.trainer import build_trainer

    model, _, lora, tokenizer = tiny_lora()
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.1)
    feats = features(tokenizer, 5)  # 17..21 tokens, 3 prompt tokens each: unequal target counts
    cfg = build_config(cli_overrides=dict(model="tiny-random-llama", dataset="synthetic", batch_size=2, max_steps=1,
                                          output_dir=str(tmp_path), experiment_name="run"))
    trainer = build_trainer(cfg, tmp_path, model, tokenizer, feats, feats, [])
    eval_loss = trainer.evaluate()["eval_loss"]
    reference = validation_loss(model, validation_batches(feats, 8, tokenizer.pad_token_id, "cpu"))
    assert eval_loss == pytest.approx(reference, rel=1e-5)
    # What the Trainer would report by itself: per-batch token means, weighted by batch size (2, 2, 1 examples).
    per_batch = [validation_loss(model, validation_batches(feats[i:i + 2], 8, tokenizer.pad_token_id, "cpu"))
                 for i in (0, 2, 4)]
    assert abs((2 * per_batch[0] + 2 * per_batch[1] + per_batch[2]) / 5 - reference) > 1e-6


def test_config_of_an_older_run_with_budget_modules_still_loads():
    from lorasens.config import ExperimentConfig, config_from_dict

    data = ExperimentConfig().to_dict()
    data["tracking"].pop("budget")
    data["tracking"].update(budget_modules=20.0, budget_unit="modules")
    cfg = config_from_dict(data)
    assert cfg.tracking.budget == 20.0 and cfg.tracking.budget_unit == "modules"


def test_first_order_head_at_labelled_positions_equals_the_full_head(monkeypatch):
    """The estimate applies the LM head only where a label is; the plain forward (every position) gives the same."""
    from lorasens.analysis import first_order

    model, _, lora, tokenizer = tiny_lora()
    torch.manual_seed(3)
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.05)
    for packing in (False, True):
        batches = validation_batches(features(tokenizer), 3, tokenizer.pad_token_id, "cpu", packing=packing)
        fast = first_order_estimates(model, lora, batches)
        with monkeypatch.context() as m:
            m.setattr(first_order, "_final_norm", lambda base: None)  # no final norm found: the plain forward
            full = first_order_estimates(model, lora, batches)
        assert fast == pytest.approx(full, rel=1e-5, abs=1e-9)
        assert max(abs(v) for v in fast) > 0
