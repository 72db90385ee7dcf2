"""Sensitivity measures, ablation, agreement, and the recommended LoRA config (loads into PEFT and trains)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from lorasens.rundir import files
from lorasens.analysis.ablation import lora_switched_off, run_ablation, validation_batches, validation_loss
from lorasens.analysis.measures import update_magnitudes
from lorasens.analysis.sensitivity import agreement, combined_scores, recommended_lora_config, select_budget
from lorasens.lora import LoraParams, apply_lora, lora_parameters
from lorasens.module_map import build_module_map
from lorasens.models import build_tiny_random_llama


def tiny_lora(modules=None, seed=0):
    """tiny-random-llama with LoRA (r=4, alpha=8) on `modules` (default all 28); B is PEFT's zero init."""
    loaded = build_tiny_random_llama(seed=0)
    module_map = build_module_map(loaded.model)
    torch.manual_seed(seed)
    model = apply_lora(loaded.model, modules(module_map) if modules else module_map.modules, 4, 8.0, 0.0)
    return model, module_map, lora_parameters(model, module_map), loaded.tokenizer


def features(tokenizer, n=6):
    texts = [f"The Eagle is a pub number {i} in the city centre." for i in range(n)]
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"][: 20 + i]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 3 + ids[3:]})
    return out


def test_update_magnitude_equals_the_explicit_product():
    torch.manual_seed(0)
    modules = build_module_map(build_tiny_random_llama(seed=0).model).modules
    lora = []
    for i, (out_dim, in_dim, r) in enumerate([(64, 64, 4), (32, 64, 4), (128, 64, 4), (64, 64, 4), (64, 128, 8)]):
        A = torch.nn.Parameter(torch.randn(r, in_dim))
        B = torch.nn.Parameter(torch.randn(out_dim, r) * 0.1)
        lora.append(LoraParams(modules[i], A, B, scaling=0.5 + i))
    lora.append(LoraParams(modules[5], torch.nn.Parameter(torch.randn(4, 64)), torch.nn.Parameter(torch.zeros(64, 4)), 2.0))
    got = update_magnitudes(lora)
    for value, lp in zip(got.tolist(), lora):
        explicit = lp.scaling * torch.linalg.matrix_norm(lp.B.double() @ lp.A.double()).item()
        assert value == pytest.approx(explicit, rel=1e-5)
    assert got[-1].item() == 0.0  # B still zero: no update at all


def test_ablating_a_module_whose_b_is_zero_changes_the_loss_by_exactly_zero():
    model, module_map, lora, tokenizer = tiny_lora()
    with torch.no_grad():
        for lp in lora[::2]:  # every other module has "trained": B != 0; the others keep B = 0
            lp.B.normal_(0, 0.5)
    batches = validation_batches(features(tokenizer), 4, tokenizer.pad_token_id, "cpu")
    reference = validation_loss(model, batches)
    scalings = [model.get_submodule("base_model.model." + lp.module.name).scaling["default"] for lp in lora]
    for lp in lora[1::2][:5]:
        with lora_switched_off(model, [lp.module]):
            assert validation_loss(model, batches) - reference == 0.0
    for lp in lora[:4:2]:
        with lora_switched_off(model, [lp.module]):
            assert validation_loss(model, batches) != reference
    # Scalings restored exactly, also after an error inside the block.
    with pytest.raises(RuntimeError), lora_switched_off(model, [lp.module for lp in lora]):
        raise RuntimeError("boom")
    assert [model.get_submodule("base_model.model." + lp.module.name).scaling["default"] for lp in lora] == scalings
    assert validation_loss(model, batches) == reference
    # Everything off is the base model, bit for bit.
    with lora_switched_off(model, [lp.module for lp in lora]), model.disable_adapter():
        base = validation_loss(model, batches)
    with lora_switched_off(model, [lp.module for lp in lora]):
        assert validation_loss(model, batches) == base


def test_validation_loss_is_token_weighted_mean_cross_entropy():
    model, _, _, tokenizer = tiny_lora()
    feats = features(tokenizer, 5)
    one_batch = validation_loss(model, validation_batches(feats, 8, tokenizer.pad_token_id, "cpu"))
    small = validation_loss(model, validation_batches(feats, 2, tokenizer.pad_token_id, "cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for f in feats:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(f["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert one_batch == pytest.approx(total / count, rel=1e-5) and small == pytest.approx(total / count, rel=1e-5)


def test_ablation_rows_cover_groups_layers_types_and_singles():
    model, _, lora, tokenizer = tiny_lora()
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.3)
    batches = validation_batches(features(tokenizer), 3, tokenizer.pad_token_id, "cpu")
    rows = run_ablation(model, lora, batches, [lora[0].module, lora[9].module]).rows()
    kinds = [r.kind for r in rows]
    assert kinds == ["all", "all"] + ["group"] * 2 + ["layer"] * 4 + ["module_type"] * 7 + ["module"] * 2
    assert rows[0].delta_loss == 0.0 and rows[0].num_modules == 0 and rows[1].num_modules == 28
    by_name = {r.name: r for r in rows}
    assert by_name["attn"].num_modules == 16 and by_name["L2"].num_modules == 7 and by_name["q_proj"].num_modules == 4
    assert by_name["L0.q_proj"].layer == 0 and by_name["L1.v_proj"].module == "v_proj"
    with lora_switched_off(model, [m for m in (lp.module for lp in lora) if m.layer == 2]):
        assert validation_loss(model, batches) == by_name["L2"].loss
    assert all(math.isfinite(r.loss) for r in rows)


def test_agreement_is_spearman_over_common_modules():
    a = {"m1": 1.0, "m2": 2.0, "m3": 3.0, "m4": 4.0}
    measures = {"grad_norm": a, "importance": {k: 10 * v for k, v in a.items()},
                "update_magnitude": {k: -v for k, v in a.items()}, "ablation": {"m1": 0.1, "m2": 0.2}}
    result = agreement(measures)
    assert result["grad_norm~importance"] == pytest.approx(1.0)
    assert result["grad_norm~update_magnitude"] == pytest.approx(-1.0)
    assert result["grad_norm~ablation"] is None  # only two modules in common
    combined = combined_scores(list(a), {"grad_norm": a, "importance": {"m1": 5.0, "m2": 0.0, "m3": 1.0, "m4": 2.0}})
    # normalised ranks: grad_norm m1..m4 = 0, 1/3, 2/3, 1; importance m2, m3, m4, m1 = 0, 1/3, 2/3, 1
    assert combined == pytest.approx({"m1": 0.5, "m2": 1 / 6, "m3": 1 / 2, "m4": 5 / 6})


def _trains(config_kwargs: dict, expected_modules: set[str]) -> None:
    """LoraConfig(**json) puts LoRA on exactly the expected modules of a fresh model, and a few steps train it."""
    from peft import LoraConfig, get_peft_model

    loaded = build_tiny_random_llama(seed=1)
    config = LoraConfig(**json.loads(json.dumps(config_kwargs)))
    model = get_peft_model(loaded.model, config)
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if hasattr(module, "lora_A")
               and "default" in getattr(module, "lora_A", {})}
    assert adapted == expected_modules
    ids = torch.tensor([list(range(5, 45))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert len(before) == len(expected_modules)


def test_recommended_config_loads_into_peft_and_trains():
    _, module_map, lora, _ = tiny_lora()
    keys = {m: f"L{m.layer}.{m.module_type}" for m in module_map.modules}
    # An irregular selection: written as a regular expression over the module paths.
    scores = {keys[lp.module]: float(i % 5) for i, lp in enumerate(lora)}
    selected = select_budget(lora, scores, 5, "modules")
    assert [scores[keys[m]] for m in selected] == [4.0] * 5
    config = recommended_lora_config(selected, module_map, 4, 8.0, 0.0)
    assert isinstance(config["target_modules"], str)
    _trains(config, {m.name for m in selected})
    # A product selection (o_proj and down_proj of layers 1 and 3): target_modules + layers_to_transform.
    product = [m for m in module_map.modules if m.layer in (1, 3) and m.module_type in ("o_proj", "down_proj")]
    config = recommended_lora_config(product, module_map, 4, 8.0, 0.0)
    assert config["target_modules"] == ["o_proj", "down_proj"] and config["layers_to_transform"] == [1, 3]
    _trains(config, {m.name for m in product})


def test_budget_in_modules_fractions_and_parameters():
    _, module_map, lora, _ = tiny_lora()
    scores = {f"L{lp.module.layer}.{lp.module.module_type}": float(i) for i, lp in enumerate(lora)}
    assert len(select_budget(lora, scores, None, "modules")) == 14  # default: half
    assert len(select_budget(lora, scores, 0.25, "modules")) == 7
    top3 = select_budget(lora, scores, 3, "modules")
    assert [f"L{m.layer}.{m.module_type}" for m in top3] == ["L3.gate_proj", "L3.up_proj", "L3.down_proj"]
    sizes = {lp.module: lp.A.numel() + lp.B.numel() for lp in lora}
    chosen = select_budget(lora, scores, 0.1, "params")
    total = sum(sizes.values())
    assert sum(sizes[m] for m in chosen) <= 0.1 * total
    assert lora[-1].module in chosen
    from lorasens.errors import UserError

    with pytest.raises(UserError, match="whole count"):
        select_budget(lora, scores, 2.5, "modules")


# ---------------------------------------------------------------------------------------------------------------
# End to end: analysis after training, and `lorasens analyze RUN_DIR` on the finished run


def test_analysis_after_training_and_analyze_command(tmp_path, capsys, monkeypatch):
    from lorasens.cli import main
    from lorasens.config import build_config
    from lorasens.analysis.post import analyze_after_training
    from lorasens.evaluation.runner import evaluate_after_training
    from lorasens.run import run_experiment

    cfg = build_config(cli_overrides=dict(
        model="tiny-random-llama", dataset="synthetic", r=4, batch_size=4, max_length=128, eval_steps=0,
        evaluate=False, train_samples=32, eval_samples=8, lora_dropout=0.0, lr=1e-2, max_steps=3,
        ablation_max_single=6, budget_modules=4, output_dir=str(tmp_path), experiment_name="run"))
    # The report (another area) is not under test here.
    summary = run_experiment(cfg, after_training=(evaluate_after_training, analyze_after_training)).summary
    run = tmp_path / "run"
    assert summary["recommendation"]["num_selected"] == 4 and len(summary["sensitivity_top"]) == 5
    assert summary["ablation_method"] == "cached" and summary["ablation_sets"] == 21 and summary["ablation_time_s"] > 0
    with (run / files.ABLATION).open() as fh:
        ablation = list(csv.DictReader(fh))
    assert [r["kind"] for r in ablation].count("module") == 6 and len(ablation) == 2 + 2 + 4 + 7 + 6
    sensitivity = json.loads((run / files.SENSITIVITY).read_text())
    assert len(sensitivity["modules"]) == 28
    assert set(sensitivity["measures"]) == {"grad_norm", "importance", "update_magnitude", "ablation", "combined"}
    assert len(sensitivity["measures"]["ablation"]) == 6 and len(sensitivity["rankings"]["grad_norm"]) == 28
    assert set(sensitivity["agreement"]) >= {"importance~ablation", "grad_norm~update_magnitude"}
    single = {r["name"]: float(r["delta_loss"]) for r in ablation if r["kind"] == "module"}
    assert sensitivity["measures"]["ablation"] == pytest.approx(single)
    assert sensitivity["budget"]["selected"] == summary["recommendation"]["modules"]
    from peft import LoraConfig

    LoraConfig(**json.loads((run / files.RECOMMENDED_CONFIG).read_text()))

    assert main(["analyze", str(run), "--budget_modules", "2", "--ablation", "false"]) == 0
    assert "recommended: LoRA on 2 of 28 modules" in capsys.readouterr().out
    again = json.loads((run / files.SENSITIVITY).read_text())
    assert again["budget"]["num_selected"] == 2 and "ablation" not in again["measures"]
    assert again["measures"]["grad_norm"] == sensitivity["measures"]["grad_norm"]
    assert again["measures"]["update_magnitude"] == pytest.approx(sensitivity["measures"]["update_magnitude"], rel=1e-6)
    assert main(["analyze", str(run), "--budget_modules", "-1"]) == 2
    assert main(["analyze", str(tmp_path / "missing")]) == 2
