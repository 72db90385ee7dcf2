"""Module maps for every supported architecture, on tiny random models built in code."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, PhiConfig, Qwen2Config,
    AutoModelForCausalLM,
)

from lorasens.errors import UserError
from lorasens.model.lora import apply_lora, lora_parameters, targets_for
from lorasens.model.module_map import build_module_map

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

# config -> (layers path, attention module paths in a layer, MLP module paths in a layer)
ARCHES = {
    "llama": (LlamaConfig(**SMALL, num_key_value_heads=2), "model.layers",
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "mistral": (MistralConfig(**SMALL, num_key_value_heads=2), "model.layers",
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "qwen2": (Qwen2Config(**SMALL, num_key_value_heads=2), "model.layers",
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "gemma": (GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=8), "model.layers",
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "gpt2": (GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4), "transformer.h",
             ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    "gpt_neox": (GPTNeoXConfig(**SMALL), "gpt_neox.layers",
                 ["attention.query_key_value", "attention.dense"], ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "opt": (OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                      word_embed_proj_dim=32), "model.decoder.layers",
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"], ["fc1", "fc2"]),
    "phi": (PhiConfig(**SMALL), "model.layers",
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"], ["mlp.fc1", "mlp.fc2"]),
}


def _model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_module_map_exact_names_per_group_and_layer(arch):
    config, prefix, attn, mlp = ARCHES[arch]
    mm = build_module_map(_model(config))
    assert mm.architecture == arch
    assert mm.num_layers == 2
    assert mm.layers_path == prefix
    for layer in range(2):
        got_attn = [m.name for m in mm.select(groups=["attn"], layers=[layer])]
        got_mlp = [m.name for m in mm.select(groups=["mlp"], layers=[layer])]
        assert got_attn == [f"{prefix}.{layer}.{rel}" for rel in attn]
        assert got_mlp == [f"{prefix}.{layer}.{rel}" for rel in mlp]


def test_gpt2_c_proj_is_in_both_groups_under_distinct_types():
    config, *_ = ARCHES["gpt2"]
    mm = build_module_map(_model(config))
    assert mm.module_types == ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
    assert mm.group_of_type("attn.c_proj") == "attn"
    assert mm.group_of_type("mlp.c_proj") == "mlp"


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize("target", ["attn", "mlp", "both"])
def test_lora_targeting_counts_per_group(arch, target):
    config, _, attn, mlp = ARCHES[arch]
    model = _model(config)
    mm = build_module_map(model)
    peft_model = apply_lora(model, targets_for(mm, target), r=2, alpha=4, dropout=0.0)
    lora = lora_parameters(peft_model, mm)
    expected = {"attn": len(attn), "mlp": len(mlp), "both": len(attn) + len(mlp)}[target] * 2
    assert len(lora) == expected
    assert {p.module.group for p in lora} == ({"attn", "mlp"} if target == "both" else {target})
    # Exactly the LoRA matrices are trainable: 2 per module, r=2 rows/columns each.
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * expected
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(p.A.shape[0] == 2 and p.B.shape[1] == 2 for p in lora)


def test_unknown_architecture_names_the_flags():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="--attn_modules"):
        build_module_map(model)


def test_explicit_module_names_override_the_table(tiny_llama):
    mm = build_module_map(tiny_llama.model, attn_modules="q_proj,v_proj", mlp_modules="down_proj")
    assert mm.module_types == ("q_proj", "v_proj", "down_proj")
    assert [m.name for m in mm.select(layers=[1])] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


def test_explicit_module_name_that_does_not_exist(tiny_llama):
    with pytest.raises(UserError, match="'nope' is not a linear module in layer 0"):
        build_module_map(tiny_llama.model, attn_modules="nope", mlp_modules="down_proj")
