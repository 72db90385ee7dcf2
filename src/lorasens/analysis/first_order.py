"""The first-order ablation estimate: the linear prediction of the loss change when a module's LoRA is removed.

With delta W = s * B A (s = alpha / r) the module computes y = (W0 + delta W) x, and the gradient of the loss with
respect to B is s * G A^T, where G = dL/dW is the gradient with respect to the effective weight. Hence

    <B, dL/dB> = s * trace(B^T G A^T) = <G, s * B A> = <dL/dW, delta W>,

the directional derivative of the loss along the adapter's update. Removing the update (W -> W - delta W) changes
the loss by -<dL/dW, delta W> to first order, so the estimate of the ablation's delta_loss is -<B, dL/dB>. One
backward over the analysis examples gives it for every module at once, without forming any out x in matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorasens.analysis.ablation import EvalBatch, _final_norm, _lm_logits, _scored
from lorasens.data.features import IGNORE_INDEX
from lorasens.model.lora import LoraParams


def first_order_estimates(model: torch.nn.Module, lora: Sequence[LoraParams],
                          batches: Sequence[EvalBatch]) -> list[float]:
    """-<B, dL/dB> per module (input order), L = the token-weighted mean cross-entropy over all target tokens.

    `batches` are the ablation's `EvalBatch`es (padded or packed). The model runs in eval
    mode (no dropout, as the ablation); `requires_grad` and the train/eval mode are restored afterwards.
    The LM head (hidden x vocabulary: as costly as the decoder on a small model) runs only at the labelled
    positions, as in the ablation; a model without a recognisable final norm gets the plain forward.
    """
    if not lora:
        return []
    tokens = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    if tokens == 0:
        raise ValueError("the analysis examples have no target tokens")
    bs = [lp.B for lp in lora]
    flags = [b.requires_grad for b in bs]
    was_training = model.training
    grads = [torch.zeros_like(b, dtype=torch.float64) for b in bs]
    model.eval()
    try:
        for b in bs:
            b.requires_grad_(True)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        shortcut = _final_norm(base) is not None
        for batch in batches:
            if shortcut:
                scored, targets, _ = _scored(batch)
                hidden = base.get_decoder()(**batch.inputs, use_cache=False).last_hidden_state
                nll = F.cross_entropy(_lm_logits(base, hidden[:, :-1][scored]).float(), targets, reduction="sum")
            else:
                logits = model(**batch.inputs, use_cache=False).logits[:, :-1]  # a cache turns off the packed mask
                labels = batch.labels[:, 1:]
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="sum")
            for acc, g in zip(grads, torch.autograd.grad(nll / tokens, bs, allow_unused=True)):
                if g is not None:
                    acc += g.double()
    finally:
        for b, flag in zip(bs, flags):
            b.requires_grad_(flag)
        model.train(was_training)
    return [-float((b.detach().double() * g).sum()) for b, g in zip(bs, grads)]
