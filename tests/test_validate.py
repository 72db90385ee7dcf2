"""`lorasens validate`: arms matched in LoRA parameters, PEFT's peers on the training path, the statistics, the test
split, the files, resuming, bad input."""

from __future__ import annotations

import html
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lorasens.analysis.budget import ModuleSize, fit_ranks, spread_order
from lorasens.analysis.sensitivity import key_of
from lorasens.cli import main
from lorasens.config import build_config
from lorasens.errors import UserError
from lorasens.experiment.validation import arms as A
from lorasens.experiment.validation import driver
from lorasens.experiment.validation import stats
from lorasens.experiment.validation.driver import ValidateSettings, example_losses, module_sizes, parse_seeds
from lorasens.model.module_map import build_module_map

# The probe: a few optimizer steps of the tiny model; the validation machinery is what is tested, not the training.
TINY = ["--model", "tiny-random-llama", "--dataset", "synthetic", "--max_steps", "4", "--max_length", "160",
        "--batch_size", "2", "--train_samples", "16", "--eval_samples", "4", "--eval_steps", "0",
        "--evaluate", "false", "--ablation", "false", "--budget", "0.25", "--budget_unit", "params",
        "--allocate", "modules"]  # modules at rank r, as the E2E probe: the ranks arm is then a different placement
ARMS = "eva,adalora,gora,kappa,eva_init,ranks,ranks_eva_init,qv,random"
VALIDATE = ["--arms", ARMS, "--seeds", "1,2", "--random_sets", "2", "--lr_grid", "1e-3,3e-3", "--max_steps", "10",
            "--sweep_steps", "5", "--test_samples", "6"]

WIDTHS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}  # SmolLM2-135M


def smollm_sizes(layers: int = 30) -> dict[str, ModuleSize]:
    return {f"L{i}.{t}": ModuleSize(f"L{i}.{t}", *w) for i in range(layers) for t, w in WIDTHS.items()}


def test_matched_random_sets_lie_within_five_percent_of_the_target_and_centred():
    rng = random.Random(0)
    sizes = smollm_sizes()
    keys = list(sizes)
    total = sum(s.params(8) for s in sizes.values())
    deviations = []
    for fraction in (0.1, 0.25, 0.5):
        target = round(fraction * total)
        for _ in range(5):
            chosen = A.matched_random(keys, sizes, 8, target, rng)
            params = sum(sizes[k].params(r) for k, r in chosen.items())
            assert abs(params - target) <= A.MATCH_TOLERANCE * target
            deviations.append(params - target)
    assert max(abs(d) for d in deviations) <= 6144 // 2  # within half the smallest module (k_proj at rank 8)
    assert min(deviations) < 0 < max(deviations)
    with pytest.raises(UserError, match="within 5%"):
        A.matched_random(["a"], {"a": ModuleSize("a", 10, 10)}, 8, 40, rng)


def test_fit_ranks_spreads_one_extra_rank_to_hit_the_target():
    sizes = {f"m{i}": ModuleSize(f"m{i}", 10, 10) for i in range(8)}
    ranks = fit_ranks(list(sizes), sizes, target=20 * (8 * 2 + 3))
    assert sorted(ranks.values()) == [2] * 5 + [3] * 3
    assert {k for k, r in ranks.items() if r == 3} == {"m0", "m4", "m2"}
    assert spread_order(8)[:4] == [0, 4, 2, 6]


def test_controls_keep_what_they_control_for(tiny_llama):
    module_map = build_module_map(tiny_llama.model)
    sizes = module_sizes(tiny_llama.model, module_map)
    keys = [key_of(m) for m in module_map.modules]
    rec = {keys[0]: 8, keys[1]: 8, keys[7]: 4, keys[9]: 8}
    typed = A.random_typed(rec, module_map, random.Random(3))
    kind = lambda ranks: sorted((k.split(".")[1], r) for k, r in ranks.items())  # noqa: E731
    assert kind(typed) == kind(rec) and typed != rec  # same types at the same ranks, other layers
    profile = {k: (i % 3) * 4 for i, k in enumerate(keys)}
    shuffled = A.shuffled_ranks(profile, module_map, random.Random(1))
    params = lambda ranks: sum(sizes[k].params(r) for k, r in ranks.items())  # noqa: E731
    assert params(shuffled) == params(profile) and shuffled != {k: r for k, r in profile.items() if r}
    for module_type in {k.split(".")[1] for k in keys}:
        same = lambda ranks: sorted(r for k, r in ranks.items() if k.endswith("." + module_type) and r)  # noqa: E731
        assert same(shuffled) == same(profile)


def test_ranks_floor_arm_covers_every_module_and_holds_the_budget():
    sizes = smollm_sizes()
    weights = {k: float(i % 7 == 0) * (1 + i) for i, k in enumerate(sizes)}  # sensitivity on the q_proj modules only
    target = 606_720  # the E2E benchmark's budget: a quarter of every module at rank 8
    floor = A.allocated_ranks(sizes, weights, target, min_rank=driver.FLOOR_RANK)
    plain = A.allocated_ranks(sizes, weights, target)
    used = sum(sizes[k].params(r) for k, r in floor.items())
    assert set(floor) == set(sizes) and min(floor.values()) == 1 and len(plain) < len(sizes)
    # Filled until no weighted module (here every q_proj: 2 ranks x 1152 wide) fits another step.
    assert target - sizes["L0.q_proj"].params(2) < used <= target
    # The weighted modules keep the order of the weights on top of the floor.
    assert {k for k, r in floor.items() if r > 1} <= {k for k, w in weights.items() if w > 0}


def test_a_ranks_recommendation_with_evas_start_keeps_the_ranks_arm_as_its_default_start_contrast():
    sizes = smollm_sizes()
    weights = {k: 1.0 + (i % 5) for i, k in enumerate(sizes)}
    target = 606_720
    profile = A.allocated_ranks(sizes, weights, target)
    assert driver._rank_arms("ranks", sizes, weights, profile, profile, target) == []  # it is the recommendation
    [arm] = driver._rank_arms("ranks", sizes, weights, profile, profile, target, start="eva")
    assert arm.ranks == profile and arm.init == "default"


def test_spread_arm_covers_every_module_at_one_rank_and_raises_the_most_sensitive():
    sizes = smollm_sizes()
    weights = {k: (2.0 if k.startswith("L29.") else 1.0) for k in sizes}
    target = 606_720  # the E2E benchmark's budget: 1.99 ranks on every module (rank 2 everywhere takes 610,560)
    [arm] = driver._spread_arm(sizes, weights, {}, target)
    used = sum(sizes[k].params(r) for k, r in arm.ranks.items())
    assert set(arm.ranks) == set(sizes) and used == 606_336
    # Rank 1 everywhere, then rank 2 in score order (layer 29 first, then the given order) until the remainder
    # (3,840 short of rank 2 everywhere) runs out: the last two MLP modules in that order stay at rank 1.
    assert {k for k, r in arm.ranks.items() if r != 2} == {"L28.up_proj", "L28.down_proj"}
    assert arm.ranks["L28.up_proj"] == arm.ranks["L28.down_proj"] == 1
    assert driver._spread_arm(sizes, weights, arm.ranks, target) == []  # the recommendation already is the spread
    assert driver._spread_arm(sizes, {}, {}, target) == []  # no ranking


def test_types_arm_splits_the_budget_by_the_probes_group_and_module_type_ablation(tiny_llama, tmp_path):
    from lorasens.rundir import files

    module_map = build_module_map(tiny_llama.model)
    sizes = module_sizes(tiny_llama.model, module_map)
    types = sorted({m.module_type for m in module_map.modules})
    rows = ["kind,name,layer,group,module,num_modules,loss,delta_loss,delta_ci_low,delta_ci_high,rank,rank_low,rank_high",
            "all,all_on,,,,0,1.0,0.0,0.0,0.0,,,"]
    deltas = {t: (0.05 if t in ("gate_proj", "up_proj") else 0.01 if t != "k_proj" else -0.001) for t in types}
    rows += [f"module_type,{t},,,{t},2,1.0,{d},{d},{d},,," for t, d in deltas.items()]
    rows += ["group,attn,,attn,,8,1.0,0.02,0.02,0.02,,,", "group,mlp,,mlp,,6,1.0,0.18,0.18,0.18,,,"]
    (tmp_path / files.ABLATION).write_text("\n".join(rows) + "\n")
    target = sum(s.params(2) for s in sizes.values())  # every module at rank 2
    [arm] = driver._types_arm(tmp_path, module_map, sizes, {}, target)
    spent = {t: sum(sizes[k].params(r) for k, r in arm.ranks.items() if k.endswith("." + t)) for t in types}
    assert not any(k.endswith(".k_proj") for k in arm.ranks)  # a negative delta: no LoRA on that type
    assert spent["gate_proj"] == spent["up_proj"] > 4 * spent["q_proj"]
    assert abs(sum(spent.values()) - target) <= 0.05 * target
    # The groups' deltas set the groups' shares (MLP 0.18 of 0.20: 90%), the type deltas the split within each.
    mlp = sum(spent[t] for t in ("gate_proj", "up_proj", "down_proj"))
    assert mlp / sum(spent.values()) == pytest.approx(0.9, abs=0.03)
    # The recommendation already being that allocation, or no ablation: no arm.
    assert driver._types_arm(tmp_path, module_map, sizes, arm.ranks, target) == []
    assert driver._types_arm(tmp_path / "none", module_map, sizes, {}, target) == []


def test_value_arm_fills_the_budget_by_predicted_loss_reduction_per_parameter():
    sizes = {"a": ModuleSize("a", 10, 10), "b": ModuleSize("b", 20, 20), "c": ModuleSize("c", 10, 10)}
    # per parameter: c > b > a; the budget holds c and b (2 * 20 * 8 + ... at rank 8: c 160, b 320, a 160)
    ranks = A.value_ranks(sizes, {"a": 0.001, "b": 0.002, "c": 0.01, "d": None}, 8, target=480)
    assert ranks == {"c": 8, "b": 8}
    with pytest.raises(UserError, match="first_order"):
        A.value_ranks(sizes, {}, 8, 480)


def test_adalora_schedule_follows_the_training_length():
    assert A.adalora_schedule(150) == {"total_step": 150, "tinit": 15, "tfinal": 30, "deltaT": 8}
    assert A.adalora_schedule(10) == {"total_step": 10, "tinit": 1, "tfinal": 2, "deltaT": 1}
    with pytest.raises(UserError, match="more steps"):
        A.adalora_schedule(2)


def test_arm_configs_build_exactly_their_ranks_and_method_in_peft(tiny_llama, tmp_path):
    from lorasens.model.lora import apply_placement, load_placement, lora_parameters

    module_map = build_module_map(tiny_llama.model)
    sizes = module_sizes(tiny_llama.model, module_map)
    keys = [key_of(m) for m in module_map.modules]
    arm = A.Arm("x", "ranks", {keys[0]: 2, keys[1]: 4, keys[9]: 4, keys[-1]: 16})
    path = tmp_path / "x.json"
    path.write_text(json.dumps(A.arm_config(arm, module_map, r=8, alpha=16.0, max_steps=20)))
    placement = load_placement(path, tiny_llama.model, module_map)
    model = apply_placement(tiny_llama.model, placement, dropout=0.0)
    lora = lora_parameters(model, module_map)
    assert {key_of(lp.module): lp.A.shape[0] for lp in lora} == arm.ranks
    assert all(lp.scaling == pytest.approx(2.0) for lp in lora)  # alpha / r of the run at every rank
    assert sum(lp.numel() for lp in lora) == arm.params(sizes)

    ada = A.Arm("adalora", "adalora", {k: 3 for k in keys}, adalora=A.AdaLoraPlan(3, 20, 900))
    path.write_text(json.dumps(A.arm_config(ada, module_map, r=8, alpha=16.0, max_steps=20)))
    placement = load_placement(path, tiny_llama.model, module_map)
    assert placement.method == "adalora" and placement.adalora_target_total_rank == 20
    assert (placement.config.total_step, placement.config.tinit, placement.config.tfinal) == (20, 2, 4)
    assert placement.config.lora_alpha == pytest.approx(6.0)  # alpha / r * init_r


def test_placement_files_refuse_methods_that_rewrite_the_base(tiny_llama, tmp_path):
    from lorasens.model.lora import load_placement

    module_map = build_module_map(tiny_llama.model)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"r": 4, "target_modules": ["q_proj"], "init_lora_weights": "pissa"}))
    with pytest.raises(UserError, match="init_lora_weights 'pissa'"):
        load_placement(path, tiny_llama.model, module_map)
    path.write_text(json.dumps({"peft_type": "PREFIX_TUNING", "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match="valid: LORA, ADALORA"):
        load_placement(path, tiny_llama.model, module_map)


def test_eva_initialisation_differs_from_the_default_and_follows_the_inputs(tiny_llama, tmp_path):
    from lorasens.data.features import IGNORE_INDEX
    from lorasens.model.lora import apply_placement, load_placement, lora_parameters
    from lorasens.training.peft_methods import initialize_eva_from_features

    module_map = build_module_map(tiny_llama.model)
    path = tmp_path / "eva.json"
    path.write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": "eva",
                                "eva_config": {"rho": 1.0}}))
    placement = load_placement(path, tiny_llama.model, module_map)
    assert placement.eva
    torch.manual_seed(0)
    features = [{"input_ids": ids, "attention_mask": [1] * 12, "labels": [IGNORE_INDEX] * 2 + ids[2:]}
                for ids in torch.randint(3, 200, (24, 12)).tolist()]
    model = apply_placement(tiny_llama.model, placement, 0.0)
    initialize_eva_from_features(model, features, tiny_llama.tokenizer, batch_size=4)
    lora = lora_parameters(model, module_map)
    assert lora and all(lp.A.device.type == "cpu" and torch.isfinite(lp.A).all() for lp in lora)
    for lp in lora:
        rows = lp.A.detach()
        # EVA's A rows are orthonormal right-singular vectors of the module's inputs (the default is Kaiming).
        assert torch.allclose(rows @ rows.T, torch.eye(rows.shape[0]), atol=1e-4)
        assert torch.count_nonzero(lp.B) == 0


def test_eva_initialisation_without_redistribution_keeps_every_modules_rank(tiny_llama, tmp_path):
    """PEFT's EVA at rho = 1 still trades rank among modules that share an input (q/k/v, gate/up); lorasens keeps the
    configured profile and gives each module the leading components of its input's SVD. Through the public helper
    a PEFT script calls, with a DataLoader."""
    from torch.utils.data import DataLoader

    from lorasens import initialize_eva
    from lorasens.data.features import IGNORE_INDEX
    from lorasens.model.lora import apply_placement, load_placement

    module_map = build_module_map(tiny_llama.model)
    profile = {"q_proj": 4, "k_proj": 1, "v_proj": 2, "gate_proj": 3, "up_proj": 1}
    path = tmp_path / "eva_ranks.json"
    path.write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": list(profile), "init_lora_weights": "eva",
                                "rank_pattern": profile, "alpha_pattern": {k: 2 * v for k, v in profile.items()},
                                "eva_config": {"rho": 1.0}}))
    placement = load_placement(path, tiny_llama.model, module_map)
    torch.manual_seed(0)
    features = [{"input_ids": ids, "attention_mask": [1] * 12, "labels": [IGNORE_INDEX] * 2 + ids[2:]}
                for ids in torch.randint(3, 200, (24, 12)).tolist()]
    model = apply_placement(tiny_llama.model, placement, 0.0)
    initialize_eva(model, DataLoader(features, batch_size=4,
                                     collate_fn=lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}))
    A = {name.removeprefix("base_model.model."): m.lora_A["default"].weight.detach()
         for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert A and {name: a.shape[0] for name, a in A.items()} == {
        name: profile[name.rsplit(".", 1)[1]] for name in A}  # every module at its configured rank
    for name, a in A.items():
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4)  # orthonormal singular vectors
    for layer in {name.rsplit(".", 2)[0] for name in A}:  # one input, one SVD: the smaller rank is a prefix
        q, k, v = (A[f"{layer}.self_attn.{t}"] for t in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(k, q[:1]) and torch.equal(v, q[:2])
        gate, up = A[f"{layer}.mlp.gate_proj"], A[f"{layer}.mlp.up_proj"]
        assert torch.equal(up, gate[:1])


def test_holm_and_verdicts():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert stats.verdict(-0.1, 0.01, lower_is_better=True) == "wins"
    assert stats.verdict(-0.1, 0.2, lower_is_better=True) == "ties"
    assert stats.verdict(+2.0, 0.001, lower_is_better=False) == "wins"
    assert stats.verdict(-2.0, 0.001, lower_is_better=False) == "loses"


def test_bootstrap_difference_is_the_token_weighted_loss_difference():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 20, 40).astype(float)

    def unit(offset: float, seed: int) -> stats.UnitScores:
        nll = (2.0 + offset + rng.normal(0, 0.05, 40)) * tokens
        return stats.UnitScores(np.stack([nll, tokens], axis=1), seed)

    better, worse = [unit(0.0, s) for s in (1, 2, 3)], [unit(0.3, s) for s in (1, 2, 3)]
    c = stats.compare(better, worse, stats.loss_value, np.random.default_rng(1), draws=400)
    expected = np.mean([stats.loss_value(u.stats.sum(0)) for u in better]) - np.mean(
        [stats.loss_value(u.stats.sum(0)) for u in worse])
    assert c["difference"] == pytest.approx(expected) and c["ci_low"] < expected < c["ci_high"] < 0
    assert c["p_value"] < 0.01 and c["units"] == [3, 3] and c["seeds"] == [1, 2, 3] and c["prompts"] == 40
    same = stats.compare(better, better, stats.loss_value, np.random.default_rng(1), draws=400)
    assert same["ci_low"] <= 0 <= same["ci_high"] and same["p_value"] > 0.5
    assert stats.compare(better, [unit(0.3, 9)], stats.loss_value, np.random.default_rng(1), draws=10) is None


def test_comparisons_pair_arms_by_seed_and_draw_no_verdict_on_one_seed():
    """The seed moves every arm's loss together (here seed 1 is 0.3 easier than seed 2 or 3): compared on their
    common seeds, paired, an arm that trained only the easy seed neither wins by it nor gets a verdict."""
    from lorasens.experiment.validation.outputs import _comparisons

    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 20, 40).astype(float)
    seed_effect = {1: -0.3, 2: 0.0, 3: 0.05, 4: 0.1}

    def scores(offset: float, seeds) -> list[dict]:
        return [{"seed": s, "validation_loss": 1.0, "per_prompt_loss": np.stack([(2.0 + offset + seed_effect[s] + rng.normal(0, 0.005, 40))
                                                         * tokens, tokens], axis=1).tolist()} for s in seeds]

    runs = {"recommended": scores(0.0, (1, 2, 3)), "eva": scores(0.01, (1, 2, 3, 4)), "mlp": scores(0.01, (1,)),
            "random": scores(0.05, (1, 2, 3)) + scores(0.07, (1,))}  # random: two sets at seed 1
    table = {g: {"family": "peer" if g == "eva" else "control", "validation_loss": 1.0} for g in runs}
    comparisons, primary = _comparisons(runs, table)
    assert primary == "eva"
    eva, mlp, rand = (comparisons[g]["test_loss"] for g in ("eva", "mlp", "random"))
    # Paired on seeds 1-3: about -0.01, with a CI that the seed effects (0.35 apart) do not widen.
    assert eva["seeds"] == [1, 2, 3] and eva["difference"] == pytest.approx(-0.01, abs=0.003)
    assert eva["ci_high"] - eva["ci_low"] < 0.02 and eva["verdict"] == "wins"
    # mlp on seed 1 only: -0.01 paired (unpaired it would read +0.21 in mlp's favour), and no verdict.
    assert mlp["seeds"] == [1] and mlp["difference"] == pytest.approx(-0.01, abs=0.003)
    assert mlp["p_adjusted"] is None and mlp["verdict"] == stats.TOO_FEW_SEEDS
    # Random sets: the two sets at seed 1 count as their mean there.
    assert rand["seeds"] == [1, 2, 3] and rand["difference"] == pytest.approx(-(0.05 * 2 + 0.06) / 3, abs=0.003)
    assert rand["p_adjusted"] is not None and rand["verdict"] == "wins"


def test_the_primary_peer_is_judged_on_the_seeds_every_peer_trained():
    """Seed 3's validation split is 0.1 harder: over all of its seeds EVA (1-3) would look worse than GoRA (1-2),
    on the common seeds 1-2 EVA is lower, and is the primary peer."""
    from lorasens.experiment.validation.outputs import best_peer

    level = {1: 1.30, 2: 1.28, 3: 1.40}

    def runs(offset: float, seeds) -> list[dict]:
        return [{"seed": s, "validation_loss": level[s] + offset} for s in seeds]

    peers = {"eva": runs(0.0, (1, 2, 3)), "gora": runs(0.01, (1, 2)), "adalora": runs(0.05, (1, 2, 3))}
    assert best_peer(peers) == "eva"
    assert best_peer({"eva": runs(0.0, (3,)), "gora": runs(0.01, (1,))}) == "gora"  # no common seed: all of each
    assert best_peer({}) is None


def test_interval_is_student_t_over_seeds_plus_the_prompts_bootstrap_variance_for_loss_and_bleu():
    """compare() scores all prompt draws at once; each draw must be the one a plain loop makes (the same prompts from
    the same generator, each seed's paired difference over them), and the interval is Student-t with the seeds' and
    the prompts' variances and Welch-Satterthwaite degrees of freedom."""
    from scipy.stats import t as student_t

    from lorasens.metrics.segments import _bleu_value, bleu_segments

    def by_definition(a, b, value, rng, draws):
        n = a[0].stats.shape[0]
        seeds = sorted({u.seed for u in a} & {u.seed for u in b})
        d = np.array([stats.seed_score(a, s, value) - stats.seed_score(b, s, value) for s in seeds])
        drawn = []
        for _ in range(draws):
            prompts = rng.integers(0, n, n)
            drawn.append(np.mean([stats.seed_score(a, s, value, prompts) - stats.seed_score(b, s, value, prompts)
                                  for s in seeds]))
        seed_var, prompt_var = d.var(ddof=1) / len(d), np.var(drawn, ddof=1)
        df = (len(d) - 1) * ((seed_var + prompt_var) / seed_var) ** 2
        half = student_t.ppf(0.975, df) * (seed_var + prompt_var) ** 0.5
        return [d.mean() - half, d.mean() + half]

    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 20, 30).astype(float)
    loss = [stats.UnitScores(np.stack([(2 + rng.normal(0, 0.3, 30)) * tokens, tokens], axis=1), seed)
            for seed in (1, 2, 3, 1, 2, 3, 3)]
    refs = [["the cat sat on the mat", "a cat sat"], ["it is red", "red it is"], ["we go home now", "home we go"]] * 4
    words = ["the", "cat", "sat", "red", "it", "is", "home", "go", "we", "a", "mat", "now"]
    bleu = [stats.UnitScores(bleu_segments([" ".join(rng.choice(words, 5)) for _ in refs], refs).stats, seed)
            for seed in (1, 2, 3, 1, 2, 3, 3)]
    for units, value in ((loss, stats.loss_value), (bleu, _bleu_value)):
        a, b = units[:3], units[3:]  # b has two units at seed 3 (as random sets can)
        c = stats.compare(a, b, value, np.random.default_rng(7), draws=300)
        assert c["seeds"] == [1, 2, 3] and c["units"] == [3, 4]
        assert [c["ci_low"], c["ci_high"]] == pytest.approx(by_definition(a, b, value, np.random.default_rng(7), 300),
                                                            rel=1e-9, abs=1e-12)


def test_with_prompts_that_do_not_vary_the_interval_is_the_paired_t_test_over_seeds():
    """E2E's per-seed test losses of `ranks` and EVA (seeds 1-4): a percentile bootstrap over four seeds called this
    significant (p 0.02); the paired t-test over the seeds does not (p 0.08), and neither does compare()."""
    from scipy.stats import ttest_rel

    ranks, eva = [1.2346, 1.2588, 1.2533, 1.2414], [1.2540, 1.2620, 1.2620, 1.2472]
    tokens = np.full(20, 10.0)

    def units(losses):  # every prompt at the seed's loss: resampling prompts changes nothing
        return [stats.UnitScores(np.stack([np.full(20, x) * tokens, tokens], axis=1), s + 1) for s, x in enumerate(losses)]

    c = stats.compare(units(ranks), units(eva), stats.loss_value, np.random.default_rng(0), draws=200)
    reference = ttest_rel(ranks, eva)
    assert c["difference"] == pytest.approx(np.mean(ranks) - np.mean(eva)) and c["df"] == pytest.approx(3)
    assert c["p_value"] == pytest.approx(reference.pvalue, rel=1e-6) and 0.05 < c["p_value"] < 0.1
    low, high = reference.confidence_interval(0.95)
    assert [c["ci_low"], c["ci_high"]] == pytest.approx([low, high], rel=1e-6)
    assert stats.verdict(c["difference"], c["p_value"], lower_is_better=True) == "ties"


def test_bleu_segments_sum_to_the_official_corpus_bleu():
    from lorasens.metrics import bleu
    from lorasens.metrics.segments import bleu_segments

    predictions = ["The Eagle is a cheap pub.", "Blue Spice serves French food.", "Zizzi is a coffee shop"]
    references = [["The Eagle is a cheap pub near the river.", "Cheap pub The Eagle."],
                  ["Blue Spice is a French restaurant."], ["Zizzi is a coffee shop in the city centre.", "Zizzi."]]
    seg = bleu_segments(predictions, references)
    assert seg.stats.shape[0] == 3
    assert seg.value(seg.stats.sum(0)) == pytest.approx(bleu(predictions, references), abs=1e-6)


def test_example_losses_are_the_token_weighted_loss(tiny_llama):
    from lorasens.data.features import IGNORE_INDEX

    torch.manual_seed(0)
    features = []
    for length, prompt in ((9, 4), (14, 6), (6, 2)):
        ids = torch.randint(3, 200, (length,)).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    model = tiny_llama.model.eval()
    for (nll, tokens), f in zip(example_losses(model, features, batch_size=2, pad_token_id=0), features):
        expected = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss.item()
        assert tokens == sum(label != IGNORE_INDEX for label in f["labels"][1:])
        assert nll / tokens == pytest.approx(expected, rel=1e-5)


def test_settings_and_bad_input_are_one_line_and_exit_2(tmp_path, capsys):
    assert parse_seeds("1, 2,3") == (1, 2, 3)
    for bad in ("", "1,x"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(UserError, match="repeat a seed"):
        ValidateSettings(seeds=(1, 2), extra_seeds=(2,)).check()
    with pytest.raises(UserError, match="unknown arm"):
        ValidateSettings(arms=("eva", "lora_ga")).check()
    with pytest.raises(UserError, match="--lr_grid"):
        ValidateSettings(lr_grid=(0.0,)).check()
    assert main(["validate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a lorasens run directory" in err and "\n" not in err
    assert main(["validate", str(tmp_path), "--extra_seeds", "4,5"]) == 2
    assert "SEEDS:ARMS" in capsys.readouterr().err
    from lorasens.commands.validate import ARM_HELP  # --help names every arm, each once

    named = [n.split(" (")[0] for part in ARM_HELP.split("; ") for n in part.split(", ")]
    assert sorted(named) == sorted(A.ARMS)


@pytest.mark.slow
def test_e2e_test_split_is_the_whole_devset_and_disjoint_from_every_other_split(e2e_dir):
    from lorasens.data.registry import load_examples, training_splits
    from lorasens.experiment.validation.driver import held_out_examples

    test = load_examples("e2e", "test", str(e2e_dir), 0)
    assert len(test) == 4672 and len({ex.prompt for ex in test}) == 547
    cfg = build_config(cli_overrides={"model": "tiny-random-llama", "dataset": "e2e", "data_dir": str(e2e_dir)})
    examples, info = held_out_examples(cfg, (1, 2, 3), None)
    assert info["prompts_used"] == 547 and info["prompts_excluded_as_seen"] == 0 and info["references"] == 4672
    train, analysis = training_splits("e2e", str(e2e_dir), 1, None, None)
    validation = load_examples("e2e", "validation", str(e2e_dir), 1)
    seen = {ex.prompt for ex in train} | {ex.prompt for ex in analysis} | {ex.prompt for ex in validation}
    assert not seen & {ex.prompt for ex in examples}
    assert not {ex.prompt for ex in validation} & ({ex.prompt for ex in train} | {ex.prompt for ex in analysis})


@pytest.mark.slow
def test_adalora_placement_prunes_ranks_while_it_trains(tmp_path):
    place = tmp_path / "ada.json"
    place.write_text(json.dumps({"peft_type": "ADALORA", "init_r": 6, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                 "target_r": 2, "total_step": 10, "tinit": 1, "tfinal": 2, "deltaT": 1,
                                 "lorasens": {"adalora_target_total_rank": 5}}))
    args = [a for a in TINY if a not in ()]
    args[args.index("--max_steps") + 1] = "10"
    assert main(["train", *args, "--placement", str(place), "--r", "6", "--lora_alpha", "8", "--track_gradients", "false",
                 "--track_importance", "false", "--track_update_magnitude", "false", "--final_adapter", "last",
                 "--output_dir", str(tmp_path), "--experiment_name", "ada"]) == 0
    adapter = json.loads((tmp_path / "ada" / "summary.json").read_text())["adapter"]
    history = [total for _, total in adapter["total_rank_by_step"]]
    assert adapter["method"] == "adalora" and history[0] > history[-1] == adapter["kept_total_rank"] == 5
    assert history == sorted(history, reverse=True) and 6 * 8 in (history[0], max(history))
    assert main(["train", *args, "--placement", str(place), "--r", "6", "--lora_alpha", "8",
                 "--output_dir", str(tmp_path), "--experiment_name", "refused"]) == 2


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> Path:
    """One probe on stories260K (a tiny pretrained Llama) and one validation with every peer arm."""
    from conftest import shared_path

    model = shared_path("models", "stories260K")
    out = tmp_path_factory.mktemp("runs")
    args = [a if a != "tiny-random-llama" else str(model) for a in TINY]
    assert main(["train", *args, "--output_dir", str(out), "--experiment_name", "probe"]) == 0
    assert main(["validate", str(out / "probe"), *VALIDATE]) == 0
    return out / "probe"


@pytest.mark.slow
def test_validate_trains_every_arm_at_the_budget_with_its_own_learning_rate(validated):
    import csv

    out = validated / "validation"
    summary = json.loads((out / "placement_validation.json").read_text())
    budget = summary["budget"]["lora_params"]
    with (out / "placement_validation.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    groups = {"random" if r["arm"].startswith("random_") else r["arm"] for r in rows}
    assert groups == {"recommended", *ARMS.split(",")}
    for row in rows:  # trained parameters (AdaLoRA: the ranks it kept) within 5% of the budget
        assert abs(int(row["lora_params"]) - budget) <= 0.05 * budget, row
        # the grid, or up to two half-decade rates past an end where the best rate sat at that end
        assert float(row["lr"]) in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2) and float(row["test_loss"]) > 0
    ada = [r for r in rows if r["arm"] == "adalora"]
    assert all(int(r["initial_lora_params"]) > int(r["lora_params"]) for r in ada)  # AdaLoRA starts above, prunes
    # ranks_eva_init: the ranks arm's profile, EVA's start; every module keeps its rank, so the counts are equal
    params = {r["arm"]: int(r["lora_params"]) for r in rows if r["arm"] in ("ranks", "ranks_eva_init")}
    assert params["ranks_eva_init"] == params["ranks"]
    placement = json.loads((out / "placements" / "ranks_eva_init_10steps.json").read_text())
    assert placement["init_lora_weights"] == "eva" and placement["eva_config"]["rho"] == 1.0
    assert placement["rank_pattern"] == json.loads((out / "placements" / "ranks_10steps.json").read_text())["rank_pattern"]
    for group, entry in summary["arms"].items():
        sweep = {(r["arm"], float(r["lr"])): float(r["validation_loss"])
                 for r in csv.DictReader((out / "sweep.csv").open(newline=""))}
        arm = "random_1" if group == "random" else group
        tried = [lr for a, lr in sweep if a == arm]
        assert {1e-3, 3e-3} <= set(tried) and len(tried) <= 4
        assert entry["lr"] == min(tried, key=lambda lr: sweep[(arm, lr)])  # chosen by validation loss
    assert summary["primary"] in {"eva", "adalora", "gora", "kappa"}
    comparisons = summary["comparisons"]
    assert set(comparisons) == groups - {"recommended"}
    others = [g for g in comparisons if g != summary["primary"]]
    raw = {g: comparisons[g]["test_loss"]["p_value"] for g in others}
    assert {g: comparisons[g]["test_loss"]["p_adjusted"] for g in others} == pytest.approx(stats.holm(raw))
    assert all(c["test_loss"]["verdict"] in ("wins", "ties", "loses") for c in comparisons.values())
    assert summary["verdict"].startswith("test loss: recommended ") and "[primary]" in summary["verdict"]
    assert summary["costs"]["eva_plan_fraction_of_training"] > 0 and summary["complete"] is True
    # Each training ran through `lorasens train`'s path with its placement file.
    config = json.loads((out / "runs" / "eva_seed2" / "config.json").read_text())
    assert "placements/eva_10steps.json" in config["lora"]["placement"] and config["training"]["seed"] == 2
    report = (validated / "report.html").read_text()
    assert 'id="validation"' in report and "recommended vs it (loss)" in report and "[primary]" in report
    # Each training's late fall is read from its eval_log (loss at the last evaluation at or before 3/4 of the steps
    # minus the last); arms with a training still falling by more than 1% are named, in the JSON and the report.
    for row in rows:
        evals = [json.loads(line) for line in (out / "runs" / f"{row['arm']}_seed{row['seed']}" / "eval_log.jsonl")
                 .read_text().splitlines()]
        early = [e["eval_loss"] for e in evals if e["step"] <= 0.75 * evals[-1]["step"]][-1]
        assert float(row["late_eval_fall"]) == pytest.approx(early - evals[-1]["eval_loss"], abs=1e-6)
    falling = {("random" if r["arm"].startswith("random_") else r["arm"]) for r in rows
               if float(r["late_eval_fall"]) > 0.01 * float(r["validation_loss"])}
    assert set(summary["still_falling"]["arms"]) == falling
    assert (summary["still_falling"]["note"] is None) == (not falling)
    assert not falling or html.escape(summary["still_falling"]["note"]) in report


@pytest.mark.slow
def test_a_recommendation_that_starts_with_eva_is_validated_with_that_start(validated, tmp_path):
    from lorasens.rundir.load import read_run_config

    probe = tmp_path / "probe"
    shutil.copytree(validated, probe, ignore=shutil.ignore_patterns("validation", "checkpoints"))
    cfg = read_run_config(probe)
    settings = ValidateSettings(arms=("recommended", "ranks", "eva_init", "ranks_eva_init")).check()
    plain = {a.name: a for a in driver.plan_arms(cfg, probe, settings)[0]}
    path = probe / "recommended_lora_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "eva", "eva_config": {"rho": 1.0}}))
    eva = {a.name: a for a in driver.plan_arms(cfg, probe, settings)[0]}
    assert plain["recommended"].init == "default" and eva["recommended"].init == "eva"
    assert eva["recommended"].ranks == plain["recommended"].ranks
    assert "eva_init" in plain and "eva_init" not in eva  # EVA's start on the recommendation is the recommendation
    assert eva["ranks"] == plain["ranks"] and eva["ranks_eva_init"] == plain["ranks_eva_init"]
    config = A.arm_config(eva["recommended"], build_module_map(driver.load_model(cfg.model.model).model), cfg.lora.r,
                          cfg.lora.lora_alpha, 10)
    assert config["init_lora_weights"] == "eva" and config["eva_config"] == {"rho": 1.0}


@pytest.mark.slow
def test_test_prompts_are_disjoint_from_every_training_validation_and_analysis_row(validated):
    from lorasens.data.registry import load_examples, training_splits
    from lorasens.evaluation.predictions import read_rows

    cfg = json.loads((validated / "config.json").read_text())
    rows = read_rows(validated / "validation" / "runs" / "recommended_seed1" / "synthetic_predictions.jsonl")
    tested = {r["prompt"] for r in rows}
    assert len(tested) == 6
    for seed in (1, 2, cfg["training"]["seed"]):
        train, analysis = training_splits("synthetic", None, seed, None, None)
        validation = load_examples("synthetic", "validation", None, seed)
        assert not tested & {ex.prompt for ex in train + analysis + validation}


def _validate_command(run: Path) -> list[str]:
    return [sys.executable, "-m", "lorasens", "validate", str(run), *VALIDATE]


@pytest.mark.slow
def test_killed_validate_resumes_without_redoing_finished_trainings(validated, tmp_path, capsys):
    # The fixture's finished validation with three trainings undone: recommended seed 2 (the first stage) and both of
    # eva's seeds (a later stage). Rerun, it must train just those three, the first stage first.
    run = tmp_path / "probe"
    shutil.copytree(validated, run)
    runs = run / "validation" / "runs"
    redo = [runs / "recommended_seed2", runs / "eva_seed1", runs / "eva_seed2"]
    for folder in redo:
        shutil.rmtree(folder)
    kept = {p: p.stat().st_mtime_ns for p in runs.glob("*/test_scores.json")}
    sweeps = {p: p.stat().st_mtime_ns for p in (run / "validation" / "sweep").glob("*/summary.json")}
    assert len(kept) > 10 and sweeps
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_validate_command(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 600
        while not (redo[1] / "config.json").exists():
            assert proc.poll() is None, f"validate exited early ({proc.returncode})"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (redo[0] / "test_scores.json").exists() and not (redo[1] / "test_scores.json").exists()
    partial = json.loads((run / "validation" / "placement_validation.json").read_text())
    # The recommendation's stage came first and is in the files; eva's trainings are not.
    assert partial["complete"] is False and partial["arms"]["recommended"]["units"] == 2
    assert partial["arms"]["eva"]["units"] == 0
    kept[redo[0] / "test_scores.json"] = redo[0].joinpath("test_scores.json").stat().st_mtime_ns
    # The resume in this process (the kill above needs a real one; a second interpreter would cost seconds of imports)
    capsys.readouterr()
    code = main(_validate_command(run)[3:])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # no finished training redone or rescored
    assert {p: p.stat().st_mtime_ns for p in sweeps} == sweeps  # no sweep training redone
    assert all((folder / "test_scores.json").exists() for folder in redo[1:])
    assert json.loads((run / "validation" / "placement_validation.json").read_text())["complete"] is True
    # Other settings on the same folder are refused rather than mixed in.
    assert main(["validate", str(run), "--seeds", "1", "--test_samples", "6"]) == 2


def test_a_best_rate_at_the_grids_end_extends_the_grid_past_it(monkeypatch, tmp_path):
    """The sweep's rule: an arm whose best validation loss sits at an end of lr_grid trains half a decade further,
    up to two more rates, until a worse rate lies on both sides; an arm with an inner best trains the grid only."""
    from types import SimpleNamespace


    loss = {("up", 3e-4): 2.0, ("up", 1e-3): 1.8, ("up", 3e-3): 1.5, ("up", 1e-2): 1.6,
            ("down", 3e-4): 1.0, ("down", 1e-3): 1.2, ("down", 3e-3): 1.3, ("down", 1e-4): 0.9, ("down", 3e-5): 0.8,
            ("inner", 3e-4): 1.5, ("inner", 1e-3): 1.4, ("inner", 3e-3): 1.6}
    trained = []
    monkeypatch.setattr(driver, "_run_job", lambda cfg, job, out, outcome, label: trained.append((job.arm.name, job.lr)))
    monkeypatch.setattr(driver, "_sweep_loss", lambda out, arm, lr: loss[arm.name, lr])
    arms = [SimpleNamespace(name=name, arm=name) for name in ("up", "down", "inner")]
    sweep = []
    chosen = driver._tune_rates(None, arms, SimpleNamespace(lr_grid=[3e-4, 1e-3, 3e-3], seeds=[1]), 10, tmp_path, {},
                                sweep)
    assert chosen == {"up": 3e-3, "down": 3e-5, "inner": 1e-3}  # "down": still falling after two extensions
    assert trained[9:] == [("up", 1e-2), ("down", 1e-4), ("down", 3e-5)]
    assert [j.run_dir.name for j in sweep][9:] == ["up_lr0.01", "down_lr0.0001", "down_lr3e-05"]
    assert driver.half_decade(3e-3, up=True) == 1e-2 and driver.half_decade(1e-2, up=False) == 3e-3
