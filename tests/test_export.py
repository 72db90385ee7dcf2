"""`lorasens export`: the recommendation in PEFT, axolotl and LLaMA-Factory syntax; each builds the same LoRA model.

The keys checked are the tools' documented ones: axolotl's config reference (docs/config.qmd: `base_model`,
`adapter: lora`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules` as a list) and LLaMA-Factory's
`FinetuningArguments` / `ModelArguments` (`model_name_or_path`, `stage`, `finetuning_type`, `lora_rank`,
`lora_alpha` (int), `lora_dropout`, `lora_target`: comma-separated module names).
"""

from __future__ import annotations

import json

import yaml
from peft import LoraConfig, get_peft_model

from lorasens.analysis.sensitivity import recommended_lora_config
from lorasens.cli import main
from lorasens.model.loading import build_tiny_random_llama
from lorasens.model.module_map import build_module_map

AXOLOTL_KEYS = {"base_model", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
LLAMAFACTORY_KEYS = {"model_name_or_path", "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout",
                     "lora_target"}


def lora_modules(config: LoraConfig) -> set[str]:
    model = get_peft_model(build_tiny_random_llama(seed=0).model, config)
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if hasattr(module, "lora_A") and not name.endswith((".lora_A", ".lora_B"))}


def test_export_formats_build_the_recommended_model(tmp_path, capsys):
    module_map = build_module_map(build_tiny_random_llama(seed=0).model)
    # An irregular selection: v_proj of layers 0-2, down_proj of layer 3.
    selected = [m for m in module_map.modules if (m.module_type == "v_proj" and m.layer < 3)
                or (m.module_type == "down_proj" and m.layer == 3)]
    expected = {m.name for m in selected}
    (tmp_path / "recommended_lora_config.json").write_text(json.dumps(
        recommended_lora_config(selected, module_map, 4, 8.0, 0.05)))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"model": "smollm2-135m"}}))

    assert main(["export", str(tmp_path), "--format", "peft"]) == 0
    peft = json.loads((tmp_path / "lora_config.peft.json").read_text())
    assert peft["target_modules"] == [m.name for m in selected]  # explicit names, not a regex
    assert lora_modules(LoraConfig(**peft)) == expected

    assert main(["export", str(tmp_path), "--format", "axolotl"]) == 0
    axolotl = yaml.safe_load((tmp_path / "lora.axolotl.yaml").read_text())
    assert set(axolotl) == AXOLOTL_KEYS and axolotl["adapter"] == "lora"
    assert axolotl["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (axolotl["lora_r"], axolotl["lora_alpha"], axolotl["lora_dropout"]) == (4, 8.0, 0.05)
    assert lora_modules(LoraConfig(r=axolotl["lora_r"], lora_alpha=axolotl["lora_alpha"],
                                   target_modules=axolotl["lora_target_modules"])) == expected

    out = tmp_path / "lf.yaml"
    assert main(["export", str(tmp_path), "--format", "llamafactory", "--output", str(out)]) == 0
    lf = yaml.safe_load(out.read_text())
    assert set(lf) == LLAMAFACTORY_KEYS and lf["finetuning_type"] == "lora" and lf["lora_alpha"] == 8
    assert isinstance(lf["lora_target"], str)
    assert lora_modules(LoraConfig(r=lf["lora_rank"], target_modules=lf["lora_target"].split(","))) == expected
    assert capsys.readouterr().out.splitlines()[-1] == str(out)


def test_export_of_a_run_without_recommendation_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "axolotl"]) == 2
    assert "run the analysis first" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "axolotll"]) == 2


def test_per_module_ranks_export_to_peft_and_are_refused_where_a_tool_has_one_rank(tmp_path, capsys):
    from lorasens.analysis.budget import rank_allocation_config

    module_map = build_module_map(build_tiny_random_llama(seed=0).model)
    selected = [m for m in module_map.modules if m.module_type in ("v_proj", "down_proj")]
    ranks = {m.name: (2 if m.module_type == "v_proj" else 8) for m in selected}
    base = recommended_lora_config(selected, module_map, 4, 8.0, 0.05)
    (tmp_path / "recommended_lora_config.json").write_text(json.dumps(rank_allocation_config(base, ranks)))
    assert main(["export", str(tmp_path), "--format", "peft"]) == 0
    peft = LoraConfig(**json.loads((tmp_path / "lora_config.peft.json").read_text()))
    model = get_peft_model(build_tiny_random_llama(seed=0).model, peft)
    built = {name.removeprefix("base_model.model."): module.lora_A["default"].out_features
             for name, module in model.named_modules() if hasattr(module, "lora_A") and "lora_A" in module._modules}
    assert built == ranks
    assert_one_rank_tools_refuse(tmp_path, capsys, "rank_pattern", "--format peft")


def assert_one_rank_tools_refuse(run_dir, capsys, *named):
    """axolotl and LLaMA-Factory exports fail with exit 2 and one line naming `named`, and write no file."""
    capsys.readouterr()
    for fmt in ("axolotl", "llamafactory"):
        assert main(["export", str(run_dir), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert all(text in err for text in named) and len(err.strip().splitlines()) == 1
        assert not any(run_dir.glob("lora.*.yaml"))


def test_an_eva_start_exports_to_peft_only(tmp_path, capsys):
    module_map = build_module_map(build_tiny_random_llama(seed=0).model)
    selected = [m for m in module_map.modules if m.module_type == "v_proj"]
    config = {**recommended_lora_config(selected, module_map, 4, 8.0, 0.05), "init_lora_weights": "eva",
              "eva_config": {"rho": 1.0}}
    (tmp_path / "recommended_lora_config.json").write_text(json.dumps(config))
    assert main(["export", str(tmp_path), "--format", "peft"]) == 0
    assert LoraConfig(**json.loads((tmp_path / "lora_config.peft.json").read_text())).eva_config.rho == 1.0
    assert_one_rank_tools_refuse(tmp_path, capsys, "init_lora_weights eva", "--recommend_init default")
