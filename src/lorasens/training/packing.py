"""Attention within each packed example, without a mask: SDPA run once per example of a packed row.

A packed batch is one row holding every example of the batch (`training.PackedCollator`). With transformers' SDPA
attention the row gets a block-diagonal mask, so attention is still computed over the whole row — (sum of lengths)^2
scores per head — and CPU SDPA with an explicit mask takes its slow, materialised path. `segment_sdpa_attention`
instead slices each example out of the row (boundaries from the collator's `cu_seq_lens_q`, the same values
flash-attention's varlen kernel takes) and runs causal SDPA on it: sum of (length^2) scores, no mask, the fast
kernel. Any other call (padded batches, generation with a KV cache, the ablation's packed rows with filler padding)
goes to transformers' own SDPA function unchanged, so switching a model to this implementation changes nothing
else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SEGMENT_ATTENTION = "lorasens_segment_sdpa"


def segment_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """(batch, heads, tokens, head_dim) query/key/value -> ((batch, tokens, heads, head_dim) output, None), as
    transformers' attention functions return."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    outputs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                              dropout_p=dropout, scale=scaling)
               for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa_attention)
# Padded batches and generation still need SDPA's mask (built as for "sdpa"); packed rows get one too, unused.
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


def use_segment_attention(model: torch.nn.Module) -> bool:
    """Switch a model that uses SDPA to the per-example implementation (every config in it that says "sdpa");
    True if it now uses it. Flash-attention keeps its own varlen kernel; eager attention is left alone."""
    switched = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        if config._attn_implementation == "sdpa":
            config._attn_implementation = SEGMENT_ATTENTION
        switched = switched or config._attn_implementation == SEGMENT_ATTENTION
    return switched
