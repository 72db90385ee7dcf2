"""PEFT's data-driven LoRA methods on lorasens' training path: EVA initialisation and AdaLoRA's rank allocation.

Both need something from the training loop that a LoraConfig alone does not give: EVA needs a pass over training
batches before the first step (an incremental SVD of each module's inputs), AdaLoRA needs `update_and_allocate`
after every optimizer step (without it AdaLoRA silently trains at its initial rank).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights
from transformers import TrainerCallback

from lorasens.training.trainer import padded_collator

logger = logging.getLogger(__name__)

EVA_BATCHES = 64  # upper bound; EVA stops earlier once every module's components have converged (tau)


def eva_batches(features: list[dict], tokenizer, batch_size: int, max_batches: int = EVA_BATCHES) -> list[dict]:
    """Padded batches of the first training examples, in order, as EVA's forward pass takes them (dicts of tensors
    with `labels`, so its label mask leaves prompt and padding positions out of the SVD)."""
    collate = padded_collator(tokenizer)
    batches = []
    for start in range(0, min(len(features), batch_size * max_batches), batch_size):
        batch = collate([dict(f) for f in features[start:start + batch_size]])
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
    return batches


def initialize_eva(model: PeftModel, dataloader: Iterable[dict], adapter: str = "default") -> None:
    """EVA: each LoRA A starts as the top right-singular vectors of its module's inputs on `dataloader`'s batches
    (PEFT's `initialize_lora_eva_weights`; with rho > 1 PEFT also moves rank between modules, keeping the total rank).
    Call it after `get_peft_model` with a config whose init_lora_weights is "eva", before training; the batches are
    dicts of tensors as the model takes them (with `labels`, prompt and padding positions stay out of the SVD).

    With rho = 1 (no redistribution) every module keeps the rank its config gives it. PEFT does not quite: modules
    that share an input (q/k/v, gate/up) get one SVD and, even at rho = 1, ranks traded among them by explained
    variance, so a per-module rank profile would change shape and parameter count. Here the components are computed
    at the profile's largest rank for every module, and each module takes its own rank's leading components."""
    config = model.peft_config[adapter]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if config.eva_config is not None and config.eva_config.rho == 1:
            ranks = {name: module.r[adapter] for name, module in model.named_modules()
                     if isinstance(module, LoraLayer) and adapter in module.r}
            widest = dataclasses.replace(config, r=max(ranks.values()), rank_pattern={}, alpha_pattern={})
            state = get_eva_state_dict(model, dataloader, peft_config=widest, adapter_name=adapter,
                                       show_progress_bar=False)
            initialize_lora_eva_weights(model, eva_state_dict={name: w[: ranks[name]] for name, w in state.items()
                                                               if name in ranks}, adapter_name=adapter)
        else:
            initialize_lora_eva_weights(model, dataloader, adapter_name=adapter, show_progress_bar=False)
    model.train(was_training)


def initialize_eva_from_features(model: PeftModel, features: list[dict], tokenizer, batch_size: int,
                                 adapter: str = "default") -> None:
    """`initialize_eva` on the first training examples (lorasens' training path)."""
    batches = eva_batches(features, tokenizer, batch_size)
    initialize_eva(model, batches, adapter)
    logger.info("EVA initialisation from %d training batches of %d", len(batches), batch_size)


def kept_ranks(model: PeftModel, adapter: str = "default") -> dict[str, int]:
    """AdaLoRA: module path -> number of singular values not pruned (nonzero entries of lora_E)."""
    ranks = {}
    for name, module in model.named_modules():
        E = getattr(module, "lora_E", None)
        if E is not None and adapter in E:
            ranks[name.removeprefix("base_model.model.")] = int((E[adapter] != 0).sum())
    return ranks


def adalora_effective_params(model: PeftModel, adapter: str = "default") -> int:
    """LoRA parameters AdaLoRA keeps: per module, kept rank x (in + out + 1) (a row of A, a column of B, one E)."""
    total = 0
    for module in model.modules():
        E = getattr(module, "lora_E", None)
        if E is not None and adapter in E:
            kept = int((E[adapter] != 0).sum())
            total += kept * (module.lora_A[adapter].shape[1] + module.lora_B[adapter].shape[0] + 1)
    return total


class AdaLoraAllocationCallback(TrainerCallback):
    """Calls AdaLoRA's `update_and_allocate` after every optimizer step (before gradients are zeroed), as PEFT's
    documentation asks of a custom loop; `target_total_rank` sets the final budget in ranks summed over modules
    (AdaLoRA's own `target_r` is a per-module mean, too coarse to match a parameter budget). With `target_params`
    the budget is in parameters: after each reallocation the rank budget becomes target_params / (mean width of
    the ranks kept), so the final adapter holds the parameters whichever modules keep their ranks (AdaLoRA's
    importance scores still decide which). Records the kept total rank at every step in `history`."""

    def __init__(self, model: PeftModel, target_total_rank: int | None = None, target_params: int | None = None):
        self.model = model
        self.target_total_rank = target_total_rank
        self.target_params = target_params
        self.history: list[tuple[int, int]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        allocator = self.model.base_model.rankallocator
        if self.target_total_rank is not None:
            allocator.target_bgt = int(self.target_total_rank)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # on_optimizer_step runs after optimizer.step() and before zero_grad: the gradients AdaLoRA's importance
        # score needs are still there. state.global_step is the step about to finish.
        self.model.base_model.update_and_allocate(state.global_step + 1)
        kept = sum(kept_ranks(self.model).values())
        self.history.append((state.global_step + 1, kept))
        if self.target_params is not None and kept:
            mean_width = adalora_effective_params(self.model) / kept
            self.model.base_model.rankallocator.target_bgt = max(1, round(self.target_params / mean_width))
