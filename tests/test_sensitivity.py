"""Sensitivity measures, ablation, agreement, and the recommended LoRA config (loads into PEFT and trains)."""

from __future__ import annotations

import csv
import json
import math
from unittest import mock

import pytest
import torch

from lorasens.analysis.ablation import lora_switched_off, run_ablation, validation_batches, validation_loss
from lorasens.analysis.budget import RANK_CHOICES, pattern_key, select_within_budget
from lorasens.analysis.measures import update_magnitudes
from lorasens.analysis.sensitivity import agreement, combined_scores, module_sizes, recommended_lora_config
from lorasens.model.loading import build_tiny_random_llama
from lorasens.model.lora import LoraParams, apply_lora, lora_parameters
from lorasens.model.module_map import build_module_map
from lorasens.rundir import files


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
    branch = run_ablation(model, lora, batches, [lora[0].module, lora[9].module], fold=False).rows()
    kinds = [r.kind for r in rows]
    assert kinds == ["all", "all"] + ["group"] * 2 + ["layer"] * 4 + ["module_type"] * 7 + ["module"] * 2
    assert rows[0].delta_loss == 0.0 and rows[0].num_modules == 0 and rows[1].num_modules == 28
    by_name = {r.name: r for r in rows}
    assert by_name["attn"].num_modules == 16 and by_name["L2"].num_modules == 7 and by_name["q_proj"].num_modules == 4
    assert by_name["L0.q_proj"].layer == 0 and by_name["L1.v_proj"].module == "v_proj"
    with lora_switched_off(model, [m for m in (lp.module for lp in lora) if m.layer == 2]):
        switched_off = validation_loss(model, batches)
    # Through PEFT's branch the L2 row is that loss bit for bit; folded (the default), to fp32 rounding.
    assert switched_off == next(r.loss for r in branch if r.name == "L2")
    assert by_name["L2"].loss == pytest.approx(switched_off, rel=1e-6) and by_name["L2"].loss != rows[0].loss
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
    # An irregular selection: written as the explicit list of module paths, in model order.
    scores = {keys[lp.module]: float(i % 5) for i, lp in enumerate(lora)}
    by_key = {keys[m]: m for m in module_map.modules}
    selected = [by_key[k] for k in select_within_budget(module_sizes(lora), scores, 5, "modules", 4).keys]
    assert [scores[keys[m]] for m in selected] == [4.0] * 5
    config = recommended_lora_config(selected, module_map, 4, 8.0, 0.0)
    assert config["target_modules"] == [m.name for m in module_map.modules if m in set(selected)]
    _trains(config, {m.name for m in selected})
    # Beyond EXPLICIT_LIST_MAX modules the same selection is one regular expression; PEFT builds the same model.
    with mock.patch("lorasens.analysis.sensitivity.EXPLICIT_LIST_MAX", 2):
        config = recommended_lora_config(selected, module_map, 4, 8.0, 0.0)
    assert isinstance(config["target_modules"], str)
    _trains(config, {m.name for m in selected})
    # Whole module types (o_proj and down_proj of every layer): the list of types.
    product = [m for m in module_map.modules if m.module_type in ("o_proj", "down_proj")]
    config = recommended_lora_config(product, module_map, 4, 8.0, 0.0)
    assert config["target_modules"] == ["o_proj", "down_proj"] and "layers_to_transform" not in config
    _trains(config, {m.name for m in product})


def test_budget_in_modules_fractions_and_parameters():
    _, module_map, lora, _ = tiny_lora()
    scores = {f"L{lp.module.layer}.{lp.module.module_type}": float(i) for i, lp in enumerate(lora)}
    sizes = module_sizes(lora)
    # tiny-random-llama: hidden 64, intermediate 128, 2 of 4 heads for k/v: q/o 64x64, k/v 64->32, MLP 64<->128.
    assert [(s.in_features, s.out_features) for s in sizes[:7]] == [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128),
                                                                      (64, 128), (128, 64)]
    assert len(select_within_budget(sizes, scores, None, "modules", 4).keys) == 14  # half the modules
    assert len(select_within_budget(sizes, scores, 0.25, "modules", 4).keys) == 7
    assert select_within_budget(sizes, scores, 3, "modules", 4).keys == ("L3.gate_proj", "L3.up_proj", "L3.down_proj")
    params = {s.key: s.params(4) for s in sizes}
    total = sum(params.values())
    assert total == 4 * 4 * (128 + 96 + 96 + 128 + 192 * 3) == lora[0].A.numel() * 0 + sum(lp.A.numel() + lp.B.numel() for lp in lora)
    chosen = select_within_budget(sizes, scores, None, "params", 4)  # default: half the LoRA parameters
    assert chosen.params_used == sum(params[k] for k in chosen.keys) <= 0.5 * total and chosen.limit == 0.5 * total
    assert chosen.params_used > 0.45 * total
    assert "L3.down_proj" in chosen.keys
    from lorasens.errors import UserError

    with pytest.raises(UserError, match="whole count"):
        select_within_budget(sizes, scores, 2.5, "modules", 4)


# ---------------------------------------------------------------------------------------------------------------
# End to end: analysis after training, and `lorasens analyze RUN_DIR` on the finished run


@pytest.mark.slow
def test_analysis_after_training_and_analyze_command(tmp_path, capsys, monkeypatch):
    from lorasens.cli import main
    from lorasens.config import build_config
    from lorasens.analysis.post import analyze_after_training
    from lorasens.evaluation.runner import evaluate_after_training
    from lorasens.experiment.run import run_experiment

    cfg = build_config(cli_overrides=dict(
        model="tiny-random-llama", dataset="synthetic", r=4, batch_size=4, max_length=128, eval_steps=0,
        evaluate=False, train_samples=32, eval_samples=8, lora_dropout=0.0, lr=1e-2, max_steps=3,
        ablation_max_single=6, budget=4, budget_unit="modules", analysis_samples=12, output_dir=str(tmp_path),
        experiment_name="run"))
    import lorasens.analysis.post as post

    run = tmp_path / "run"
    seen_at_ablation = []
    plain_ablation = post.run_ablation

    def ablation_after_the_recommendation(*args, **kwargs):
        path = run / files.RECOMMENDED_CONFIG
        seen_at_ablation.append(path.read_text() if path.exists() else None)
        return plain_ablation(*args, **kwargs)

    monkeypatch.setattr(post, "run_ablation", ablation_after_the_recommendation)
    # The report (another area) is not under test here.
    summary = run_experiment(cfg, after_training=(evaluate_after_training, analyze_after_training)).summary
    # 6 of 28 modules ablated: the ablation cannot change the recommendation, which is written before it runs.
    assert seen_at_ablation == [(run / files.RECOMMENDED_CONFIG).read_text()]
    assert summary["recommendation"]["num_selected"] == 4 and len(summary["sensitivity_top"]) == 5
    assert summary["ablation_method"] == "cached" and summary["ablation_sets"] == 21 and summary["ablation_time_s"] > 0
    assert summary["first_order_time_s"] > 0 and summary["first_order_train_steps"] > 0  # its cost, in training steps
    with (run / files.ABLATION).open() as fh:
        ablation = list(csv.DictReader(fh))
    assert [r["kind"] for r in ablation].count("module") == 6 and len(ablation) == 2 + 2 + 4 + 7 + 6
    sensitivity = json.loads((run / files.SENSITIVITY).read_text())
    assert len(sensitivity["modules"]) == 28
    assert set(sensitivity["measures"]) == {"grad_norm", "importance", "update_magnitude", "first_order", "ablation",
                                              "combined"}
    assert len(sensitivity["measures"]["ablation"]) == 6 and len(sensitivity["rankings"]["grad_norm"]) == 28
    assert set(sensitivity["agreement"]) >= {"importance~ablation", "grad_norm~update_magnitude"}
    single = {r["name"]: float(r["delta_loss"]) for r in ablation if r["kind"] == "module"}
    assert sensitivity["measures"]["ablation"] == pytest.approx(single)
    assert sensitivity["budget"]["selected"] == summary["recommendation"]["modules"]
    # The ablation ran on the analysis split (12 examples held out of train), with a CI per delta and rank intervals.
    from lorasens.data.features import build_features
    from lorasens.data.registry import training_splits
    from lorasens.model.loading import byte_level_tokenizer

    train_examples, held = training_splits("synthetic", None, cfg.training.seed, None, 12)
    assert len(held) == 12 and not {ex.prompt for ex in held} & {ex.prompt for ex in train_examples}
    held_features, _ = build_features(held, byte_level_tokenizer(), 128, "analysis")  # some do not fit 128 tokens
    assert sensitivity["ablation"]["examples"] == len(held_features) and sensitivity["ablation"]["confidence"] == 0.95
    for r in ablation:
        assert float(r["delta_ci_low"]) <= float(r["delta_loss"]) <= float(r["delta_ci_high"])
        assert (r["rank"] != "") == (r["kind"] == "module")
    ranks = sorted(int(r["rank"]) for r in ablation if r["kind"] == "module")
    assert ranks == [1, 2, 3, 4, 5, 6]
    assert set(sensitivity["ablation"]["rank_interval"]) == set(single)
    # Partial coverage: 6 of 28 modules ablated, so ablation is not part of the combined ranking.
    assert sensitivity["budget"]["ranked_by"] == ["grad_norm", "importance", "update_magnitude", "first_order"]
    assert sensitivity["budget"]["ranking_scale"] == "raw"  # budget unit: modules
    assert set(sensitivity["size_correlation"]["raw"]) == set(sensitivity["measures"]) - {"combined"}
    assert sensitivity["first_order_agreement"]["modules"] == 6
    sizes = {m["key"]: m["lora_params"] for m in sensitivity["modules"]}
    assert sensitivity["budget"]["params_used"] == sum(sizes[k] for k in sensitivity["budget"]["selected"])
    assert sensitivity["measured_under"] == {"source": "this run", "phase_strategy": None, "probe": False}
    from peft import LoraConfig

    LoraConfig(**json.loads((run / files.RECOMMENDED_CONFIG).read_text()))

    assert main(["analyze", str(run), "--budget", "2", "--budget_unit", "modules", "--ablation", "false"]) == 0
    assert "recommended: LoRA on 2 of 28 modules" in capsys.readouterr().out
    again = json.loads((run / files.SENSITIVITY).read_text())
    assert again["budget"]["num_selected"] == 2 and "ablation" not in again["measures"]
    assert again["measures"]["grad_norm"] == sensitivity["measures"]["grad_norm"]
    assert again["measures"]["update_magnitude"] == pytest.approx(sensitivity["measures"]["update_magnitude"], rel=1e-6)
    # Default budget: half the LoRA parameters, ranked per parameter; then a rank allocation within it.
    assert main(["analyze", str(run), "--budget_unit", "params", "--budget", "0.5", "--ablation", "false"]) == 0
    by_params = json.loads((run / files.SENSITIVITY).read_text())["budget"]
    assert f"{by_params['params_used']} LoRA parameters of a budget of {by_params['params_budget']:.0f}" in \
        capsys.readouterr().out
    assert by_params["ranking_scale"] == "per_param" and by_params["params_budget"] == 0.5 * sum(sizes.values())
    assert by_params["params_used"] <= by_params["params_budget"] and by_params["used_fraction"] > 0.9
    assert main(["analyze", str(run), "--budget_unit", "params", "--budget", "0.5", "--allocate", "ranks",
                 "--ablation", "false"]) == 0
    ranked = json.loads((run / files.SENSITIVITY).read_text())["budget"]
    config = json.loads((run / files.RECOMMENDED_CONFIG).read_text())
    assert set(ranked["ranks"].values()) <= set(RANK_CHOICES) - {0} and ranked["params_used"] <= ranked["params_budget"]
    assert len(config["rank_pattern"]) == len(ranked["ranks"]) == ranked["num_selected"]
    assert sorted(config["rank_pattern"].values()) == sorted(ranked["ranks"].values())
    LoraConfig(**config)
    # EVA's start on the same ranks: init_lora_weights eva at rho 1. A PEFT script builds the adapter from the file,
    # and lorasens.initialize_eva gives every module the leading components of its inputs at its recommended rank.
    assert main(["analyze", str(run), "--budget_unit", "params", "--budget", "0.5", "--allocate", "ranks",
                 "--recommend_init", "eva", "--ablation", "false"]) == 0
    assert "per-module ranks, EVA initialisation" in capsys.readouterr().out
    eva = json.loads((run / files.RECOMMENDED_CONFIG).read_text())
    assert eva == {**config, "init_lora_weights": "eva", "eva_config": {"rho": 1.0}}
    assert json.loads((run / files.SENSITIVITY).read_text())["budget"]["init"] == "eva"
    from peft import get_peft_model

    from lorasens import initialize_eva
    from lorasens.model.loading import load_model

    peft_model = get_peft_model(load_model("tiny-random-llama").model, LoraConfig(**eva), low_cpu_mem_usage=True)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (16, 12))
    initialize_eva(peft_model, [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long),
                                 "labels": ids[i:i + 4]} for i in range(0, 16, 4)])
    started = {name.removeprefix("base_model.model."): m.lora_A["default"].weight.detach()
               for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {pattern_key(name): a.shape[0] for name, a in started.items()} == eva["rank_pattern"]
    assert all(torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4) for a in started.values())
    # A floor: every module keeps at least rank 1, the rest of the same budget goes by sensitivity.
    assert main(["analyze", str(run), "--budget_unit", "params", "--budget", "0.5", "--allocate", "ranks",
                 "--min_rank", "1", "--ablation", "false"]) == 0
    floored = json.loads((run / files.SENSITIVITY).read_text())["budget"]
    assert floored["min_rank"] == 1 and floored["num_selected"] == floored["num_modules"] == len(sizes)
    assert set(floored["ranks"].values()) <= {1 + r for r in RANK_CHOICES} and min(floored["ranks"].values()) == 1
    assert floored["params_used"] <= floored["params_budget"]
    assert "per-module ranks (at least 1 on every module)" in capsys.readouterr().out
    # Spread: every module at the one rank the budget holds on all, the most sensitive one rank higher.
    assert main(["analyze", str(run), "--budget_unit", "params", "--budget", "0.55", "--allocate", "spread",
                 "--ablation", "false"]) == 0
    spread = json.loads((run / files.SENSITIVITY).read_text())
    assert "one rank on every module it reaches" in capsys.readouterr().out
    ranks, budget = spread["budget"]["ranks"], spread["budget"]["params_budget"]
    base = int(0.55 * cfg.lora.r)  # the rank 55% of every module at rank r holds on all of them
    assert spread["budget"]["allocate"] == "spread" and set(ranks) == set(sizes)
    assert set(ranks.values()) == {base, base + 1} and spread["budget"]["params_used"] <= budget
    combined = spread["measures"]["combined"]
    raised = [k for k, r in ranks.items() if r > base]
    assert all(combined[k] >= combined[j] for k in raised for j in set(ranks) - set(raised))
    assert sorted(json.loads((run / files.RECOMMENDED_CONFIG).read_text())["rank_pattern"].values()) == \
        sorted(ranks.values())
    # Types: each group's share of the budget is its share of the ablation's group deltas, split within the group
    # by the module-type deltas (read back from sensitivity_ablation.csv), one rank per type in every layer.
    assert main(["analyze", str(run), "--budget_unit", "params", "--budget", "0.5", "--allocate", "types",
                 "--ablation", "false"]) == 0
    typed = json.loads((run / files.SENSITIVITY).read_text())["budget"]
    assert typed["allocate"] == "types" and "one rank per module type" in capsys.readouterr().out
    deltas = {r["name"]: max(0.0, float(r["delta_loss"])) for r in ablation if r["kind"] == "module_type"}
    group_deltas = {r["name"]: max(0.0, float(r["delta_loss"])) for r in ablation if r["kind"] == "group"}
    group_of = {r["name"]: r["group"] for r in ablation if r["kind"] == "module_type"}
    assert set(group_of.values()) == {"attn", "mlp"} and all(d > 0 for d in group_deltas.values())
    width = {k: n // cfg.lora.r for k, n in sizes.items()}  # in + out
    for module_type, delta in deltas.items():
        group = group_of[module_type]
        in_group = [d for t, d in deltas.items() if group_of[t] == group]
        within = delta / sum(in_group) if sum(in_group) > 0 else 1 / len(in_group)
        share = group_deltas[group] / sum(group_deltas.values()) * within
        members = [k for k in sizes if k.endswith("." + module_type)]
        spent = sum(typed["ranks"].get(k, 0) * width[k] for k in members)
        assert abs(spent - typed["params_budget"] * share) <= width[members[0]] / 2 + 1e-6
        ranks = [typed["ranks"].get(k, 0) for k in members]
        assert max(ranks) - min(ranks) <= 1
    LoraConfig(**json.loads((run / files.RECOMMENDED_CONFIG).read_text()))
    (run / files.ABLATION).rename(tmp_path / "ablation.csv")
    assert main(["analyze", str(run), "--budget_unit", "params", "--allocate", "types", "--ablation", "false"]) == 2
    assert "--allocate types splits the budget by the ablation's group and module-type deltas" in capsys.readouterr().err
    (tmp_path / "ablation.csv").rename(run / files.ABLATION)
    assert main(["analyze", str(run), "--allocate", "ranks", "--budget_unit", "modules"]) == 2
    assert main(["analyze", str(run), "--allocate", "types", "--budget_unit", "modules"]) == 2
    assert main(["analyze", str(run), "--allocate", "spread", "--budget_unit", "modules"]) == 2
    assert main(["analyze", str(run), "--min_rank", "1", "--ablation", "false"]) == 2
    # --probe: the training-time measures come from another run (here: this run's files with grad norms doubled).
    probe = tmp_path / "probe"
    probe.mkdir()
    for name in ("config.json", files.IMPORTANCE, files.UPDATE_MAGNITUDE):
        (probe / name).write_text((run / name).read_text())
    with (run / files.MODULE_NORMS).open() as fh:
        norm_rows = list(csv.DictReader(fh))
    with (probe / files.MODULE_NORMS).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, files.MODULE_NORMS_COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "grad_norm": repr(2 * float(r["grad_norm"])) if r["grad_norm"] else ""} for r in norm_rows)
    assert main(["analyze", str(run), "--probe", str(probe), "--budget", "2", "--budget_unit", "modules",
                 "--ablation", "false"]) == 0
    probed = json.loads((run / files.SENSITIVITY).read_text())
    assert probed["measures"]["grad_norm"] == pytest.approx({k: 2 * v for k, v in sensitivity["measures"]["grad_norm"].items()})
    # update_magnitude from the probe's last CSV rows (float32 cells) equals the adapter's own within float32.
    assert probed["measures"]["update_magnitude"] == pytest.approx(sensitivity["measures"]["update_magnitude"], rel=1e-6)
    assert probed["measured_under"] == {"source": str(probe), "phase_strategy": None, "probe": True}
    config = json.loads((probe / "config.json").read_text())
    config["model"]["model"] = "smollm2-135m"
    (probe / "config.json").write_text(json.dumps(config))
    assert main(["analyze", str(run), "--probe", str(probe), "--ablation", "false"]) == 2
    assert "a probe must use the same model" in capsys.readouterr().err
    assert main(["analyze", str(run), "--budget", "-1"]) == 2
    assert main(["analyze", str(tmp_path / "missing")]) == 2


def test_the_ablation_reranks_only_when_it_covers_every_module_or_splits_the_budget():
    from lorasens.analysis.post import ablation_reranks
    from lorasens.config import TrackingConfig

    assert not ablation_reranks(TrackingConfig(ablation_max_single=8), 210)
    assert ablation_reranks(TrackingConfig(ablation_max_single=210), 210)
    assert ablation_reranks(TrackingConfig(ablation_max_single=8, allocate="types"), 210)
