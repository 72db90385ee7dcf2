"""Putting LoRA on the modules of the module map (through PEFT), and the one function that decides trainability."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists

from lorasens.errors import UserError
from lorasens.model.module_map import GROUPS, LoraModule, ModuleMap, build_module_map

# An explicit module map for an architecture the module map does not know: {"attn": [...], "mlp": [...]}.
ModuleMapSpec = ModuleMap | Mapping[str, Sequence[str]] | None

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraParams:
    """The two LoRA matrices of one module: A (r x in) and B (out x r); delta W = scaling * B @ A."""

    module: LoraModule
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scaling: float
    extra: tuple[torch.nn.Parameter, ...] = ()  # AdaLoRA's singular values E (r x 1)

    def tensors(self) -> tuple[torch.nn.Parameter, ...]:
        return (self.A, self.B, *self.extra)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors())


def targets_for(module_map: ModuleMap, target: str) -> tuple[LoraModule, ...]:
    groups = GROUPS if target == "both" else (target,)
    return module_map.select(groups=groups)


# init_lora_weights values a placement may carry: these start from the unchanged base weights. PiSSA, OLoRA, LoftQ
# and CorDA rewrite the base weights, so an adapter scored on the original base would be scored wrongly.
PLACEMENT_INITS = (True, "gaussian", "eva")
# A placement file may carry lorasens' own notes (e.g. how validate built it) under this key; PEFT never sees it.
PLACEMENT_EXTRAS = "lorasens"


@dataclass(frozen=True)
class Placement:
    """LoRA placed by a PEFT config file (`--placement`): exactly `modules`, with the file's ranks and initialisation.

    `config` is the parsed `peft.LoraConfig` (rank_pattern / alpha_pattern, init_lora_weights="eva" with its
    eva_config) or `peft.AdaLoraConfig` (ranks then change during training).
    """

    modules: tuple[LoraModule, ...]
    config: LoraConfig | AdaLoraConfig
    # AdaLoRA's final budget as a total rank over modules (its target_r is a per-module mean: too coarse to match a
    # parameter budget); None: target_r x modules, PEFT's own.
    adalora_target_total_rank: int | None = None
    adalora_target_params: int | None = None  # None: AdaLoRA's budget stays a rank count

    @property
    def method(self) -> str:
        return "adalora" if isinstance(self.config, AdaLoraConfig) else "lora"

    @property
    def eva(self) -> bool:
        return self.method == "lora" and self.config.init_lora_weights == "eva"

    @property
    def r(self) -> int:
        return int(self.config.init_r if self.method == "adalora" else self.config.r)

    @property
    def lora_alpha(self) -> float:
        return float(self.config.lora_alpha)


def read_placement_file(path: str | Path) -> dict:
    """The keyword arguments of `peft.LoraConfig` stored in a JSON file (e.g. a run's recommended_lora_config.json)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--placement {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--placement {str(path)!r} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or "target_modules" not in data:
        raise UserError(f"--placement {str(path)!r} must hold peft.LoraConfig arguments with target_modules")
    return data


def load_placement(path: str | Path, model: torch.nn.Module, module_map: ModuleMap) -> Placement:
    """Resolve a placement file against the model with PEFT's own matcher (target_modules, layers_to_transform).

    Every module it selects must be in the module map (the modules lorasens trains and analyses); a file that
    selects nothing, or something else (e.g. lm_head), is an error rather than a silently different placement.
    """
    data = read_placement_file(path)
    extras = data.pop(PLACEMENT_EXTRAS, None) or {}
    config = _peft_config(path, data)
    known = module_map.by_name()
    selected, foreign = [], []
    for name, _ in model.named_modules():
        if name and check_target_module_exists(config, name):
            (selected if name in known else foreign).append(name)
    if foreign:
        raise UserError(f"--placement {str(path)!r} selects module(s) outside the module map: {', '.join(foreign[:5])}")
    if not selected:
        raise UserError(f"--placement {str(path)!r} selects no module of this model")
    chosen = set(selected)
    extras = extras if isinstance(extras, dict) else {}
    total_rank, params = extras.get("adalora_target_total_rank"), extras.get("adalora_target_params")
    return Placement(tuple(m for m in module_map.modules if m.name in chosen), config,
                     None if total_rank is None else int(total_rank), None if params is None else int(params))


def _peft_config(path: str | Path, data: dict) -> LoraConfig | AdaLoraConfig:
    """The PEFT config of a placement file: LoRA (the default peft_type) or AdaLoRA, nothing else."""
    kind = str(data.pop("peft_type", "LORA")).upper()
    data.pop("task_type", None)
    if kind not in ("LORA", "ADALORA"):
        raise UserError(f"--placement {str(path)!r}: peft_type {kind!r} is not supported; valid: LORA, ADALORA")
    init = data.get("init_lora_weights", True)
    if kind == "LORA" and init not in PLACEMENT_INITS:
        raise UserError(f"--placement {str(path)!r}: init_lora_weights {init!r} rewrites the base weights or is "
                        f"unknown; valid: {', '.join(map(str, PLACEMENT_INITS))}")
    if kind == "LORA" and isinstance(data.get("eva_config"), dict):
        from peft import EvaConfig

        data["eva_config"] = EvaConfig(**data["eva_config"])
    try:
        return (LoraConfig if kind == "LORA" else AdaLoraConfig)(task_type="CAUSAL_LM", **data)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--placement {str(path)!r}: not a valid peft {kind} config ({exc})") from None


def apply_placement(model: torch.nn.Module, placement: Placement, dropout: float) -> PeftModel:
    """Wrap `model` with PEFT on exactly the placement's modules, with the file's ranks, alpha and initialisation.

    The placement's regexes are replaced by the resolved full paths (GPT-2's attn/mlp c_proj stay distinct); EVA's
    weights are only allocated here (`low_cpu_mem_usage`): `peft_methods.initialize_eva` fills them from data.
    """
    config = copy.deepcopy(placement.config)
    config.target_modules = [m.name for m in placement.modules]
    config.layers_to_transform = None
    config.layers_pattern = None
    config.lora_dropout = dropout
    config.fan_in_fan_out = getattr(getattr(model, "config", None), "model_type", "") == "gpt2"
    return get_peft_model(model, config, low_cpu_mem_usage=placement.eva)


def apply_lora(
    model: torch.nn.Module, modules: Iterable[LoraModule], r: int, alpha: float, dropout: float,
    rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
) -> PeftModel:
    """Wrap `model` with PEFT LoRA on exactly `modules` (full paths, so GPT-2's attn/mlp c_proj stay distinct).

    `rank_pattern` / `alpha_pattern` give some modules another rank / alpha than `r` / `alpha` (PEFT's semantics).
    """
    names = [m.name for m in modules]
    fan_in_fan_out = getattr(getattr(model, "config", None), "model_type", "") == "gpt2"  # Conv1D weights
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
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
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        if isinstance(A, torch.nn.Parameter):  # AdaLoRA: A, B and E are parameters, not Linear layers
            result.append(LoraParams(m, A, B, float(layer.scaling[adapter]), (layer.lora_E[adapter],)))
        else:
            result.append(LoraParams(m, A.weight, B.weight, float(layer.scaling[adapter])))
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
        for param in p.tensors():
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


def lora_of_model(model: torch.nn.Module, module_map: ModuleMapSpec = None,
                  who: str = "lorasens") -> tuple[ModuleMap, list[LoraParams]]:
    """The module map and the LoRA modules of a PEFT model someone else built (a user's training script).

    `module_map` is a ModuleMap, or {"attn": names, "mlp": names} for an architecture the map does not know, or None
    (from the base model's `config.model_type`). Raises `UserError` naming the problem when the model has no LoRA.
    """
    if not isinstance(model, PeftModel):
        raise UserError(f"{who}: the model is a {type(model).__name__}, not a PEFT model with LoRA; wrap it with "
                        "peft.get_peft_model(model, LoraConfig(...)) (or give SFTTrainer a peft_config)")
    if isinstance(module_map, ModuleMap):
        mm = module_map
    else:
        spec = dict(module_map or {})
        unknown = set(spec) - set(GROUPS)
        if unknown:
            raise UserError(f"{who}: module_map keys must be {' and '.join(GROUPS)}, got {sorted(unknown)}")
        names = {g: ",".join(spec[g]) if spec.get(g) else None for g in GROUPS}
        mm = build_module_map(model.get_base_model(), names["attn"], names["mlp"])
    lora = lora_parameters(model, mm, model.active_adapter)
    if not lora:
        raise UserError(f"{who}: the PEFT model has no LoRA on any attention or MLP module of its {mm.architecture!r} "
                        f"module map (LoRA targets: {sorted(model.peft_config[model.active_adapter].target_modules or [])})")
    return mm, lora


def lora_target(lora: Sequence[LoraParams]) -> str:
    """The LoRA target of a set of modules as `--target` names it: attn, mlp or both."""
    groups = {lp.module.group for lp in lora}
    return "both" if groups == set(GROUPS) else next(iter(groups))
