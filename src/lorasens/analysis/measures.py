"""The tensor maths of the analysis, on the device, in a few fused kernels and without host synchronisation.

Every function returns one float32 tensor on the device of the first input (one value per input, in input
order), so that a caller can concatenate everything it measured in a step and move it to the host once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from lorasens.model.lora import LoraParams
from lorasens.model.tensors import accumulation_dtype, foreach_norms, groups_by, in_input_order

__all__ = ["foreach_norms", "taylor_importance", "taylor_importance_in", "update_magnitudes"]


def taylor_importance(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      buffers: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """First-order Taylor importance sum(|theta * grad|) per tensor: the L1 norm of the elementwise product.

    `buffers` (same shapes as `params`, reused across steps) hold the product; without them it is allocated each
    call, which on CPU costs more than the arithmetic (fresh pages).
    """
    if not params:
        return torch.empty(0)
    device = params[0].device
    parts = []
    for idx in groups_by(params, lambda t: (t.device, t.dtype)).values():
        if buffers is None:
            products = torch._foreach_mul([params[i].detach() for i in idx], [grads[i] for i in idx])
        else:
            products = [buffers[i] for i in idx]
            torch._foreach_copy_(products, [params[i].detach() for i in idx])
            torch._foreach_mul_(products, [grads[i] for i in idx])
        dtype = accumulation_dtype(products[0].dtype)
        parts.append((idx, torch.stack(torch._foreach_norm(products, 1, dtype=dtype)).float()))
    return in_input_order(parts, device)


@torch.no_grad()
def taylor_importance_in(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         scratch: dict[tuple, torch.Tensor], fraction: int = 8) -> torch.Tensor:
    """`taylor_importance` with bounded scratch memory: the products `theta * grad` are formed in one flat buffer
    per device/dtype (kept in `scratch` across steps) of max(largest matrix, 1/`fraction` of all) elements, the
    matrices taken in batches that fit it, each batch through the foreach kernels. So measuring importance holds
    no second copy of the LoRA gradients, only about 1/8 of them."""
    if not params:
        return torch.empty(0)
    device = params[0].device
    parts = []
    for idx in groups_by(params, lambda t: (t.device, t.dtype)).values():
        first = params[idx[0]]
        sizes = [params[i].numel() for i in idx]
        size = max(max(sizes), -(-sum(sizes) // fraction))
        key = (first.device, first.dtype)
        flat = scratch.get(key)
        if flat is None or flat.numel() < size:
            flat = scratch[key] = torch.empty(size, device=first.device, dtype=first.dtype)
        dtype = accumulation_dtype(first.dtype)
        start = 0
        while start < len(idx):
            batch, used = [], 0
            while start < len(idx) and used + sizes[start] <= size:
                batch.append(idx[start])
                used += sizes[start]
                start += 1
            views, offset = [], 0
            for i in batch:
                views.append(flat[offset : offset + params[i].numel()].view_as(params[i]))
                offset += params[i].numel()
            torch._foreach_copy_(views, [params[i].detach() for i in batch])
            torch._foreach_mul_(views, [grads[i] for i in batch])
            parts.append((batch, torch.stack(torch._foreach_norm(views, 1, dtype=dtype)).float()))
    return in_input_order(parts, device)


def update_magnitudes(lora: Sequence[LoraParams]) -> torch.Tensor:
    """||delta W||_F = scaling * ||B A||_F per module, without forming B A (out x in).

    ||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T)) = sum((B^T B) * (A A^T)) (both r x r and symmetric).
    Modules with equal shapes are stacked and batched through one bmm each. The Gram matrices are float32; their
    elementwise product is summed in float64 because it cancels (off-diagonal terms have either sign).
    """
    if not lora:
        return torch.empty(0)
    device = lora[0].A.device
    parts = []
    key = lambda lp: (lp.A.device, lp.A.dtype, tuple(lp.A.shape), tuple(lp.B.shape))  # noqa: E731
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, lp in enumerate(lora):
        groups[key(lp)].append(i)
    for idx in groups.values():
        a = torch.stack([lora[i].A.detach() for i in idx]).float()  # (n, r, in)
        b = torch.stack([lora[i].B.detach() for i in idx]).float()  # (n, out, r)
        gram_a = torch.bmm(a, a.transpose(1, 2))  # (n, r, r)
        gram_b = torch.bmm(b.transpose(1, 2), b)  # (n, r, r)
        squared = (gram_a.double() * gram_b.double()).sum(dim=(1, 2)).clamp_min(0)
        scaling = torch.tensor([lora[i].scaling for i in idx], dtype=torch.float64, device=a.device)
        parts.append((idx, (squared.sqrt() * scaling).float()))
    return in_input_order(parts, device)
