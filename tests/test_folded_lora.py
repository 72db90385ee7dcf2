"""Folded LoRA for the ablation's replayed layers: same outputs to fp32 rounding, nothing changed afterwards, and
refused where folding would not be exact."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from lorasens.analysis.ablation import lora_switched_off
from lorasens.analysis.folded_lora import FoldedLora, folding_problem
from lorasens.model.loading import build_tiny_random_llama
from lorasens.model.lora import apply_lora, lora_parameters
from lorasens.model.module_map import build_module_map


def trained(dtype=torch.float32, dora=False):
    model = build_tiny_random_llama(seed=3).model.to(dtype)
    module_map = build_module_map(model)
    torch.manual_seed(3)
    if dora:
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                target_modules=[m.name for m in module_map.modules]))
    else:
        peft = apply_lora(model, module_map.modules, 4, 8.0, 0.0)
    lora = lora_parameters(peft, module_map)
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.3)
    return peft.eval(), module_map, lora


def test_a_folded_layer_computes_what_the_lora_branch_computes_and_leaves_the_model_as_it_was():
    model, module_map, lora = trained()
    layer = model.get_base_model().get_submodule(module_map.layers_path)[1]
    hidden = torch.randn(2, 9, 64)
    positions = model.get_base_model().model.rotary_emb(hidden, torch.arange(9)[None].expand(2, -1))
    weights_before = {n: p for n, p in model.named_parameters()}
    off = tuple(sorted(lp.module.name for lp in lora if lp.module.layer == 1 and lp.module.module_type in ("v_proj", "up_proj")))
    assert len(off) == 2
    with torch.no_grad():
        branch_on = layer(hidden, position_embeddings=positions)[0]
        with lora_switched_off(model, [lp.module for lp in lora if lp.module.name in off]):
            branch_off = layer(hidden, position_embeddings=positions)[0]
        folded = FoldedLora(model, lora)
        with folded.layer(1):
            folded_on = layer(hidden, position_embeddings=positions)[0]
        with folded.layer(1, off):
            folded_off = layer(hidden, position_embeddings=positions)[0]
        with folded.layer(1):  # the folded weights come from the cache the second time
            folded_on_again = layer(hidden, position_embeddings=positions)[0]
        after = layer(hidden, position_embeddings=positions)[0]
    assert torch.allclose(folded_on, branch_on, rtol=1e-5, atol=1e-5)
    assert torch.allclose(folded_off, branch_off, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded_on_again, folded_on) and len(folded._folded) == 7
    assert (folded_off - folded_on).abs().max() > 1e-2  # switching off changes the output
    # Nothing stays folded: the same parameter objects, the branch on again, the same output bit for bit.
    assert {n: p for n, p in model.named_parameters()} == weights_before
    assert all(p is weights_before[n] for n, p in model.named_parameters())
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))
    assert torch.equal(after, branch_on)


def test_folding_is_refused_where_it_would_not_be_exact():
    model, _, lora = trained()
    assert folding_problem(model, lora) is None
    bf16, _, bf16_lora = trained(torch.bfloat16)
    assert "bfloat16 weights" in folding_problem(bf16, bf16_lora)
    dora, _, dora_lora = trained(dora=True)
    assert "DoRA" in folding_problem(dora, dora_lora)
