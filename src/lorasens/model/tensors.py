"""Foreach tensor maths shared by training (the divergence check) and the analysis (`analysis.measures`).

Each function returns one float32 tensor on the device of the first input (one value per input, in input order),
so that a caller can concatenate everything it measured in a step and move it to the host once.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence

import torch


def groups_by(tensors: Sequence[torch.Tensor], key) -> dict[tuple, list[int]]:
    """Indices of `tensors` grouped by `key(tensor)`: foreach kernels need one device and dtype per call."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[key(t)].append(i)
    return groups


@functools.lru_cache(maxsize=64)
def _inverse_order(order: tuple[int, ...], device: str) -> torch.Tensor:
    """Positions that put values computed in `order` back into input order (cached: one copy to the device)."""
    inverse = [0] * len(order)
    for position, i in enumerate(order):
        inverse[i] = position
    return torch.tensor(inverse, device=device)


def in_input_order(parts: list[tuple[list[int], torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Concatenate per-group results and restore input order with one gather on the device."""
    order = tuple(i for idx, _ in parts for i in idx)
    values = torch.cat([v.to(device) for _, v in parts])
    if order == tuple(range(len(order))):
        return values
    return values.index_select(0, _inverse_order(order, str(device)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Low-precision tensors (bf16/fp16) accumulate their norms in float32; float32/64 keep their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def foreach_norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """`torch.linalg.vector_norm(t, ord)` of every tensor, as one float32 tensor (norms accumulate in float32)."""
    if not tensors:
        return torch.empty(0)
    device = tensors[0].device
    parts = []
    for idx in groups_by(tensors, lambda t: (t.device, t.dtype)).values():
        dtype = accumulation_dtype(tensors[idx[0]].dtype)
        norms = torch._foreach_norm([tensors[i] for i in idx], ord, dtype=dtype)
        parts.append((idx, torch.stack(norms).float()))
    return in_input_order(parts, device)
