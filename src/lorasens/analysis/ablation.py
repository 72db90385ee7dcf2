"""Ablation: validation loss with LoRA modules switched off, set by set (groups, layers, module types, singles).

A module is switched off by setting its PEFT scaling to 0 for the adapter: PEFT then adds `lora_B(lora_A(x)) * 0`,
which is exactly 0 for finite activations, so the layer computes its base output bit for bit. The exact scaling
values are restored afterwards (also on error). Nothing is merged or copied, so an ablation costs one validation
pass. The validation batches are built once and reused, so every ablation sees the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorasens.data.features import IGNORE_INDEX
from lorasens.lora import PEFT_PREFIX, LoraParams
from lorasens.module_map import GROUPS, LoraModule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblationRow:
    kind: str  # all | group | layer | module_type | module
    name: str
    layer: int | None
    group: str | None
    module: str | None
    num_modules: int  # how many modules were switched off
    loss: float
    delta_loss: float  # loss - loss with everything on

    def values(self) -> tuple:
        return (self.kind, self.name, self.layer, self.group, self.module, self.num_modules, self.loss, self.delta_loss)


@contextmanager
def lora_switched_off(model: torch.nn.Module, modules: Iterable[LoraModule], adapter: str = "default") -> Iterator[None]:
    """Within the block, the LoRA of `modules` contributes nothing; the previous scalings are restored exactly."""
    saved = []
    try:
        for m in modules:
            layer = model.get_submodule(PEFT_PREFIX + m.name)
            if getattr(layer, "merged", False):
                raise RuntimeError(f"{m.name}: LoRA is merged into the base weight; unmerge it before ablating")
            saved.append((layer, layer.scaling[adapter]))
            layer.scaling[adapter] = 0.0
        yield
    finally:
        for layer, scaling in saved:
            layer.scaling[adapter] = scaling


def validation_batches(features: Sequence[dict], batch_size: int, pad_token_id: int, device) -> list[dict]:
    """Right-padded batches of similar lengths (sorted, so little padding); labels padded with IGNORE_INDEX."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        width = max(len(f["input_ids"]) for f in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(chunk):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(f["labels"])
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return batches


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    """Mean next-token cross-entropy over all label tokens of all batches (token-weighted, like training)."""
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings()
        for batch in batches:
            labels = batch["labels"][:, 1:]
            scored = labels != IGNORE_INDEX
            if decoder is not None and head is not None:
                # The LM head (hidden x vocab, 49k columns on SmolLM2) costs as much as the whole decoder: apply it
                # only at the positions that have a label (the answer), not at every prompt token.
                hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                logits = head(hidden[:, :-1][scored])
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][scored]
            nll = F.cross_entropy(logits.float(), labels[scored], reduction="sum")
            total += nll.double().cpu()
            tokens += int(scored.sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the validation set has no label tokens")
    return float(total / tokens)


def ablation_sets(lora: Sequence[LoraParams], singles: Sequence[LoraModule]) -> list[tuple[str, str, dict, tuple[LoraModule, ...]]]:
    """(kind, name, columns, modules switched off) for every ablation, in the order they are run."""
    modules = tuple(lp.module for lp in lora)
    sets: list[tuple[str, str, dict, tuple[LoraModule, ...]]] = [
        ("all", "all_on", {}, ()),
        ("all", "all_off", {}, modules),
    ]
    for g in GROUPS:
        chosen = tuple(m for m in modules if m.group == g)
        if chosen:
            sets.append(("group", g, {"group": g}, chosen))
    for layer in sorted({m.layer for m in modules}):
        sets.append(("layer", f"L{layer}", {"layer": layer}, tuple(m for m in modules if m.layer == layer)))
    for module_type in dict.fromkeys(m.module_type for m in modules):
        chosen = tuple(m for m in modules if m.module_type == module_type)
        sets.append(("module_type", module_type, {"group": chosen[0].group, "module": module_type}, chosen))
    for m in singles:
        columns = {"layer": m.layer, "group": m.group, "module": m.module_type}
        sets.append(("module", f"L{m.layer}.{m.module_type}", columns, (m,)))
    return sets


def run_ablation(model: torch.nn.Module, lora: Sequence[LoraParams], batches: Sequence[dict],
                 singles: Sequence[LoraModule]) -> list[AblationRow]:
    """Validation loss for every ablation set; `singles` are the (layer, module) pairs ablated one by one."""
    sets = ablation_sets(lora, singles)
    logger.info("ablation: %d validation passes over %d batches", len(sets), len(batches))
    rows: list[AblationRow] = []
    reference = None
    for kind, name, columns, off in sets:
        with lora_switched_off(model, off):
            loss = validation_loss(model, batches)
        if reference is None:
            reference = loss  # the first set switches nothing off
        rows.append(AblationRow(kind, name, columns.get("layer"), columns.get("group"), columns.get("module"),
                                len(off), loss, loss - reference))
    return rows
