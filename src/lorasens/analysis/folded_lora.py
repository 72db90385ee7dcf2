"""Decoder layers run with their LoRA folded into the base weights, for the ablation's replayed layers.

A replayed layer with PEFT's LoRA branch computes, per module, `W x + scaling * B (A x)`: two thin matmuls and two
elementwise passes over the output beside the base matmul, a third of the layer's time on SmolLM2 at r=8. Folded,
the module computes `(W + scaling * B A) x` in one matmul (for a module switched off: `W x`, no branch at all). The
two differ by float rounding only (fp32: ~1e-7 relative), so folding is used only where that holds: float32 weights
(bf16 would round most of a small delta away), plain `lora.Linear` layers over `nn.Linear` (no DoRA, AdaLoRA,
quantized base or LoRA bias), one adapter, not merged. The ablation's exactness probe then checks the folded replay
against a plain forward like any other.

Nothing is changed outside the `with` block: the base weight parameter and the adapter switch are put back exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from lorasens.model.lora import PEFT_PREFIX, LoraParams

ADAPTER = "default"
# Folded weights are kept across layer runs and batches up to this many bytes (beyond: folded at each run).
CACHE_BYTES = 1 << 30


def folding_problem(model: torch.nn.Module, lora: Sequence[LoraParams]) -> str | None:
    """Why the LoRA of `lora` cannot be folded exactly (None: it can)."""
    for lp in lora:
        layer = model.get_submodule(PEFT_PREFIX + lp.module.name)
        if type(layer) is not LoraLinear or type(layer.base_layer) is not torch.nn.Linear:
            return f"{lp.module.name} is a {type(layer).__name__} over a {type(layer.base_layer).__name__}"
        if layer.base_layer.weight.dtype != torch.float32:
            return f"{lp.module.name} has {layer.base_layer.weight.dtype} weights (folding rounds away small deltas)"
        if (list(layer.lora_A) != [ADAPTER] or layer.merged or layer.disable_adapters
                or layer.use_dora.get(ADAPTER) or layer.lora_bias.get(ADAPTER)):
            return f"{lp.module.name} is merged, disabled, DoRA, biased or has adapters other than {ADAPTER!r}"
    return None


class FoldedLora:
    """Runs layer i with its LoRA folded: `with folded.layer(i, off_names): layer(...)`."""

    def __init__(self, model: torch.nn.Module, lora: Sequence[LoraParams]):
        self.modules: dict[int, list[tuple[str, LoraLinear]]] = {}
        for lp in lora:
            self.modules.setdefault(lp.module.layer, []).append(
                (lp.module.name, model.get_submodule(PEFT_PREFIX + lp.module.name)))
        self._folded: dict[str, torch.Tensor] = {}  # module name -> W + scaling * B A, while within CACHE_BYTES
        self._cached_bytes = 0

    def _folded_weight(self, name: str, lin: LoraLinear) -> torch.Tensor:
        """W + scaling * B A of one module; it does not depend on which other modules are off, so it is kept."""
        weight = self._folded.get(name)
        if weight is None:
            weight = lin.base_layer.weight + lin.get_delta_weight(ADAPTER)
            size = weight.numel() * weight.element_size()
            if self._cached_bytes + size <= CACHE_BYTES:
                self._folded[name] = weight
                self._cached_bytes += size
        return weight

    def _weights(self, index: int, off: tuple[str, ...]) -> list[torch.Tensor]:
        """The weight each module of layer `index` computes with: W (off) or W + scaling * B A (on)."""
        return [lin.base_layer.weight if name in off else self._folded_weight(name, lin)
                for name, lin in self.modules.get(index, [])]

    @contextmanager
    def layer(self, index: int, off: tuple[str, ...] = ()) -> Iterator[None]:
        """Within the block, layer `index` computes with folded weights and no LoRA branch; `off`: module names
        whose LoRA is left out."""
        saved = []
        try:
            for (_, lin), weight in zip(self.modules.get(index, []), self._weights(index, off)):
                saved.append((lin, lin.base_layer.weight))
                lin.base_layer.weight = torch.nn.Parameter(weight, requires_grad=False)
                lin._disable_adapters = True
            yield
        finally:
            for lin, weight in saved:
                lin.base_layer.weight = weight
                lin._disable_adapters = False
