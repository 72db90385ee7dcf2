"""A 4-bit (NF4) base model for QLoRA: bitsandbytes `Linear4bit` in place of the decoder's linear layers.

The replacement works on a model already in memory, so every way lorasens loads a model (Hub id, local folder,
the offline SmolLM2 GGUF, the tiny random Llama of the tests) gets the same quantization; the result is what
`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))`
builds: NF4 weights, double quantization, the LM head and embeddings left in full precision. Then PEFT's
`prepare_model_for_kbit_training` (norms and the rest in fp32, input gradients on for checkpointing) runs as in
every QLoRA recipe.

LoRA measures need no base weight: gradient norms, importance and the first-order estimate use the LoRA factors'
gradients, and ||delta W|| = scaling * ||B A|| (Gram formula) never touches W. Where a base weight is needed
(`dequantized_weight`), it is the dequantized NF4 weight, i.e. the weight the forward pass actually uses.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorasens.errors import UserError

logger = logging.getLogger(__name__)

SKIP = ("lm_head",)  # kept in full precision, as transformers' bitsandbytes integration does


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--quantize 4bit needs bitsandbytes: pip install 'lorasens[qlora]' "
                        "(bitsandbytes >= 0.50 also runs on CPU)") from None
    return bnb


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear except the LM head by an NF4 `Linear4bit` on the weight's device; returns how many."""
    bnb = _bnb()
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and name.split(".")[-1] not in SKIP]
    for name, linear in targets:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        device = linear.weight.device
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu", torch.float32).to(compute_dtype),
                                     requires_grad=False, compress_statistics=True, quant_type="nf4")
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        # bitsandbytes repacks the weight for its CPU inference kernel on the first eval-mode forward without
        # gradients (validation loss, ablation), and the gradients of training on the repacked weight are then
        # wrong (measured on the tiny model: LoRA A gradients 3-6x too small after one no-grad eval forward,
        # identical to before the eval pass with repacking off): keep the training layout.
        q.support_avx512bf16_for_cpu = False
        q = q.to(device)  # quantizes (Params4bit quantizes when moved to its device)
        setattr(parent, name.rpartition(".")[2], q)
    # What PEFT's k-bit preparation and the Trainer look for on a bitsandbytes 4-bit model.
    model.is_loaded_in_4bit = True
    logger.info("quantized %d linear layers to NF4 (compute dtype %s)", len(targets), str(compute_dtype).split(".")[-1])
    return len(targets)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """PEFT's own preparation: the remaining full-precision parameters in fp32, base frozen, input grads on."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight the forward pass uses: dequantized for a `Linear4bit`, the plain weight otherwise."""
    layer = getattr(layer, "base_layer", layer)
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach()
    return _bnb().functional.dequantize_4bit(weight.data, quant_state)
