"""The module map: for each decoder layer, which linear modules form the attention group and which the MLP group.

This is the single source of truth for LoRA targeting, phase switching and gradient analysis: nothing else in
lorasens decides by looking at a module name. Names are matched by their path *inside a layer* (e.g. GPT-2's
`attn.c_proj` vs `mlp.c_proj`), never by a bare suffix, so a name that occurs in both groups is still unambiguous.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lorasens.errors import UserError

Group = Literal["attn", "mlp"]
GROUPS: tuple[Group, ...] = ("attn", "mlp")

_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

# model_type -> (attention modules, MLP modules), as paths relative to one decoder layer.
ARCHITECTURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": (("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": (("attention.query_key_value", "attention.dense"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    "opt": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), ("fc1", "fc2")),
    "phi": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"), ("mlp.fc1", "mlp.fc2")),
}


@dataclass(frozen=True, order=True)
class LoraModule:
    """One linear module that can carry LoRA."""

    layer: int
    group: Group
    module_type: str  # short, unique within a layer: "q_proj", or "attn.c_proj" where the last part repeats
    name: str  # full path in the base model, e.g. "model.layers.3.self_attn.q_proj"


@dataclass(frozen=True)
class ModuleMap:
    architecture: str
    layers_path: str  # e.g. "model.layers"
    num_layers: int
    modules: tuple[LoraModule, ...]

    @property
    def module_types(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for m in self.modules:
            seen.setdefault(m.module_type, None)
        return tuple(seen)

    def group_of_type(self, module_type: str) -> Group:
        return next(m.group for m in self.modules if m.module_type == module_type)

    def select(
        self,
        groups: Iterable[Group] | None = None,
        layers: Iterable[int] | None = None,
        module_types: Iterable[str] | None = None,
    ) -> tuple[LoraModule, ...]:
        """Modules in the given groups AND layers AND types (None = no restriction), in map order."""
        groups = set(groups) if groups is not None else None
        layers = set(layers) if layers is not None else None
        types = set(module_types) if module_types is not None else None
        return tuple(
            m
            for m in self.modules
            if (groups is None or m.group in groups)
            and (layers is None or m.layer in layers)
            and (types is None or m.module_type in types)
        )

    def by_name(self) -> dict[str, LoraModule]:
        return {m.name: m for m in self.modules}


def _find_layers(model: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the longest ModuleList (matching num_hidden_layers when known)."""
    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    if num_layers is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == num_layers] or candidates
    if not candidates:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(candidates, key=lambda nm: (len(nm[1]), -nm[0].count(".")))


def _split(spec: str | None) -> tuple[str, ...] | None:
    if spec is None:
        return None
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    return names or None


def build_module_map(model: nn.Module, attn_modules: str | None = None, mlp_modules: str | None = None) -> ModuleMap:
    """Build the map for `model` from its `config.model_type`, or from explicit comma lists of module names."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    num_layers = getattr(config, "num_hidden_layers", None)
    explicit = (_split(attn_modules), _split(mlp_modules))
    if any(explicit):
        if not all(explicit):
            raise UserError("--attn_modules and --mlp_modules must be given together")
        attn, mlp = explicit
    elif model_type in ARCHITECTURES:
        attn, mlp = ARCHITECTURES[model_type]
    else:
        raise UserError(
            f"unknown architecture {model_type!r} (known: {', '.join(sorted(ARCHITECTURES))}); name its linear "
            "modules explicitly, e.g. --attn_modules q_proj,k_proj,v_proj,o_proj --mlp_modules gate_proj,up_proj,down_proj"
        )
    layers_path, layer_list = _find_layers(model, num_layers)
    wanted = [(name, "attn") for name in attn] + [(name, "mlp") for name in mlp]
    last_parts = [name.split(".")[-1] for name, _ in wanted]
    modules: list[LoraModule] = []
    for index, layer in enumerate(layer_list):
        linear = {rel: mod for rel, mod in layer.named_modules() if rel and _is_linear(mod) and not _inside_adapter(rel)}
        for (name, group), last in zip(wanted, last_parts):
            matches = [rel for rel in linear if rel == name or rel.endswith("." + name)]
            if len(matches) != 1:
                found = ", ".join(sorted(linear)) or "none"
                problem = "is not a linear module" if not matches else f"matches several modules {matches}"
                raise UserError(
                    f"module {name!r} {problem} in layer {index} of {model_type!r}; its linear modules: {found}"
                )
            short = last if last_parts.count(last) == 1 else name
            modules.append(LoraModule(index, group, short, f"{layers_path}.{index}.{matches[0]}"))
    return ModuleMap(model_type, layers_path, len(layer_list), tuple(modules))


def _is_linear(module: nn.Module) -> bool:
    # A module PEFT has already wrapped (LoRA in a user's training script) counts as the linear layer it wraps.
    module = getattr(module, "base_layer", module)
    # transformers' GPT-2 uses Conv1D (a transposed linear layer); PEFT supports it as well.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _inside_adapter(rel: str) -> bool:
    """A path inside a PEFT-wrapped layer (its base_layer, lora_A/lora_B...): part of that layer, not a module."""
    return any(part == "base_layer" or part.startswith("lora_") for part in rel.split("."))
