"""Schedules as data: parsing, boundaries, and exactly which modules each phase trains (no training here)."""

from __future__ import annotations

import dataclasses

import pytest

from lorasens.config import build_config
from lorasens.errors import UserError
from lorasens.model.module_map import build_module_map
from lorasens.model.schedule import NAMED_STRATEGIES, parse_schedule

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP


@pytest.fixture(scope="module")
def module_map():
    from lorasens.model.loading import build_tiny_random_llama

    return build_module_map(build_tiny_random_llama(seed=0).model)  # 4 layers x 7 linear modules


def names(layers, types) -> set[str]:
    """Full module paths, written out independently of the module map (tiny-random-llama's Llama names)."""
    out = set()
    for layer in layers:
        for t in types:
            part = "self_attn" if t in ATTN else "mlp"
            out.add(f"model.layers.{layer}.{part}.{t}")
    return out


def phases_of(schedule, module_map, seed=0) -> list[set[str]]:
    seeded = dataclasses.replace(schedule, seed=seed)  # the seed lives in the schedule
    return [{m.name for m in seeded.modules(i, module_map)} for i in range(len(schedule.ends))]


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("both->mlp->attn", [names(range(4), ALL), names(range(4), MLP), names(range(4), ATTN)]),
        ("attn->mlp->both", [names(range(4), ATTN), names(range(4), MLP), names(range(4), ALL)]),
        ("both->mlp->both", [names(range(4), ALL), names(range(4), MLP), names(range(4), ALL)]),
        ("early->late", [names((0, 1), ALL), names((2, 3), ALL)]),
        ("q,v@0-1->mlp@2-3", [names((0, 1), ("q_proj", "v_proj")), names((2, 3), MLP)]),
        ("attn@0-50%->mlp", [names((0, 1), ATTN), names(range(4), MLP)]),
        ("attention@3-3->q_proj,down_proj@1-2->both", [names((3,), ATTN), names((1, 2), ("q_proj", "down_proj")), names(range(4), ALL)]),
    ],
)
def test_each_phase_trains_exactly_its_modules(module_map, strategy, expected):
    schedule = parse_schedule(strategy, max_steps=12, module_map=module_map)
    assert phases_of(schedule, module_map) == expected
    # LoRA goes on exactly the union of all phases (and those are the parameters in the optimizer).
    assert {m.name for m in schedule.all_modules(module_map)} == set().union(*expected)


def test_early_late_splits_tinyllama_22_layers_at_11():
    """The issue's reference split: L0-10 / L11-21 on TinyLlama's 22 layers (resolved without a model)."""
    phases = parse_schedule("early->late", 100).phases
    assert phases[0].layers.resolve(22) == tuple(range(0, 11))
    assert phases[1].layers.resolve(22) == tuple(range(11, 22))
    assert phases[1].layers.resolve(5) == (2, 3, 4)


@pytest.mark.parametrize(
    "kwargs, ends",
    [
        ({"phase1_end": 4, "phase2_end": 8}, (4, 8, 12)),
        ({"phase_ends": "3,10"}, (3, 10, 12)),
        ({"phase_ends": "3,10,12"}, (3, 10, 12)),  # the last end may be given as max_steps
        ({"phase_ends": "0.25,0.5"}, (3, 6, 12)),  # fractions of max_steps
        ({}, (4, 8, 12)),  # equal phases by default
    ],
)
def test_boundaries(kwargs, ends):
    assert parse_schedule("both->mlp->attn", max_steps=12, **kwargs).ends == ends


def test_phase_index_step_semantics():
    """A phase ending at step E covers optimizer steps up to and including E (global_step E-1 before the step)."""
    schedule = parse_schedule("both->mlp->attn", 12, phase1_end=4, phase2_end=8)
    assert [schedule.phase_index(s) for s in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert schedule.boundaries() == (4, 8)


def test_lisa_samples_whole_layers_seeded(module_map):
    schedule = parse_schedule("lisa:layers=2,interval=3", max_steps=12, module_map=module_map)
    assert schedule.ends == (3, 6, 9, 12)
    assert [schedule.phase_index(s) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    seen_layers = set()
    for seed in range(5):
        for index, phase in enumerate(phases_of(schedule, module_map, seed)):
            layers = {int(name.split(".")[2]) for name in phase}
            assert len(layers) == 2
            assert phase == names(layers, ALL)  # every module of the sampled layers, nothing else
            assert dataclasses.replace(schedule, seed=seed).label(index, module_map) == f"lisa{sorted(layers)}".replace(" ", "")
            seen_layers |= layers
    assert seen_layers == {0, 1, 2, 3}
    # Seeded: the same seed gives the same sample, different seeds differ somewhere.
    assert phases_of(schedule, module_map, 7) == phases_of(schedule, module_map, 7)
    assert len({tuple(map(frozenset, phases_of(schedule, module_map, s))) for s in range(5)}) > 1
    assert schedule.all_modules(module_map) == module_map.modules


def test_named_strategies_all_parse(module_map):
    """Each named strategy expands to its phases: the modules of each phase and the default equal-length ends."""
    for name, expansion in NAMED_STRATEGIES.items():
        schedule = parse_schedule(name, 12, module_map=module_map)
        expected = parse_schedule(expansion, 12, module_map=module_map)
        assert len(schedule.phases) == len(expansion.split("->")) >= 2
        assert schedule.ends == expected.ends and schedule.ends[-1] == 12
        assert phases_of(schedule, module_map) == phases_of(expected, module_map)
        # Every phase trains something, and consecutive phases differ (a switch happens at each boundary).
        phases = phases_of(schedule, module_map)
        assert all(phases) and all(a != b for a, b in zip(phases, phases[1:]))


# ------------------------------------------------------------------------------------------------- invalid input

INVALID_WITH_MODEL = [
    ("foo->mlp", {}, "unknown module type 'foo'"),
    ("attn->q,zz", {}, "unknown module type 'zz'"),
    ("attn@0-9->mlp", {}, "beyond this model's 4 layers"),
    ("attn@0-10%->mlp", {}, "is empty for a model with 4 layers"),
    ("lisa:layers=5,interval=3", {}, "exceeds this model's 4 layers"),
]
INVALID = [
    ("attn->mlp->both", {"phase_ends": "8,4"}, "strictly increasing"),
    ("attn->mlp->both", {"phase_ends": "4,4"}, "strictly increasing"),
    ("attn->mlp->both", {"phase_ends": "4,20"}, "not below --max_steps 12"),
    ("attn->mlp->both", {"phase1_end": 4, "phase2_end": 12}, "not below --max_steps 12"),
    ("attn->mlp->both", {"phase_ends": "4"}, "3 phases need 2 boundaries, got 1"),
    ("early->late", {"phase1_end": 4, "phase2_end": 8}, "2 phases need 1 boundaries, got 2"),
    ("attn->mlp->both", {"phase2_end": 8}, "--phase2_end needs --phase1_end"),
    ("attn->mlp->both", {"phase_ends": "4,8", "phase1_end": 4}, "not both"),
    ("attn->mlp->both", {"phase_ends": "0.2,5"}, "mixes fractions and steps"),
    ("attn@3-1->mlp", {}, "empty layer range '3-1'"),
    ("attn@50-50%->mlp", {}, "empty or invalid layer share"),
    ("attn@->mlp", {}, "bad layer range ''"),
    ("attn->,->mlp", {}, "names no module group or type"),
    ("attn->->mlp", {}, "empty phase"),
    ("mlp", {}, "has one phase"),
    ("attn->m-l-p", {}, "unknown group or module type"),
    ("lisa:layers=2", {}, "bad LISA strategy"),
    ("lisa:layers=2,interval=3", {"phase_ends": "4"}, "takes no phase boundaries"),
]


@pytest.mark.parametrize("strategy, kwargs, message", INVALID + INVALID_WITH_MODEL)
def test_invalid_schedules_raise_user_error(module_map, strategy, kwargs, message):
    with pytest.raises(UserError, match=".*" + message.replace("(", r"\(").replace("[", r"\[")) as info:
        parse_schedule(strategy, max_steps=12, module_map=module_map, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("strategy, kwargs, message", INVALID)
def test_invalid_schedules_fail_config_validation_without_a_model(strategy, kwargs, message):
    """Everything that does not need the model's layer count or module names fails before any loading."""
    with pytest.raises(UserError, match=".*" + message.replace("(", r"\(").replace("[", r"\[")):
        build_config(cli_overrides={"model": "tiny-random-llama", "dataset": "synthetic", "max_steps": 12,
                                    "phase_strategy": strategy, **kwargs})


def test_phase_strategy_implies_dynamic_lora_and_dynamic_lora_needs_one():
    base = {"model": "tiny-random-llama", "dataset": "synthetic", "max_steps": 12}
    assert build_config(cli_overrides={**base, "phase_strategy": "both->mlp->attn"}).schedule.dynamic_lora is True
    assert build_config(cli_overrides=base).schedule.dynamic_lora is False
    with pytest.raises(UserError, match="--dynamic_lora needs --phase_strategy"):
        build_config(cli_overrides={**base, "dynamic_lora": True})
    with pytest.raises(UserError, match="--phase1_end only apply to a phase schedule"):
        build_config(cli_overrides={**base, "phase1_end": 4})
    with pytest.raises(UserError, match="--reset_optimizer_on_switch only apply"):
        build_config(cli_overrides={**base, "reset_optimizer_on_switch": True})


# ------------------------------------------------------------------------------------------------- through the CLI

CLI_BASE = ["train", "--model", "tiny-random-llama", "--dataset", "synthetic", "--max_steps", "12", "--max_length", "64",
            "--train_samples", "50", "--eval_samples", "8", "--evaluate", "false", "--ablation", "false"]


def _flags(kwargs: dict) -> list[str]:
    return [item for key, value in kwargs.items() for item in (f"--{key}", str(value))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, kwargs, message", INVALID + INVALID_WITH_MODEL)
def test_cli_invalid_schedule_exits_2_with_one_line(tmp_path, capsys, strategy, kwargs, message):
    from lorasens.cli import main

    argv = CLI_BASE + ["--output_dir", str(tmp_path), "--phase_strategy", strategy] + _flags(kwargs)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.split("'")[0] in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written for a run that could not start


@pytest.mark.parametrize("argv, message", [
    (["--dynamic_lora", "true"], "--dynamic_lora needs --phase_strategy"),
    (["--phase_ends", "4,8"], "--phase_ends only apply to a phase schedule"),
])
def test_cli_schedule_flags_without_strategy_exit_2(tmp_path, capsys, argv, message):
    from lorasens.cli import main

    assert main(CLI_BASE + ["--output_dir", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
