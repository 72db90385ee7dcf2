"""Config precedence (preset < file < CLI) and validation."""

from __future__ import annotations

import json

import pytest

from lorasens.config import build_config, config_from_dict, field_index
from lorasens.errors import UserError
from lorasens.presets import PRESETS


def test_defaults_are_the_research_setting():
    cfg = build_config()
    assert cfg.model.model == "tinyllama"
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.training.lr) == (8, 16.0, 2e-4)


def test_precedence_preset_then_file_then_cli(tmp_path):
    preset = PRESETS["e2e_attention"][1]
    assert preset["r"] == 8 and preset["target"] == "attn"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora:\n  r: 16\n  lora_alpha: 32\ntraining:\n  lr: 0.001\n")
    cfg = build_config("e2e_attention", cfg_file, {"lr": "5e-4"})
    assert cfg.lora.target == "attn"  # from the preset
    assert cfg.lora.r == 16 and cfg.lora.lora_alpha == 32.0  # file beats preset
    assert cfg.training.lr == 5e-4  # CLI beats file
    assert cfg.training.max_steps == preset["max_steps"]  # untouched preset value
    assert cfg.preset == "e2e_attention"


def test_a_placement_file_sizes_the_lora_unless_r_and_alpha_are_given(tmp_path):
    """`lorasens train --preset quickstart --placement recommended_lora_config.json` takes the file's r and alpha
    (the preset's r 8 is not a choice about the file); given values must agree with it."""
    place = tmp_path / "recommended_lora_config.json"
    place.write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2}}))
    cfg = build_config("quickstart", cli_overrides={"placement": str(place)})
    assert (cfg.lora.r, cfg.lora.lora_alpha) == (4, 8.0)
    assert build_config(cli_overrides={"placement": str(place), "r": "4"}).lora.lora_alpha == 8.0
    with pytest.raises(UserError, match=r"has r=4, lora_alpha=8.0, not --r 8 --lora_alpha 8.0; leave --r/--lora_alpha"):
        build_config("quickstart", cli_overrides={"placement": str(place), "r": "8", "lora_alpha": "8"})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora:\n  r: 16\n")
    with pytest.raises(UserError, match="has r=4"):  # a config file's r is a choice too
        build_config("quickstart", cfg_file, {"placement": str(place)})
    ada = tmp_path / "ada.json"
    ada.write_text(json.dumps({"peft_type": "ADALORA", "init_r": 6, "target_modules": ["q_proj"], "total_step": 30}))
    assert build_config("quickstart", cli_overrides={"placement": str(ada)}).lora.r == 6  # AdaLoRA starts at init_r


def test_flat_json_file_and_preset_named_in_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "samsum_mlp", "batch_size": 2}))
    cfg = build_config(config_file=path)
    assert (cfg.data.dataset, cfg.lora.target, cfg.training.batch_size) == ("samsum", "mlp", 2)


def test_attention_is_an_alias_of_attn():
    assert build_config(cli_overrides={"target": "attention"}).lora.target == "attn"


def test_config_round_trips_through_config_json():
    cfg = build_config("quickstart", cli_overrides={"r": "4"})
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_resume_on_the_command_line_wins_over_the_saved_overwrite(tmp_path):
    """A run started with --overwrite saves overwrite: true; `--config RUN/config.json --resume` (the line an
    interrupted run prints) continues it instead of failing on both flags."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(build_config("quickstart", cli_overrides={"overwrite": "true"}).to_dict()))
    cfg = build_config(config_file=path, cli_overrides={"resume": "true"})
    assert (cfg.output.resume, cfg.output.overwrite) == (True, False)
    assert build_config(config_file=path, cli_overrides={"max_steps": "5"}).output.overwrite is True  # kept otherwise
    with pytest.raises(UserError, match="--overwrite and --resume exclude each other"):
        build_config(cli_overrides={"overwrite": "true", "resume": "true"})


def test_every_field_has_help_text():
    assert all(f.metadata.get("help") for _, f in field_index().values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"r": "0"}, "--r must be > 0, got 0"),
        ({"lr": "-1"}, "--lr must be > 0"),
        ({"max_steps": "0"}, "--max_steps must be > 0"),
        ({"batch_size": "0"}, "--batch_size must be > 0"),
        ({"lora_dropout": "1"}, r"--lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": "-0.1"}, r"--lora_dropout must be in \[0, 1\)"),
        ({"target": "ffn"}, "unknown target 'ffn'.*valid: attn, both, mlp"),
        ({"dataset": "squad"}, "unknown dataset 'squad'.*valid: .*e2e"),
        ({"model": "llama-7b"}, "unknown model alias 'llama-7b'; valid aliases: tinyllama, smollm2-135m"),
        ({"model": "./no/such/model"}, "model path './no/such/model' does not exist"),
        ({"r": "four"}, "r must be of type int"),
        ({"dynamic_lora": "true"}, "--dynamic_lora needs --phase_strategy"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(UserError, match=message):
        build_config(cli_overrides=overrides)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="unknown preset 'e2e_attn'.*valid: .*e2e_attention"):
        build_config("e2e_attn")


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown key in section 'training'.*'learning_rate'.*valid: .*lr"):
        build_config(config_file=path)
    path.write_text("rank: 4\n")
    with pytest.raises(UserError, match="unknown key in config file.*'rank'"):
        build_config(config_file=path)


def test_malformed_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="is not valid"):
        build_config(config_file=path)
    with pytest.raises(UserError, match="does not exist"):
        build_config(config_file=tmp_path / "missing.yaml")


def test_report_to_a_tracker_that_is_not_installed():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match="--report_to wandb needs the wandb package"):
        build_config(cli_overrides={"report_to": "wandb"})
    assert build_config(cli_overrides={"report_to": "tensorboard"}).training.report_to == "tensorboard"
