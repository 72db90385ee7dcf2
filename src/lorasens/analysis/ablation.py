"""Ablation: validation loss with LoRA modules switched off, set by set (groups, layers, module types, singles).

A module is switched off by setting its PEFT scaling to 0 for the adapter: PEFT then adds `lora_B(lora_A(x)) * 0`,
which is exactly 0 for finite activations, so the layer computes its base output bit for bit. The exact scaling
values are restored afterwards (also on error). Nothing is merged or copied. The validation batches are built once
and reused, so every ablation sees the same tokens.

Cached passes: switching off a module in layer L cannot change anything before layer L. For each batch the engine
runs the model once with everything on, keeping the hidden states that enter each decoder layer together with the
other arguments the model passed that layer (rotary position embeddings, attention mask, position ids: captured
with forward pre-hooks, so each architecture's own arguments are replayed as they were). An ablation whose earliest
switched-off module is in layer L then runs only layers L..N-1, the final norm and the LM head at the labelled
positions. Before trusting that shortcut, a probe compares it with a plain forward of the whole model on the first
batch; if they differ (an architecture that does something after the last layer that the shortcut does not know)
every ablation falls back to whole-model passes, and the reason is logged.

Results are kept per example (the sum of token losses over its target tokens and its number of target tokens), so
callers can form the token-weighted mean (sum of sums / sum of counts, what training optimises) or resample examples.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorasens.analysis.folded_lora import FoldedLora, folding_problem
from lorasens.data.features import IGNORE_INDEX
from lorasens.model.lora import PEFT_PREFIX, LoraParams
from lorasens.model.module_map import GROUPS, LoraModule

logger = logging.getLogger(__name__)

Method = Literal["auto", "cached", "decoder", "model"]
# Where the final norm sits on the decoder module (the part of the model the shortcut replays after the layers).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


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


@dataclass(frozen=True)
class AblationSet:
    """One ablation: which modules are switched off, and the CSV columns that describe it."""

    kind: str
    name: str
    layer: int | None
    group: str | None
    module: str | None
    modules: tuple[LoraModule, ...]

    @property
    def first_layer(self) -> int | None:
        """The earliest layer with a switched-off module: nothing before it changes (None: nothing is off)."""
        return min((m.layer for m in self.modules), default=None)


@dataclass
class AblationResult:
    """Per-example losses of every ablation set.

    `loss_sums[s, e]` is the sum of the next-token cross-entropies over the target tokens of example `e` (the
    order of the features given to `validation_batches`) with set `s` switched off; `token_counts[e]` is the number
    of those tokens (the same for every set: switching modules off does not change the labels). Set 0 switches
    nothing off. The token-weighted mean loss of a set is `loss_sums[s].sum() / token_counts.sum()`.
    """

    sets: list[AblationSet]
    loss_sums: torch.Tensor  # float64, (num_sets, num_examples)
    token_counts: torch.Tensor  # int64, (num_examples,)
    method: str  # cached | decoder | model: how the passes were run
    method_reason: str  # why (the fallback's reason when the cached shortcut was not exact)
    wall_time_s: float

    def losses(self) -> torch.Tensor:
        """Token-weighted mean loss per set, float64 (num_sets,)."""
        return self.loss_sums.sum(dim=1) / self.token_counts.sum()

    def rows(self) -> list[AblationRow]:
        losses = self.losses().tolist()
        return [AblationRow(s.kind, s.name, s.layer, s.group, s.module, len(s.modules), loss, loss - losses[0])
                for s, loss in zip(self.sets, losses)]


@dataclass
class EvalBatch:
    """One validation batch: the model's inputs, the labels, and which example each position belongs to."""

    inputs: dict[str, torch.Tensor]  # input_ids + attention_mask (padded) or position_ids (packed)
    labels: torch.Tensor  # (rows, width), IGNORE_INDEX where there is no target
    example: torch.Tensor  # (rows, width) index of the example in the features given, -1 on padding

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()

    def first_rows(self, n: int) -> EvalBatch:
        """The first `n` rows (rows are independent sequences or packs of them)."""
        return EvalBatch({k: v[:n] for k, v in self.inputs.items()}, self.labels[:n], self.example[:n])


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


# ------------------------------------------------------------------------------------------------------ batches


# Packed validation rows are at least this wide: wide enough to hold several examples, narrow enough that attention,
# which CPU SDPA computes over the whole row (block mask or not), stays a small part of a layer's cost.
PACKED_ROW_TOKENS = 256


def validation_batches(features: Sequence[dict], batch_size: int | None, pad_token_id: int, device, *,
                       max_tokens: int | None = None, packing: bool = False) -> list[EvalBatch]:
    """Batches of at most `batch_size` examples and `max_tokens` tokens (rows x width).

    Padded: one example per row, sorted by length (little padding), right-padded, labels IGNORE_INDEX on padding.
    Packed: several examples per row (first fit, longest first; as few rows as `PACKED_ROW_TOKENS`-wide rows need,
    then as narrow as that number of rows allows), `position_ids` restarting at 0 for each example, label -100 at
    each example's first position (a prompt token anyway), the rest of a row filled with padding that forms a
    sequence of its own, with no label. transformers builds the block-diagonal mask from such `position_ids` (as
    with `DataCollatorWithFlattening` in training).
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size or max_tokens")
    lengths = [len(f["input_ids"]) for f in features]
    if packing:
        width = max(max(lengths), PACKED_ROW_TOKENS)
        rows = _first_fit(lengths, width)
        # As many rows, but as narrow as they can be (less padding at the ends of the rows): binary search.
        lo, hi = max(max(lengths), -(-sum(lengths) // len(rows))), width
        while lo < hi:
            mid = (lo + hi) // 2
            narrower = _first_fit(lengths, mid)
            if len(narrower) <= len(rows):
                rows, width, hi = narrower, mid, mid
            else:
                lo = mid + 1
        widths = [width] * len(rows)
    else:
        rows = [[i] for i in sorted(range(len(features)), key=lambda i: lengths[i])]
        widths = [lengths[row[0]] for row in rows]
    chunks: list[list[int]] = []  # row indices per batch
    for r in range(len(rows)):
        if chunks:
            chunk = chunks[-1]
            examples = sum(len(rows[j]) for j in chunk) + len(rows[r])
            tokens = (len(chunk) + 1) * max(widths[r], widths[chunk[-1]])
            if (batch_size is None or examples <= batch_size) and (max_tokens is None or tokens <= max_tokens):
                chunk.append(r)
                continue
        chunks.append([r])
    batches = []
    for chunk in chunks:
        width = max(widths[r] for r in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        example = torch.full((len(chunk), width), -1, dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, r in enumerate(chunk):
            at = 0
            for i in rows[r]:
                f, n = features[i], lengths[i]
                ids[row, at : at + n] = torch.tensor(f["input_ids"])
                labels[row, at : at + n] = torch.tensor(f["labels"])
                labels[row, at] = IGNORE_INDEX
                example[row, at : at + n] = i
                positions[row, at : at + n] = torch.arange(n)
                mask[row, at : at + n] = 1
                at += n
            positions[row, at:] = torch.arange(width - at)
        inputs = {"input_ids": ids, "position_ids": positions} if packing else {"input_ids": ids, "attention_mask": mask}
        batches.append(EvalBatch({k: v.to(device) for k, v in inputs.items()}, labels.to(device), example.to(device)))
    return batches


def _first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Example indices per row: first fit, longest first, rows of `width` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def ablation_max_tokens(model: torch.nn.Module, num_layers: int) -> int:
    """Tokens per ablation batch that fit comfortably in memory (the larger the batch, the fewer the passes).

    Per token the cached engine keeps one hidden vector per layer and needs the working set of one layer plus the
    LM head's logits (vocabulary-sized) at the labelled positions; a quarter of the free memory (CUDA) or of the
    available RAM, at most 4 GiB, is spent on that.
    """
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1024)
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", 32000)
    param = next(model.parameters())
    elem = param.element_size()
    per_token = (num_layers + 8) * hidden * elem + 4 * inner * elem + vocab * 4 * 2
    if param.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(param.device)
        budget = free // 4
    else:
        budget = _available_ram() // 4
    budget = min(budget, 4 << 30)
    return max(256, int(budget // per_token))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


# ------------------------------------------------------------------------------------------------------ losses


def _example_sums(nll: torch.Tensor, example: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of the token losses `nll` (float) and token counts, given each token's example index."""
    sums = torch.zeros(num_examples, dtype=torch.float64, device=nll.device).index_add_(0, example, nll.double())
    counts = torch.zeros(num_examples, dtype=torch.long, device=nll.device).index_add_(0, example, torch.ones_like(example))
    return sums.cpu(), counts.cpu()


def _scored(batch: EvalBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask of positions t whose next token t+1 has a label, those labels, and their examples."""
    labels = batch.labels[:, 1:]
    scored = labels != IGNORE_INDEX
    return scored, labels[scored], batch.example[:, 1:][scored]


def _lm_logits(base: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head plus the logit transforms the model's own forward applies after it (Gemma2's softcapping,
    Cohere's `logit_scale`, Granite's `logits_scaling`); anything else is caught by the exactness probe."""
    logits = base.get_output_embeddings()(hidden)
    config = base.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(base, "logit_scale", None)
    if isinstance(scale, (int, float, torch.Tensor)):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    return logits


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _model_pass(model: torch.nn.Module, batch: EvalBatch) -> torch.Tensor:
    """Token losses from a plain forward of the whole model (every position through the head): exact by definition."""
    scored, targets, _ = _scored(batch)
    logits = model(**batch.inputs, use_cache=False).logits[:, :-1][scored]
    return _nll(logits, targets)


def _decoder_pass(base: torch.nn.Module, batch: EvalBatch) -> torch.Tensor:
    """Token losses from the whole decoder and the LM head at the labelled positions only (the head is
    hidden x vocab, 49k columns on SmolLM2: as costly as the decoder when applied at every prompt token)."""
    scored, targets, _ = _scored(batch)
    hidden = base.get_decoder()(**batch.inputs, use_cache=False).last_hidden_state
    return _nll(_lm_logits(base, hidden[:, :-1][scored]), targets)


@torch.no_grad()
def per_example_losses(model: torch.nn.Module, batches: Sequence[EvalBatch], num_examples: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL over each example's target tokens, their count), indexed like the features the
    batches were built from; a plain forward of the whole model (exact for every architecture)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(num_examples, dtype=torch.float64)
    counts = torch.zeros(num_examples, dtype=torch.long)
    try:
        for batch in batches:
            _, _, example = _scored(batch)
            batch_sums, batch_counts = _example_sums(_model_pass(model, batch), example, num_examples)
            sums += batch_sums
            counts += batch_counts
    finally:
        model.train(was_training)
    return sums, counts


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[EvalBatch]) -> float:
    """Mean next-token cross-entropy over all label tokens of all batches (token-weighted, like training)."""
    was_training = model.training
    model.eval()
    try:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        shortcut = _final_norm(base) is not None
        total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for batch in batches:
            nll = _decoder_pass(base, batch) if shortcut else _model_pass(model, batch)
            total += nll.double().sum().cpu()
            tokens += nll.numel()
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the validation set has no label tokens")
    return float(total / tokens)


def _final_norm(base: torch.nn.Module) -> torch.nn.Module | None:
    if base.get_output_embeddings() is None:
        return None
    decoder = base.get_decoder()
    if decoder is base:
        return None
    return next((getattr(decoder, n) for n in FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), torch.nn.Module)), None)


# ------------------------------------------------------------------------------------------------------ cached


class _StopAfterLastLayer(Exception):
    pass


class LayerCache:
    """The inputs of every decoder layer in one all-on pass, and the last layer's output.

    `args[i]`/`kwargs[i]` are exactly what the model passed layer i (hidden states cloned: the next layer must not
    see them changed in place); `replay(L)` runs layers L..N-1 on the cached input of layer L.
    """

    def __init__(self, layers: torch.nn.ModuleList):
        self.layers = layers
        self.args: list[tuple] = [()] * len(layers)
        self.kwargs: list[dict] = [{}] * len(layers)
        self.last_output: torch.Tensor | None = None

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    @staticmethod
    def _output(out) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    def capture(self, run_forward) -> None:
        """Run `run_forward()` (a forward of the model with everything on) and record every layer's inputs."""
        handles = []

        def pre_hook(index):
            def hook(module, args, kwargs):
                args, kwargs = self._with_hidden(args, kwargs, self._hidden(args, kwargs).detach().clone())
                self.args[index], self.kwargs[index] = args, kwargs
            return hook

        def last_hook(module, args, kwargs, out):
            self.last_output = self._output(out)
            raise _StopAfterLastLayer  # nothing after the last layer is needed: skip the norm and the head

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(self.layers[-1].register_forward_hook(last_hook, with_kwargs=True))
        try:
            run_forward()
        except _StopAfterLastLayer:
            pass
        finally:
            for h in handles:
                h.remove()
        if self.last_output is None:
            raise RuntimeError("the model's forward did not reach its last decoder layer")

    def input_of(self, index: int) -> torch.Tensor:
        """The hidden states that entered layer `index` in the all-on pass."""
        return self._hidden(self.args[index], self.kwargs[index])

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer `index` on `hidden`, with the other arguments the model passed it in the all-on pass."""
        args, kwargs = self._with_hidden(self.args[index], self.kwargs[index], hidden)
        return self._output(self.layers[index](*args, **kwargs))

    def replay(self, start: int, folded: FoldedLora | None = None) -> torch.Tensor:
        """The last layer's output when layers start..N-1 run again (start = N: the cached all-on output), with
        their LoRA folded into the weights if `folded` is given."""
        if start >= len(self.layers):
            return self.last_output
        hidden = self._hidden(self.args[start], self.kwargs[start])
        for i in range(start, len(self.layers)):
            with folded.layer(i) if folded else nullcontext():
                hidden = self.run_layer(i, hidden)
        return hidden


# ------------------------------------------------------------------------------------------------------ engine


def ablation_sets(lora: Sequence[LoraParams], singles: Sequence[LoraModule]) -> list[AblationSet]:
    """Every ablation, in the order they are reported: all on, all off, groups, layers, module types, singles."""
    modules = tuple(lp.module for lp in lora)
    sets = [AblationSet("all", "all_on", None, None, None, ()), AblationSet("all", "all_off", None, None, None, modules)]
    for g in GROUPS:
        chosen = tuple(m for m in modules if m.group == g)
        if chosen:
            sets.append(AblationSet("group", g, None, g, None, chosen))
    for layer in sorted({m.layer for m in modules}):
        sets.append(AblationSet("layer", f"L{layer}", layer, None, None, tuple(m for m in modules if m.layer == layer)))
    for module_type in dict.fromkeys(m.module_type for m in modules):
        chosen = tuple(m for m in modules if m.module_type == module_type)
        sets.append(AblationSet("module_type", module_type, None, chosen[0].group, module_type, chosen))
    for m in singles:
        sets.append(AblationSet("module", f"L{m.layer}.{m.module_type}", m.layer, m.group, m.module_type, (m,)))
    return sets


def layers_path_of(lora: Sequence[LoraParams]) -> str | None:
    """The decoder-layer list's path in the base model, from the module names ("model.layers.3.mlp.up_proj")."""
    for lp in lora:
        match = re.match(rf"^(.*?)\.{lp.module.layer}\.", lp.module.name)
        if match:
            return match.group(1)
    return None


def run_ablation(model: torch.nn.Module, lora: Sequence[LoraParams], batches: Sequence[EvalBatch],
                 singles: Sequence[LoraModule], method: Method = "auto", layers_path: str | None = None,
                 num_examples: int | None = None, fold: bool = True) -> AblationResult:
    """Per-example validation losses for every ablation set; `singles` are the (layer, module) pairs ablated one by
    one. `method`: auto (cached when the probe says it is exact, else whole-model passes), cached, decoder (every
    set through the whole decoder and the head at labelled positions: the engine before caching), model. `fold`:
    cached replays compute with the LoRA folded into the weights where that is exact to float rounding."""
    started = time.perf_counter()
    sets = ablation_sets(lora, singles)
    num_examples = num_examples if num_examples is not None else 1 + max(int(b.example.max()) for b in batches)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers_path = layers_path or layers_path_of(lora)
    layers = base.get_submodule(layers_path) if layers_path else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chosen, reason, folded = _choose_method(model, base, layers, batches, method, lora, fold)
            logger.info("ablation: %d sets over %d validation batches (%d examples), %s passes: %s",
                        len(sets), len(batches), num_examples, chosen, reason)
            sums = torch.zeros((len(sets), num_examples), dtype=torch.float64)
            counts = torch.zeros(num_examples, dtype=torch.long)
            num_layers = len(layers) if layers is not None else 1
            # Progress in layer-passes: the capture pass costs N, then (cached) one per node of the prefix tree
            # (`layer_plan`), or N per set (otherwise).
            if chosen == "cached":
                plan = layer_plan(sets, num_layers)
                per_batch = num_layers + count_layer_runs(plan)
            else:
                per_batch = num_layers * len(sets)
            with tqdm(total=per_batch * len(batches), desc="ablation", unit="layer", leave=False, mininterval=2.0,
                      disable=not sys.stderr.isatty()) as bar:  # a bar on a terminal; logs get the lines above
                for batch in batches:
                    _, _, example = _scored(batch)
                    if chosen == "cached":
                        cache = LayerCache(layers)
                        cache.capture(lambda: base.get_decoder()(**batch.inputs, use_cache=False))
                        bar.update(num_layers)
                        results = _shared_prefix_passes(model, base, cache, sets, plan, batch, bar, folded)
                    else:
                        results = _whole_passes(model, base, sets, batch, chosen, bar, num_layers)
                    for index, nll in results:
                        batch_sums, batch_counts = _example_sums(nll, example, num_examples)
                        sums[index] += batch_sums
                        if index == 0:
                            counts += batch_counts
    finally:
        model.train(was_training)
    if int(counts.sum()) == 0:
        raise ValueError("the validation set has no label tokens")
    return AblationResult(sets, sums, counts, chosen, reason, time.perf_counter() - started)


def _whole_passes(model, base, sets: Sequence[AblationSet], batch: EvalBatch, chosen: str, bar, num_layers: int
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """(set index, token losses) for every set, each through the whole decoder (or model)."""
    for index, s in enumerate(sets):
        with lora_switched_off(model, s.modules):
            nll = _decoder_pass(base, batch) if chosen == "decoder" else _model_pass(model, batch)
        bar.update(num_layers)
        yield index, nll


LayerKey = tuple  # the names of a set's modules in one layer, sorted: what that layer runs with switched off


def layer_plan(sets: Sequence[AblationSet], num_layers: int) -> list[tuple[LayerKey, ...]]:
    """Per set, what is switched off in each layer (a tuple of module names per layer, () where nothing is)."""
    plan = []
    for s in sets:
        per_layer: list[list[str]] = [[] for _ in range(num_layers)]
        for m in s.modules:
            per_layer[m.layer].append(m.name)
        plan.append(tuple(tuple(sorted(names)) for names in per_layer))
    return plan


def count_layer_runs(plan: Sequence[tuple[LayerKey, ...]]) -> int:
    """Layer computations of the prefix tree: one per distinct (layer, switched-off prefix up to that layer) among
    sets that switch something off at or before that layer (before it, a set's layers are the cached all-on ones)."""
    nodes = set()
    for keys in plan:
        first = next((i for i, k in enumerate(keys) if k), None)
        if first is None:
            continue
        for layer in range(first, len(keys)):
            nodes.add(keys[: layer + 1])
    return len(nodes)


def _shared_prefix_passes(model, base, cache: LayerCache, sets: Sequence[AblationSet], plan, batch: EvalBatch, bar,
                          folded: FoldedLora | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(set index, token losses) for every set, from the cached all-on pass.

    Sets that switch off the same modules in layers 0..L share the computation of those layers: the sets form a
    tree over the layers (root: the cached input of the first layer where a set switches something off), each
    layer runs once per node with that node's modules switched off, and a set's losses come from its leaf. A set
    that switches nothing off reads the cached output of the last layer. Depth first, so at most one hidden state
    per layer is held besides the cache; every layer runs on exactly the inputs the per-set replay would give it
    (same numbers), but e.g. `all_off` and `L0` share layer 0, and the module type `q_proj` shares it with `L0.q_proj`.
    With `folded`, each layer computes with its LoRA folded into the weights (see folded_lora: same numbers to float
    rounding) instead of through PEFT's branch with the switched-off modules' scaling at 0.
    """
    num_layers = len(cache.layers)
    by_name = {m.name: m for s in sets for m in s.modules}
    roots: dict[int, list[int]] = {}
    for index, keys in enumerate(plan):
        first = next((i for i, k in enumerate(keys) if k), None)
        if first is None:
            yield index, _head_nll(base, cache.last_output, batch)
        else:
            roots.setdefault(first, []).append(index)

    def descend(layer: int, hidden: torch.Tensor, members: list[int]):
        children: dict[LayerKey, list[int]] = {}
        for index in members:
            children.setdefault(plan[index][layer], []).append(index)
        for key, group in children.items():
            with folded.layer(layer, key) if folded else lora_switched_off(model, [by_name[name] for name in key]):
                out = cache.run_layer(layer, hidden)
            bar.update(1)
            if layer == num_layers - 1:
                nll = _head_nll(base, out, batch)
                for index in group:
                    yield index, nll
            else:
                yield from descend(layer + 1, out, group)

    for first, members in sorted(roots.items()):
        yield from descend(first, cache.input_of(first), members)


def _head_nll(base: torch.nn.Module, last_hidden: torch.Tensor, batch: EvalBatch) -> torch.Tensor:
    """Token losses from the last layer's output: final norm, LM head at the labelled positions."""
    scored, targets, _ = _scored(batch)
    hidden = _final_norm(base)(last_hidden)
    return _nll(_lm_logits(base, hidden[:, :-1][scored]), targets)


def _cached_pass(base: torch.nn.Module, cache: LayerCache, start: int, batch: EvalBatch,
                 folded: FoldedLora | None = None) -> torch.Tensor:
    """Token losses when layers start..N-1 run again on their cached inputs (the exactness probe's path)."""
    return _head_nll(base, cache.replay(start, folded), batch)


def _choose_method(model, base, layers, batches: Sequence[EvalBatch], method: Method, lora: Sequence[LoraParams],
                   fold: bool) -> tuple[str, str, FoldedLora | None]:
    """The pass method, why, and the folded LoRA the cached replay computes with (None: PEFT's branch). `auto`
    probes the cached shortcut (folded where `folding_problem` allows, else not) against a whole-model forward."""
    if method in ("decoder", "model"):
        return method, "requested", None
    problem = None
    if layers is None or not isinstance(layers, torch.nn.ModuleList):
        problem = "the decoder layers were not found"
    elif _final_norm(base) is None:
        problem = f"{type(base).__name__} has no decoder with a final norm named {'/'.join(FINAL_NORM_NAMES)}"
    if problem is None:
        # Two rows are enough to check the replay and the head, and cost a fraction of a pass over a whole batch.
        batch = batches[0].first_rows(2)
        if not _scored(batch)[1].numel():  # no target in those rows: probe on the whole batch
            batch = batches[0]
        not_foldable = folding_problem(model, lora) if fold else "folding not requested"
        candidates = ([FoldedLora(model, lora)] if not_foldable is None else []) + [None]
        cache = LayerCache(layers)
        reference = None
        for folded in candidates:
            try:
                if cache.last_output is None:
                    cache.capture(lambda: base.get_decoder()(**batch.inputs, use_cache=False))
                shortcut = _cached_pass(base, cache, 0, batch, folded).double().sum().item()
            except Exception as exc:  # an architecture whose layers cannot be called again as captured
                problem = f"replaying the decoder layers failed ({type(exc).__name__}: {exc})"
                continue
            if reference is None:
                reference = _model_pass(model, batch).double().sum().item()
            # Same arithmetic up to the row selection before the head (and, folded, the order of one addition):
            # fp32 agrees to ~1e-7, bf16 to its epsilon.
            tolerance = max(1e-5, 4 * torch.finfo(next(model.parameters()).dtype).eps) * max(1.0, abs(reference))
            if math.isclose(shortcut, reference, rel_tol=0, abs_tol=tolerance):
                how = ("LoRA folded into the weights of each replayed layer" if folded else
                       f"LoRA through PEFT's branch: {not_foldable or 'folding was not exact'}")
                return "cached", ("replays layers L..N-1 from the hidden states cached in the all-on pass (probe "
                                  f"exact), {how}"), folded
            problem = (f"the layer-replay shortcut gives loss sum {shortcut:.6f} on the first batch but the whole "
                       f"model gives {reference:.6f} ({type(base).__name__} transforms the output in a way the "
                       "shortcut does not know)")
    if method == "cached":
        raise RuntimeError(f"cached ablation is not exact for this model: {problem}")
    logger.warning("ablation: whole-model passes, because %s", problem)
    return "model", problem, None
