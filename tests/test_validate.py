"""`lorasens validate`: placements matched in LoRA parameters, the test split, the files, resuming, bad input."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorasens.analysis.budget import ModuleSize
from lorasens.analysis.sensitivity import key_of
from lorasens.cli import main
from lorasens.config import build_config
from lorasens.errors import UserError
from lorasens.module_map import build_module_map
from lorasens.validate import (
    MATCH_TOLERANCE,
    PlacementSpec,
    ValidateSettings,
    example_losses,
    fit_ranks,
    matched_random,
    module_sizes,
    parse_seeds,
    placement_config,
    plan_placements,
    spread_order,
    held_out_examples,
)

# One optimizer step of the tiny model: the validation machinery is what is tested, not the training.
TINY = ["--model", "tiny-random-llama", "--dataset", "synthetic", "--max_steps", "1", "--max_length", "160",
        "--batch_size", "2", "--train_samples", "4", "--eval_samples", "4", "--eval_steps", "0",
        "--evaluate", "false", "--ablation", "false", "--budget", "0.25", "--budget_unit", "params"]
VALIDATE = ["--seeds", "1,2", "--random_sets", "1", "--test_samples", "6"]


def sizes_of(module_map, model) -> dict[str, ModuleSize]:
    return module_sizes(model, module_map)


def test_matched_random_sets_lie_within_five_percent_of_the_target():
    rng = random.Random(0)
    # Llama-like widths: attention 576x576 / 576x192, MLP 576x1536 (SmolLM2-135M), 30 layers.
    widths = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    sizes = {f"L{i}.{t}": ModuleSize(f"L{i}.{t}", *w) for i in range(30) for t, w in widths.items()}
    keys = list(sizes)
    total = sum(s.params(8) for s in sizes.values())
    deviations = []
    for fraction in (0.1, 0.25, 0.5):
        target = round(fraction * total)
        for draw in range(5):
            chosen = matched_random(keys, sizes, 8, target, rng)
            params = sum(sizes[k].params(r) for k, r in chosen.items())
            assert abs(params - target) <= MATCH_TOLERANCE * target, (fraction, draw, params, target)
            assert set(chosen.values()) == {8}
            deviations.append(params - target)
    # Centred on the target, not filled up to +5%: within half the smallest module (k_proj: 8 * 768 = 6144).
    assert max(abs(d) for d in deviations) <= 6144 // 2
    assert min(deviations) < 0 < max(deviations)  # above and below, not one-sided
    with pytest.raises(UserError, match="within 5%"):  # one module is 4x the target: no set can match
        matched_random(["a"], {"a": ModuleSize("a", 10, 10)}, 8, 40, rng)


def test_fit_ranks_spreads_one_extra_rank_to_hit_the_target():
    sizes = {f"m{i}": ModuleSize(f"m{i}", 10, 10) for i in range(8)}  # 20 parameters per rank each
    ranks = fit_ranks(list(sizes), sizes, target=20 * (8 * 2 + 3))  # rank 2 everywhere + 3 modules at rank 3
    assert sorted(ranks.values()) == [2] * 5 + [3] * 3
    assert {k for k, r in ranks.items() if r == 3} == {"m0", "m4", "m2"}  # spread, not the first three
    assert sorted(spread_order(8)) == list(range(8)) and spread_order(8)[:4] == [0, 4, 2, 6]
    assert fit_ranks(list(sizes), sizes, target=45) == {"m0": 1, "m4": 1}  # below rank 1 everywhere: a subset


def test_plan_holds_every_placement_at_the_recommendations_size(tiny_llama):
    module_map = build_module_map(tiny_llama.model)
    sizes = sizes_of(module_map, tiny_llama.model)
    keys = [key_of(m) for m in module_map.modules]
    rec = {k: 8 for k in keys[:5]}
    target = sum(sizes[k].params(8) for k in rec)
    plan = plan_placements(rec, sizes, module_map, 8, random_sets=3)
    names = [p.name for p in plan]
    assert names == ["recommended", "random_1", "random_2", "random_3", "qv", "mlp", "uniform", "all", "complement"]
    by = {p.name: p for p in plan}
    for name in ("random_1", "random_2", "random_3"):
        assert abs(by[name].params(sizes) - target) <= 0.05 * target
    assert {k.split(".")[1] for k in by["qv"].ranks} == {"q_proj", "v_proj"}
    assert {m.group for m in module_map.modules if key_of(m) in by["mlp"].ranks} == {"mlp"}
    assert set(by["uniform"].ranks) == set(keys) or by["uniform"].params(sizes) <= 1.05 * target
    for name in ("qv", "mlp", "uniform"):  # heuristics fitted by rank: as close as one module's rank step
        step = max(sizes[k].in_features + sizes[k].out_features for k in by[name].ranks)
        assert abs(by[name].params(sizes) - target) <= step
    assert by["all"].params(sizes) == sum(s.params(8) for s in sizes.values())
    assert set(by["complement"].ranks) == set(keys) - set(rec)
    # The same random sets for every call: the seeds vary training, not the placements compared.
    again = plan_placements(rec, sizes, module_map, 8, random_sets=3)
    assert [p.ranks for p in again] == [p.ranks for p in plan]


def test_placement_config_creates_exactly_the_stated_ranks_in_peft(tiny_llama, tmp_path):
    module_map = build_module_map(tiny_llama.model)
    sizes = sizes_of(module_map, tiny_llama.model)
    keys = [key_of(m) for m in module_map.modules]
    spec = PlacementSpec("x", "heuristic", {keys[0]: 2, keys[1]: 4, keys[9]: 4, keys[-1]: 16}, "test")
    config = placement_config(spec, module_map, r=8, alpha=16.0, dropout=0.0)
    json.dumps(config)  # a JSON file
    model = get_peft_model(tiny_llama.model, LoraConfig(**config))
    paths = {key_of(m): m.name for m in module_map.modules}
    created = {}
    for key, path in paths.items():
        layer = model.get_submodule("base_model.model." + path)
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            created[key] = layer.lora_A["default"].weight.shape[0]
            assert layer.scaling["default"] == pytest.approx(16.0 / 8)  # alpha / r kept for every rank
    assert created == spec.ranks
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == spec.params(sizes)


@pytest.mark.slow
def test_test_prompts_are_disjoint_from_train_and_validation(e2e_dir):
    cfg = build_config(cli_overrides={"model": "tiny-random-llama", "dataset": "e2e", "data_dir": str(e2e_dir),
                                      "train_samples": 300, "eval_samples": 40})
    from lorasens.data.registry import load_examples

    examples, info = held_out_examples(cfg, (1, 2), 50)
    assert len(examples) == 50 and len({ex.prompt for ex in examples}) == 50
    # E2E here has no testset_w_refs.csv: the test prompts come from devset.csv, which validation also reads.
    assert info["prompts_excluded_as_seen"] > 0
    seen = {ex.prompt for ex in load_examples("e2e", "train", str(e2e_dir), 0)}  # the whole train split
    for seed in (1, 2, cfg.training.seed):
        seen |= {ex.prompt for ex in load_examples("e2e", "validation", str(e2e_dir), seed, 40)}
    assert not seen & {ex.prompt for ex in examples}
    assert all(len(ex.references) >= 1 and ex.target == ex.references[0] for ex in examples)


def test_example_losses_are_the_token_weighted_loss(tiny_llama):
    from lorasens.data.features import IGNORE_INDEX

    torch.manual_seed(0)
    features = []
    for length, prompt in ((9, 4), (14, 6), (6, 2)):  # different lengths: padding and re-ordering are exercised
        ids = torch.randint(3, 200, (length,)).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * length,
                         "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    model = tiny_llama.model.eval()
    losses = example_losses(model, features, batch_size=2, pad_token_id=0)
    for (nll, tokens), f in zip(losses, features):
        ids = torch.tensor([f["input_ids"]])
        expected = model(input_ids=ids, labels=torch.tensor([f["labels"]])).loss.item()  # mean over its label tokens
        assert tokens == sum(label != IGNORE_INDEX for label in f["labels"][1:])
        assert nll / tokens == pytest.approx(expected, rel=1e-5)


def test_same_size_placements_are_spread_sideways_in_the_plot():
    from lorasens.plots.validation_plots import dodged_positions

    xs = dodged_positions({"recommended": 1000, "random_1": 1010, "qv": 990, "all": 4000})
    assert xs["all"] == 4000  # alone in its column: drawn at its count
    column = [xs["recommended"], xs["random_1"], xs["qv"]]
    assert column == sorted(column) and len(set(column)) == 3  # in order, none on top of another
    assert xs["random_1"] == pytest.approx(1000) and column[0] * column[2] == pytest.approx(1000**2)  # centred


def test_seeds_and_settings_are_checked():
    assert parse_seeds("1, 2,3") == (1, 2, 3)
    for bad in ("", "1,x", "a"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(UserError, match="repeated seed"):
        ValidateSettings(seeds=(1, 1)).check()
    with pytest.raises(UserError, match="--random_sets"):
        ValidateSettings(random_sets=0).check()


def test_placement_flag_must_agree_with_r_and_not_with_a_schedule(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match="--r 4 --lora_alpha 8.0"):
        build_config(cli_overrides={"model": "tiny-random-llama", "placement": str(path)})
    cfg = build_config(cli_overrides={"model": "tiny-random-llama", "placement": str(path), "r": 4, "lora_alpha": 8})
    assert cfg.lora.placement == str(path)
    with pytest.raises(UserError, match="exclude each other"):
        build_config(cli_overrides={"model": "tiny-random-llama", "placement": str(path), "r": 4, "lora_alpha": 8,
                                    "phase_strategy": "both->mlp->attn"})
    with pytest.raises(UserError, match="does not exist"):
        build_config(cli_overrides={"model": "tiny-random-llama", "placement": str(tmp_path / "none.json")})


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a lorasens run directory" in err and "\n" not in err
    assert main(["validate", str(tmp_path), "--seeds", "1,two"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seeds" in err and "\n" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, "--output_dir", str(out), "--experiment_name", "probe"]) == 0
    return out / "probe"


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_validate_writes_the_three_files_and_the_report_section(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "probe"
    shutil.copytree(tiny_run, run)
    assert main(["validate", str(run), *VALIDATE]) == 0
    out = run / "validation"
    rows = _read_csv(out / "placement_validation.csv")
    names = ["recommended", "random_1", "qv", "mlp", "uniform", "all", "complement"]
    assert [(r["placement"], r["seed"]) for r in rows] == [(n, s) for s in ("1", "2") for n in names]
    rec_params = int(rows[0]["lora_params"])
    recommended = json.loads((run / "recommended_lora_config.json").read_text())
    budget = json.loads((run / "sensitivity.json").read_text())["budget"]
    assert rec_params == budget["params_used"] and recommended["r"] == 8
    for row in rows:
        assert float(row["test_loss"]) > 0 and int(row["test_tokens"]) > 0
        assert int(row["num_modules"]) == len(row["modules"].split())
        if row["placement"] == "random_1":
            assert abs(int(row["lora_params"]) - rec_params) <= 0.05 * rec_params
    summary = json.loads((out / "placement_validation.json").read_text())
    rec = summary["placements"]["recommended"]["test_loss"]
    losses = [float(r["test_loss"]) for r in rows if r["placement"] == "recommended"]
    assert rec["mean"] == pytest.approx(sum(losses) / 2) and rec["ci_low"] < rec["mean"] < rec["ci_high"]
    diff = summary["paired_difference"]["matched_random"]
    by = {(r["placement"], r["seed"]): float(r["test_loss"]) for r in rows}
    expected = [by[("recommended", s)] - by[("random_1", s)] for s in ("1", "2")]
    assert diff["mean"] == pytest.approx(sum(expected) / 2)
    assert summary["verdict"].startswith("recommended - matched-random test loss")
    assert summary["complete"] is True and summary["seeds"] == summary["seeds_planned"] == [1, 2]
    assert (out / "placement_validation.png").stat().st_size > 10_000
    report = (run / "report.html").read_text()
    assert 'id="validation"' in report and summary["verdict"].split(":")[0] in report
    # Each training ran through `lorasens train`'s path with its placement: its config.json says so.
    config = json.loads((out / "runs" / "qv_seed2" / "config.json").read_text())
    assert config["lora"]["placement"].endswith("placements/qv.json") and config["training"]["seed"] == 2


def _validate_command(run: Path) -> list[str]:
    return [sys.executable, "-m", "lorasens", "validate", str(run), *VALIDATE]


@pytest.mark.slow
def test_killed_validate_resumes_without_redoing_finished_trainings(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "probe"
    shutil.copytree(tiny_run, run)
    runs = run / "validation" / "runs"
    first, second = runs / "recommended_seed1", runs / "recommended_seed2"  # kill once seed 1 is finished
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_validate_command(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 600
        while not (second / "config.json").exists():  # the second training has started: kill validate mid-run
            assert proc.poll() is None, f"validate exited early ({proc.returncode})"
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (first / "test_scores.json").exists() and not (second / "test_scores.json").exists()
    # Seed 1 is finished, so the files already cover it (and say that the validation is not complete).
    assert len(_read_csv(run / "validation" / "placement_validation.csv")) == 7
    partial = json.loads((run / "validation" / "placement_validation.json").read_text())
    assert partial["seeds"] == [1] and partial["seeds_planned"] == [1, 2] and partial["complete"] is False
    scores = (first / "test_scores.json").read_bytes()
    mtime = (first / "test_scores.json").stat().st_mtime_ns
    adapter_mtime = (first / "final_model" / "adapter_model.safetensors").stat().st_mtime_ns

    done = subprocess.run(_validate_command(run), capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (first / "test_scores.json").read_bytes() == scores
    assert (first / "test_scores.json").stat().st_mtime_ns == mtime  # neither retrained nor rescored
    assert (first / "final_model" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime
    assert "recommended_seed1 (" not in done.stderr and "recommended_seed2 (incomplete)" in done.stderr
    assert len(_read_csv(run / "validation" / "placement_validation.csv")) == 14
    assert json.loads((run / "validation" / "placement_validation.json").read_text())["complete"] is True
    # Other settings on the same folder are refused rather than mixed in.
    assert main(["validate", str(run), "--seeds", "1,2", "--random_sets", "2", "--test_samples", "6"]) == 2
