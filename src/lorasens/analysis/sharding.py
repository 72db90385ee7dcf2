"""Exact per-module LoRA measures when parameters and gradients are sharded (FSDP2 `fully_shard`, DeepSpeed ZeRO-3).

Under FSDP2 every parameter is a DTensor sharded along dim 0: each rank holds a slice of every LoRA matrix and
of its gradient, and no rank holds a whole one. The measures are still exact without gathering anything big:

- gradient norm ||g||_2: each rank takes the norm of its local shard, squares it, one all-reduce (SUM) over the
  shard group adds the squares of all ranks (one call for all modules, i.e. one per logging step), square root.
- Taylor importance sum|theta * g|: an L1 norm, additive over shards: local L1 norms, the same single all-reduce.
- ||delta W|| = scaling * ||B A||_F (Gram formula): needs whole A and B, which are small (r x in, out x r), so they
  are all-gathered (`full_tensor`) -- r * (in + out) numbers per module, about 1% of the base layer's weights at
  r = 8 on a 2048-wide model.

Every rank must make the same collective calls, so under sharding every rank measures and only rank 0 writes.
No second copy of the gradients is made: the local norms are computed in place by `torch._foreach_norm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from lorasens.analysis.measures import foreach_norms, taylor_importance

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment]


def is_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view, no copy); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gather of a DTensor: a collective, every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _group(tensors: Sequence[torch.Tensor]):
    first = next(t for t in tensors if isinstance(t, DTensor))
    mesh = first.device_mesh
    return mesh.get_group() if mesh.ndim == 1 else None  # HSDP (2-D mesh): the default group


def _all_reduce_sum(values: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if values.numel():
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=_group(tensors))
    return values


def sharded_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact L2 norm of every (possibly sharded) tensor: local squared norms, one all-reduce, square root."""
    if not is_sharded(grads):
        return foreach_norms(grads)
    squares = foreach_norms([local(g) for g in grads]).double().square()
    return _all_reduce_sum(squares, grads).sqrt().float()


def sharded_importance(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact sum|theta * g| of every (possibly sharded) parameter: local L1 norms, one all-reduce."""
    if not is_sharded(grads):
        return taylor_importance(params, grads)
    values = taylor_importance([local(p) for p in params], [local(g) for g in grads]).double()
    return _all_reduce_sum(values, grads).float()
