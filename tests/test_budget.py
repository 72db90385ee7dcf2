"""LoRA parameter counting, budgets and rank allocation (pure functions), and the rank config loading into PEFT."""

from __future__ import annotations

import json

import pytest

from lorasens.analysis.budget import (
    RANK_CHOICES,
    ModuleSize,
    allocate_ranks,
    ablation_type_shares,
    allocate_spread_ranks,
    allocate_type_ranks,
    budget_limit,
    lora_param_count,
    pattern_key,
    rank_allocation_config,
    select_within_budget,
)
from lorasens.errors import UserError


def sizes():
    # Hand-computed: at r=4, a (64, 64) module holds 4 * 128 = 512 parameters, a (64, 128) one 768.
    return [ModuleSize("a", 64, 64), ModuleSize("b", 64, 128), ModuleSize("c", 128, 64), ModuleSize("d", 64, 64)]


def test_lora_param_count_is_r_times_in_plus_out():
    assert lora_param_count(8, 576, 1536) == 8 * 2112 == 16896
    assert [s.params(4) for s in sizes()] == [512, 768, 768, 512]


def test_budget_limit_counts_and_fractions():
    assert budget_limit(None, "params", sizes(), 4) == 0.5 * 2560
    assert budget_limit(1000, "params", sizes(), 4) == 1000
    assert budget_limit(None, "modules", sizes(), 4) == 2
    assert budget_limit(0.25, "modules", sizes(), 4) == 1
    with pytest.raises(UserError, match="whole count"):
        budget_limit(2.5, "modules", sizes(), 4)
    with pytest.raises(UserError, match="budget unit"):
        budget_limit(0.5, "layers", sizes(), 4)


def test_selection_in_params_fills_greedily_and_reports_use():
    scores = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1}
    sel = select_within_budget(sizes(), scores, 0.5, "params", 4)  # limit 1280
    # a (512) + b (768) = 1280 fits exactly; c and d do not fit any more.
    assert sel.keys == ("a", "b") and sel.used == 1280 and sel.limit == 1280 and sel.params_total == 2560
    sel = select_within_budget(sizes(), scores, 1100, "params", 4)
    # a (512) fits, b (768) would exceed 1100, c neither, d (512) fits: 1024.
    assert sel.keys == ("a", "d") and sel.params_used == 1024 and sel.as_dict()["used_fraction"] == pytest.approx(1024 / 1100)
    sel = select_within_budget(sizes(), {"a": float("nan"), "b": 1.0, "c": 2.0, "d": 3.0}, 3, "modules", 4)
    assert sel.keys == ("b", "c", "d") and sel.used == 3 and sel.params_used == 2048
    # The single best module even when it alone exceeds the budget.
    assert select_within_budget(sizes(), {"b": 1.0}, 10, "params", 4).keys == ("b",)


def test_rank_allocation_is_proportional_and_within_budget():
    mods = [ModuleSize(f"m{i}", 64, 64) for i in range(4)]  # 128 parameters per rank each
    # Budget 128 * 30 parameters = 30 rank units; weights 4:2:1:0 -> continuous ranks 17.1, 8.6, 4.3, 0.
    ranks = allocate_ranks(mods, {"m0": 4.0, "m1": 2.0, "m2": 1.0, "m3": 0.0}, 128 * 30)
    assert ranks == {"m0": 16, "m1": 8, "m2": 4, "m3": 0}
    # A larger budget: the top-up raises the module furthest below its continuous rank, then stops at the budget.
    ranks = allocate_ranks(mods, {"m0": 4.0, "m1": 2.0, "m2": 1.0, "m3": 0.0}, 128 * 60)
    assert set(ranks.values()) <= set(RANK_CHOICES) and sum(ranks.values()) * 128 <= 128 * 60
    assert ranks["m0"] == 32 and ranks["m1"] == 16 and ranks["m2"] == 8 and ranks["m3"] == 0
    # Every rank from the choices, total within budget, order follows the weights, on unequal shapes.
    weights = {s.key: w for s, w in zip(sizes(), (3.0, 1.0, 2.0, 0.5))}
    ranks = allocate_ranks(sizes(), weights, 2000)
    assert sum(s.params(ranks[s.key]) for s in sizes()) <= 2000
    assert ranks["a"] >= ranks["c"] >= ranks["b"] >= ranks["d"] and ranks["a"] > 0
    assert allocate_ranks(sizes(), {}, 2000) == dict.fromkeys("abcd", 0)


def test_a_budget_below_rank_one_everywhere_goes_to_the_most_sensitive_modules_at_rank_one():
    mods = [ModuleSize(f"m{i}", 64, 64) for i in range(8)]  # 128 parameters per rank each
    weights = {f"m{i}": 1.0 - 0.05 * i for i in range(8)}  # close scores, m0 the highest (as on E2E)
    # 5 rank units for 8 modules: the five most sensitive at rank 1, not two at rank 2 (the greedy top-up's choice
    # when the smallest rank above 0 is 2)
    assert allocate_ranks(mods, weights, 128 * 5) == {**dict.fromkeys(["m0", "m1", "m2", "m3", "m4"], 1),
                                                      **dict.fromkeys(["m5", "m6", "m7"], 0)}


def test_spread_puts_one_rank_everywhere_and_the_remainder_on_the_most_sensitive():
    mods = [ModuleSize("m0", 64, 64), ModuleSize("m1", 64, 64), ModuleSize("big", 128, 128), ModuleSize("m3", 64, 64)]
    weights = {"m0": 0.1, "m1": 3.0, "big": 2.0, "m3": float("nan")}  # widths 128, 128, 256, 128: 640 per rank
    # 2 * 640 on every module; 400 left: m1 (128) then big (256) go one rank up, 16 remain, m0 does not fit.
    assert allocate_spread_ranks(mods, weights, 2 * 640 + 400) == {"m0": 2, "m1": 3, "big": 3, "m3": 2}
    # big no longer fits after m1 (200 left): it is skipped and m0 takes the next rank; NaN comes last.
    assert allocate_spread_ranks(mods, weights, 2 * 640 + 300) == {"m0": 3, "m1": 3, "big": 2, "m3": 2}
    # Below rank 1 everywhere: the most sensitive modules at rank 1, the others without LoRA.
    assert allocate_spread_ranks(mods, weights, 400) == {"m0": 0, "m1": 1, "big": 1, "m3": 0}
    assert allocate_spread_ranks(mods, weights, 0) == dict.fromkeys(weights, 0)
    # Weights decide only the remainder: with no weights at all, the order of the modules does.
    assert allocate_spread_ranks(mods, {}, 640 + 128) == {"m0": 2, "m1": 1, "big": 1, "m3": 1}


def test_rank_floor_gives_every_module_the_floor_and_the_rest_by_weight():
    mods = [ModuleSize(f"m{i}", 64, 64) for i in range(4)]  # 128 parameters per rank each
    weights = {"m0": 4.0, "m1": 2.0, "m2": 1.0, "m3": 0.0}
    # 34 rank units: 4 go to the floor (rank 1 on each module), the other 30 as without a floor (16, 8, 4, 0).
    assert allocate_ranks(mods, weights, 128 * 34, min_rank=1) == {"m0": 17, "m1": 9, "m2": 5, "m3": 1}
    # A budget the floor alone fills: every module at the floor, nothing on top.
    assert allocate_ranks(mods, weights, 128 * 8, min_rank=2) == dict.fromkeys(weights, 2)
    with pytest.raises(UserError, match="--min_rank 3 on all 4 modules takes 1536 LoRA parameters"):
        allocate_ranks(mods, weights, 128 * 11, min_rank=3)


def test_type_allocation_gives_each_type_its_share_spread_over_the_layers():
    # Four layers of two types: "a" 128 wide (128 parameters per rank), "m" 256 wide (256 per rank).
    mods = [ModuleSize(f"L{i}.a", 64, 64) for i in range(4)] + [ModuleSize(f"L{i}.m", 128, 128) for i in range(4)]
    type_of = {s.key: s.key.split(".")[1] for s in mods}
    # Shares 1:3 -> a gets 1/4 of 6144 = 1536 (12 rank units of 128: rank 3 on 4 modules), m 3/4 = 4608 (18 units
    # of 256: rank 4 on 4 modules, +1 on two of them spread apart: layers 0 and 2).
    ranks = allocate_type_ranks(mods, type_of, {"a": 0.25, "m": 0.75}, 6144)
    assert ranks == {"L0.a": 3, "L1.a": 3, "L2.a": 3, "L3.a": 3, "L0.m": 5, "L1.m": 4, "L2.m": 5, "L3.m": 4}
    assert sum(s.params(ranks[s.key]) for s in mods) == 6144
    # A type without a share gets no LoRA.
    ranks = allocate_type_ranks(mods, type_of, {"m": 1.0}, 6144)
    assert all(ranks[f"L{i}.a"] == 0 and ranks[f"L{i}.m"] == 6 for i in range(4))


def test_type_shares_split_the_group_deltas_by_the_type_deltas_within_each_group():
    group_of_type = {"q": "attn", "v": "attn", "up": "mlp", "down": "mlp"}
    # Groups 1:3 (the MLP carries 3/4 although its types' own deltas sum to only twice the attention's); within the
    # MLP, up:down = 3:1; within attention, v's negative delta counts 0.
    shares = ablation_type_shares({"q": 0.01, "v": -0.002, "up": 0.015, "down": 0.005}, group_of_type,
                                  {"attn": 0.1, "mlp": 0.3})
    assert shares == pytest.approx({"q": 0.25, "v": 0.0, "up": 0.5625, "down": 0.1875})
    # No group deltas (an older file): each group takes the sum of its types' deltas, i.e. shares of the type deltas.
    assert ablation_type_shares({"q": 0.01, "v": 0.01, "up": 0.02, "down": float("nan")}, group_of_type, {}) == \
        pytest.approx({"q": 0.25, "v": 0.25, "up": 0.5, "down": 0.0})
    # A group with a positive delta and no positive type delta: its types share it evenly.
    assert ablation_type_shares({"q": 0.0, "v": -1.0, "up": 0.02, "down": 0.02}, group_of_type,
                                {"attn": 0.1, "mlp": 0.1}) == pytest.approx({"q": 0.25, "v": 0.25, "up": 0.25,
                                                                            "down": 0.25})
    with pytest.raises(UserError, match="positive ablation delta for at least one module group"):
        ablation_type_shares({"q": 0.01, "up": 0.01}, group_of_type, {"attn": 0.0, "mlp": -1.0})


def test_pattern_keys_match_only_their_own_layer_in_peft():
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.self_attn.q_proj" for i in (1, 3, 11, 13, 31)]
    keys = [pattern_key(n) for n in names]
    for name in names:
        assert get_pattern_key(keys, name) == pattern_key(name)
    # The unescaped path of layer 3 also matches "model.layers.3Xself_attn.q_proj"; the escaped one does not.
    assert get_pattern_key([pattern_key("model.layers.3.self_attn.q_proj")], "model.layers.3Xself_attn.q_proj") \
        == "model.layers.3Xself_attn.q_proj"  # no match: PEFT returns the name itself
    assert get_pattern_key([pattern_key("model.layers.3.self_attn.q_proj")], "model.layers.13.self_attn.q_proj") \
        == "model.layers.13.self_attn.q_proj"


def test_rank_allocation_config_creates_exactly_the_stated_ranks_in_peft():
    from peft import LoraConfig, get_peft_model

    from lorasens.analysis.sensitivity import recommended_lora_config
    from lorasens.model.loading import build_tiny_random_llama
    from lorasens.model.module_map import build_module_map

    loaded = build_tiny_random_llama(seed=0, num_layers=14)  # layers 3 and 13 both exist
    module_map = build_module_map(loaded.model)
    by_name = {m.name: m for m in module_map.modules}
    wanted = {"model.layers.3.self_attn.q_proj": 16, "model.layers.13.self_attn.q_proj": 2,
              "model.layers.1.mlp.up_proj": 8, "model.layers.11.mlp.up_proj": 32, "model.layers.0.self_attn.v_proj": 8,
              "model.layers.13.mlp.down_proj": 0}
    base = recommended_lora_config([by_name[p] for p, r in wanted.items() if r], module_map, 8, 16.0, 0.0)
    config = rank_allocation_config(base, wanted)
    assert config["r"] == 8 and config["lora_alpha"] == 16.0
    model = get_peft_model(loaded.model, LoraConfig(**json.loads(json.dumps(config))))
    got = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            got[path] = module.lora_A["default"].weight.shape[0]
            assert module.lora_B["default"].weight.shape[1] == got[path]
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha / r kept constant
    assert got == {p: r for p, r in wanted.items() if r}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer = lambda p: model.get_submodule("base_model.model." + p)  # noqa: E731
    expected = sum(lora_param_count(r, layer(p).in_features, layer(p).out_features) for p, r in wanted.items() if r)
    assert trainable == expected
    with pytest.raises(UserError, match="rank 0"):
        rank_allocation_config(base, {"model.layers.0.self_attn.q_proj": 0})


def test_the_help_of_allocate_and_min_rank_lists_the_rank_choices_the_allocator_uses():
    from lorasens.config import field_index

    choices = ",".join(map(str, RANK_CHOICES))
    assert f"--min_rank plus {choices})" in field_index()["allocate"][1].metadata["help"]
    first_four = ",".join(map(str, RANK_CHOICES[:4]))
    assert f"min_rank + {first_four},...)" in field_index()["min_rank"][1].metadata["help"]
