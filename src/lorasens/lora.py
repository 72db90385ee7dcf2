"""Putting LoRA on the modules of the module map (through PEFT), and the one function that decides trainability."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorasens.module_map import GROUPS, LoraModule, ModuleMap

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraParams:
    """The two LoRA matrices of one module: A (r x in) and B (out x r); delta W = scaling * B @ A."""

    module: LoraModule
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scaling: float


def targets_for(module_map: ModuleMap, target: str) -> tuple[LoraModule, ...]:
    groups = GROUPS if target == "both" else (target,)
    return module_map.select(groups=groups)


def apply_lora(
    model: torch.nn.Module, modules: Iterable[LoraModule], r: int, alpha: float, dropout: float
) -> PeftModel:
    """Wrap `model` with PEFT LoRA on exactly `modules` (full paths, so GPT-2's attn/mlp c_proj stay distinct)."""
    names = [m.name for m in modules]
    fan_in_fan_out = getattr(getattr(model, "config", None), "model_type", "") == "gpt2"  # Conv1D weights
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_parameters(peft_model: PeftModel, module_map: ModuleMap, adapter: str = "default") -> list[LoraParams]:
    """LoRA parameters per module, in module-map order (modules without LoRA are left out)."""
    result = []
    for m in module_map.modules:
        try:
            layer = peft_model.get_submodule(PEFT_PREFIX + m.name)
        except AttributeError:
            continue
        if not hasattr(layer, "lora_A") or adapter not in layer.lora_A:
            continue
        result.append(
            LoraParams(m, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]))
        )
    return result


def set_trainable(peft_model: torch.nn.Module, lora: list[LoraParams], active: Iterable[LoraModule]) -> int:
    """THE function that decides what trains: exactly the LoRA matrices of `active` modules require grad.

    Everything else (base weights, other LoRA modules) is frozen, and a frozen parameter's `.grad` is set to
    None so that AdamW skips it entirely (no weight decay, no momentum step) while it is frozen.
    Returns the number of trainable parameters.
    """
    active = set(active)
    trainable = 0
    lora_ids = set()
    for p in lora:
        on = p.module in active
        for param in (p.A, p.B):
            lora_ids.add(id(param))
            param.requires_grad_(on)
            if not on:
                param.grad = None
            else:
                trainable += param.numel()
    for param in peft_model.parameters():
        if id(param) not in lora_ids and param.requires_grad:
            param.requires_grad_(False)
            param.grad = None
    return trainable
