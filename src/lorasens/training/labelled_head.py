"""The LM head at the labelled positions only: the training and validation loss without the prompt's logits.

A causal LM's forward projects every position onto the vocabulary, but the loss reads only the positions whose next
token is a target. Where the prompt is longer than the target (the quickstart's E2E-style batches: 43% of the
positions are labelled) the rest of the head's matmul, softmax and backward is wasted work, and the head is a fifth
of SmolLM2-135M's work per token (its vocabulary embedding is a fifth of the model). transformers' `logits_to_keep` takes a boolean (batch, sequence) mask and
returns the kept positions' logits flattened; the Trainer takes the loss from its `compute_loss_func`. The loss is
the model's own (summed target cross-entropy over the Trainer's `num_items_in_batch`), so gradient accumulation and
multi-device averaging are unchanged; `decide_labelled_head` checks on one batch that it equals the model's loss.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lorasens.data.features import IGNORE_INDEX
from lorasens.training.decision import SpeedupDecision

logger = logging.getLogger(__name__)

# The probe's two losses differ by float rounding only (the head's matmul over fewer rows, the sum's order).
HEAD_TOLERANCE = 1e-4


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, sequence) bool: the positions whose next token is a target (the last position never is)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


class LabelledHeadCollator:
    """A collator's batches plus `logits_to_keep`: the target mask of their labels."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        batch["logits_to_keep"] = target_mask(batch["labels"])
        return batch


def labelled_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target tokens in the order of the kept logits (row-major over the mask)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def labelled_head_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The Trainer's `compute_loss_func`: summed cross-entropy of the kept logits over `num_items_in_batch` (the
    target count of the whole accumulated batch, as the model's own loss divides), a mean when the Trainer has none."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    targets = labelled_targets(labels).to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum")
    return nll / (num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel()))


@torch.no_grad()
def decide_labelled_head(model: torch.nn.Module, batch: dict) -> SpeedupDecision:
    """On when the model takes a boolean `logits_to_keep` and the probe batch (a training batch, labels included)
    gives the model's own loss through the kept logits; else the full head, with the reason."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()
    try:
        full = float(model(**batch).loss)
        try:
            kept = model(**inputs, logits_to_keep=target_mask(batch["labels"]))
            count = labelled_targets(batch["labels"]).numel()
            logits = kept["logits"] if isinstance(kept, dict) else kept[0]
            if logits.reshape(-1, logits.shape[-1]).shape[0] != count:
                return _off(f"logits_to_keep gave {tuple(logits.shape)} logits for {count} targets")
            head = float(labelled_head_loss(kept, batch["labels"]))
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:  # no (boolean) logits_to_keep
            return _off(f"{type(model).__name__} does not take a boolean logits_to_keep ({type(exc).__name__}: {exc})")
    finally:
        model.train(was_training)
    if abs(full - head) > HEAD_TOLERANCE:
        return _off(f"the probe batch's loss is {full:.6f} but {head:.6f} from the kept logits")
    return SpeedupDecision(True, f"exact: probe batch loss {full:.6f}, {head:.6f} from the labelled positions' logits")


def _off(reason: str) -> SpeedupDecision:
    logger.warning("LM head at every position: %s", reason)
    return SpeedupDecision(False, reason)
