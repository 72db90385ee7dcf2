"""--quantize 4bit (QLoRA): NF4 base layers from bitsandbytes' CPU backend, LoRA gradients and every run file."""

from __future__ import annotations

import csv
import math

import pytest
import torch

pytest.importorskip("bitsandbytes")  # an optional extra (lorasens[qlora]); installed in the tested environment

from lorasens.config import build_config  # noqa: E402
from lorasens.model.loading import build_tiny_random_llama  # noqa: E402
from lorasens.model.lora import apply_lora, lora_parameters, targets_for  # noqa: E402
from lorasens.model.module_map import build_module_map  # noqa: E402
from lorasens.model.quantize import dequantized_weight, prepare_for_kbit_training, quantize_4bit  # noqa: E402
from lorasens.rundir import files  # noqa: E402


def quantized_peft():
    torch.manual_seed(0)
    model = build_tiny_random_llama().model
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert quantize_4bit(model, torch.float32) == 4 * 7  # 4 layers x 7 linear modules; lm_head stays
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    module_map = build_module_map(model, None, None)
    peft = apply_lora(model, targets_for(module_map, "both"), 4, 8.0, 0.0)
    lora = lora_parameters(peft, module_map)
    for lp in lora:
        torch.nn.init.normal_(lp.B, std=0.02)
    return peft, lora, original


def lora_grads(peft, lora, ids):
    peft.zero_grad()
    peft(input_ids=ids, labels=ids).loss.backward()
    return torch.stack([lp.A.grad.norm() for lp in lora] + [lp.B.grad.norm() for lp in lora])


def test_nf4_layers_dequantize_close_and_train_the_same_after_an_eval_pass():
    peft, lora, original = quantized_peft()
    q_proj = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    assert type(peft.base_model.model.lm_head) is torch.nn.Linear
    # NF4 keeps 4 bits per weight: the dequantized weight is near, not equal to, the original.
    error = ((dequantized_weight(q_proj) - original).norm() / original.norm()).item()
    assert 0.01 < error < 0.15
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    before = lora_grads(peft, lora, ids)
    assert torch.isfinite(before).all() and (before > 0).all()
    # A no-grad eval pass (validation loss) must not switch the layers to bitsandbytes' CPU inference layout,
    # whose training gradients are wrong (3-6x too small, measured): the gradients stay identical.
    peft.eval()
    with torch.no_grad():
        peft(input_ids=ids)
    peft.train()
    assert torch.equal(lora_grads(peft, lora, ids), before)


@pytest.mark.slow
def test_train_quantize_4bit_writes_all_files_with_nonzero_norms(tmp_path):
    from lorasens.experiment.run import run_experiment

    cfg = build_config(cli_overrides={
        "model": "tiny-random-llama", "dataset": "synthetic", "quantize": "4bit", "max_steps": 4, "batch_size": 2,
        "train_samples": 16, "eval_samples": 8, "analysis_samples": 8, "eval_steps": 2, "max_length": 256,
        "evaluate": False, "output_dir": str(tmp_path), "experiment_name": "q4", "seed": 0})
    summary = run_experiment(cfg).summary
    run_dir = tmp_path / "q4"
    for name in (files.MODULE_NORMS, files.GROUP_NORMS, files.IMPORTANCE, files.UPDATE_MAGNITUDE, "summary.json",
                 "sensitivity.json", "sensitivity_ablation.csv", "recommended_lora_config.json", "report.html"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "final_model" / "adapter_model.safetensors").exists()
    rows = list(csv.DictReader((run_dir / files.MODULE_NORMS).open()))
    assert len(rows) == 4 * 28 * 2  # every step, module and matrix
    # At step 1 B = 0 (PEFT's init), so A's gradient is exactly 0 there; from step 2 on every norm is positive.
    assert all(float(r["grad_norm"]) == 0 for r in rows if r["step"] == "1" and r["matrix"] == "A")
    later = [float(r["grad_norm"]) for r in rows if r["step"] != "1" or r["matrix"] == "B"]
    assert all(math.isfinite(v) and v > 0 for v in later)
    updates = [float(r["delta_w_norm"]) for r in csv.DictReader((run_dir / files.UPDATE_MAGNITUDE).open())]
    assert all(math.isfinite(v) for v in updates) and max(updates) > 0
    assert math.isfinite(summary["final_train_loss"])
