"""LoRA training through the Hugging Face Trainer, extended only through callbacks.

This module owns the TrainingArguments mapping and the generic callbacks (train log, best adapter, progress).
Phase switching (`lorasens.training.phases`) and gradient tracking (`lorasens.analysis`) are callbacks of their own.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import ProgressCallback

from lorasens.config import ExperimentConfig
from lorasens.data.features import IGNORE_INDEX
from lorasens.errors import UserError
from lorasens.model.tensors import foreach_norms
from lorasens.rundir.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS, EVAL_LOG, TRAIN_LOG, TRAINER_STATE
from lorasens.rundir.load import adapter_problem
from lorasens.safeio import dumps, read_json, read_jsonl
from lorasens.training.decision import SpeedupDecision
from lorasens.training.labelled_head import (
    LabelledHeadCollator,
    decide_labelled_head,
    labelled_head_loss,
    labelled_targets,
)
from lorasens.training.packing import use_segment_attention

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Mutable state that callbacks share: the current phase name (set by the phase callback)."""

    phase: str = "static"
    phase_index: int = 0


# Packed and padded losses of the probe batch may differ by float rounding only (different matmul shapes).
PACKING_TOLERANCE = 1e-4


class PackedCollator:
    """Padding-free batches: transformers' `DataCollatorWithFlattening` (the examples of a batch concatenated into
    one row, `position_ids` restarting at 0 per example, label -100 at each example's first position) plus
    `use_cache=False` in the model inputs.

    The cache flag is what makes packing exact: transformers builds the block-diagonal mask from `position_ids` only
    when there is no attention mask and no KV cache, and a Llama forward creates a cache by default
    (`config.use_cache=True`); with it, the examples of a row silently attend to each other.
    """

    def __init__(self, flash_attention: bool = False):
        # flash-attention's varlen kernel and the per-example SDPA (`lorasens.training.packing`) take the sequence
        # boundaries directly (cu_seq_lens): no mask at all.
        self.flatten = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=flash_attention)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["use_cache"] = False
        return batch


def padded_collator(tokenizer) -> DataCollatorForSeq2Seq:
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def packed_collator(model: torch.nn.Module, segments: bool = True) -> PackedCollator:
    """The packed collator for `model`. With `segments` (default) an SDPA model is switched to attention computed
    per packed example (`lorasens.training.packing`; identical for every other call), which on CPU is what makes
    packing pay on long examples; `segments=False` keeps the block-diagonal mask over the whole row (the earlier
    behaviour, kept for the benchmark)."""
    segmented = segments and use_segment_attention(model)
    implementation = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return PackedCollator(flash_attention=segmented or implementation.startswith("flash_attention"))


def batch_collator(model: torch.nn.Module, tokenizer, packing: SpeedupDecision):
    """The collator of training and validation batches: packed or padded."""
    return packed_collator(model) if packing.enabled else padded_collator(tokenizer)


def decide_head(model: torch.nn.Module, tokenizer, features: list[dict], packing: SpeedupDecision) -> SpeedupDecision:
    """Whether the LM head can run at the labelled positions only, probed on the first two training examples
    batched the way training batches them."""
    if not features:
        return SpeedupDecision(False, "no training examples to probe")
    return decide_labelled_head(model, batch_collator(model, tokenizer, packing)(features[:2]))


@torch.no_grad()
def decide_packing(model: torch.nn.Module, tokenizer, features: list[dict], requested: bool,
                   batch_size: int) -> SpeedupDecision:
    """Packing when requested and exact: the loss of one batch (the first `batch_size` examples, at least two) must
    be the same padded and flattened, else padding with the reason (an architecture whose attention ignores packed
    `position_ids`)."""
    if not requested:
        return SpeedupDecision(False, "--packing false")
    sample = features[: max(2, batch_size)]
    if len(sample) < 2:
        return SpeedupDecision(True, "one example per batch: nothing to pack across")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = []
        for collate in (padded_collator(tokenizer), packed_collator(model)):
            # Exactly the batches training gets (the packed collator's own use_cache=False included).
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(sample).items()}
            losses.append(float(model(**batch).loss))
    finally:
        model.train(was_training)
    padded, packed = losses
    if abs(padded - packed) > PACKING_TOLERANCE:
        reason = (f"the loss of one batch is {padded:.6f} padded but {packed:.6f} flattened: this model's attention does "
                  "not separate packed examples; padding instead")
        logger.warning("packing off: %s", reason)
        return SpeedupDecision(False, reason)
    logger.debug("packing on: one batch gives loss %.6f padded and %.6f flattened", padded, packed)
    return SpeedupDecision(True, f"exact: probe batch loss {padded:.6f} padded, {packed:.6f} flattened")


def training_arguments(cfg: ExperimentConfig, run_dir: Path, packing: bool = False) -> TrainingArguments:
    tr = cfg.training
    use_cuda = torch.cuda.is_available()
    precision = cfg.model.precision
    # On a CPU only an explicit --precision bf16 (select_dtype checked the CPU) autocasts: auto stays fp32 there.
    bf16 = precision == "bf16" or (use_cuda and precision == "auto" and torch.cuda.is_bf16_supported())
    if (tr.fsdp != "none" or tr.deepspeed) and not use_cuda:
        # accelerate enables FSDP / DeepSpeed only on accelerators; on CPU the Trainer would silently run DDP.
        raise UserError(f"--{'fsdp' if tr.fsdp != 'none' else 'deepspeed'} needs CUDA GPUs (accelerate runs plain DDP "
                        "on CPU); leave it out to train with DDP")
    sharding = {}
    if tr.fsdp != "none":
        # FSDP2 (what TRL and axolotl run); accelerate wraps each decoder layer (the model's _no_split_modules).
        sharding = {"fsdp": tr.fsdp, "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                      "state_dict_type": "SHARDED_STATE_DICT"}}
    elif tr.deepspeed:
        sharding = {"deepspeed": tr.deepspeed}
    return TrainingArguments(
        **sharding,
        output_dir=str(run_dir / CHECKPOINTS),
        max_steps=tr.max_steps,
        per_device_train_batch_size=tr.batch_size,
        per_device_eval_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum,
        learning_rate=tr.lr,
        lr_scheduler_type=tr.lr_scheduler,
        warmup_steps=tr.warmup_steps,
        weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        seed=tr.seed,
        data_seed=tr.seed,
        logging_steps=tr.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if tr.eval_steps > 0 else "no",
        eval_steps=tr.eval_steps or None,
        save_strategy="steps" if tr.save_steps > 0 else "no",
        save_steps=tr.save_steps or 500,
        report_to=[] if tr.report_to == "none" else [tr.report_to],
        activation_checkpointing=tr.gradient_checkpointing,
        # Non-reentrant checkpointing: reentrant checkpointing loses the gradients of a layer whose checkpointed
        # input does not require grad (e.g. after freezing the early layers), the bug of the tool we replace.
        activation_checkpointing_kwargs={"use_reentrant": False} if tr.gradient_checkpointing else None,
        bf16=bf16,
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        # Packed rows have no padding (and no attention mask to count it by): every token is a real one.
        include_num_input_tokens_seen="all" if packing else "non_padding",
        train_sampling_strategy="group_by_length" if tr.group_by_length else "random",
        remove_unused_columns=False,
        disable_tqdm=False,
        # Log the true loss: the default replaces a NaN/inf loss by the mean of the previous ones, which hides a
        # diverged run (DivergenceCallback stops it instead).
        logging_nan_inf_filter=False,
        # DDP: modules frozen by a phase get no gradient, so the reducer must not wait for them.
        ddp_find_unused_parameters=bool(cfg.schedule.phase_strategy),
    )


def build_trainer(
    cfg: ExperimentConfig,
    run_dir: Path,
    model: torch.nn.Module,
    tokenizer,
    train_features: list[dict],
    eval_features: list[dict] | None,
    callbacks: list[TrainerCallback],
    packing: SpeedupDecision | None = None,
    head: SpeedupDecision | None = None,
) -> Trainer:
    """The Trainer; `packing` and `head` are decided here (`decide_packing`, `decide_head`) unless the caller
    already did. Training and the validation loss use the same batching and the same loss."""
    from datasets import Dataset

    if packing is None:
        packing = decide_packing(model, tokenizer, train_features, cfg.training.packing, cfg.training.batch_size)
    if head is None:
        head = decide_head(model, tokenizer, train_features, packing)
    collator = batch_collator(model, tokenizer, packing)
    if head.enabled:
        collator = LabelledHeadCollator(collator)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, run_dir, packing.enabled),
        train_dataset=Dataset.from_list(train_features),
        eval_dataset=Dataset.from_list(eval_features) if eval_features else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        # eval_loss as a token-weighted mean over the whole validation set (see `token_weighted_eval_loss`).
        compute_metrics=token_weighted_eval_loss,
        preprocess_logits_for_metrics=target_token_losses,
        compute_loss_func=labelled_head_loss if head.enabled else None,
    )
    trainer.remove_callback(ProgressCallback)
    # A terminal gets the progress bar; a log file or pipe gets plain lines (no escape codes, no redrawn bars).
    trainer.add_callback(QuietProgressCallback() if sys.stderr.isatty() else PlainProgressCallback())
    return trainer


def target_token_losses(logits, labels: torch.Tensor) -> torch.Tensor:
    """Per row of an eval batch: (sum of the next-token cross-entropies over its target tokens, their count).

    Reduces the logits to (rows, 2) before the Trainer gathers them across batches. `logits` are (rows, width,
    vocab), or (targets, vocab) when the head ran at the labelled positions only (`labelled_head`).
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    shifted = labels[:, 1:]
    labelled = shifted != IGNORE_INDEX
    if logits.dim() == 2:
        nll = torch.nn.functional.cross_entropy(logits.float(), labelled_targets(labels), reduction="none")
        rows = labelled.nonzero()[:, 0]
        sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    else:
        sums = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                                                 reduction="none").view(shifted.shape).sum(dim=1)
    return torch.stack([sums, labelled.sum(dim=1).float()], dim=1)


def token_weighted_eval_loss(prediction) -> dict[str, float]:
    """eval_loss = sum of target-token losses / number of target tokens over the whole validation set.

    The Trainer's own eval_loss is the mean of per-batch token means weighted by batch size, which depends on how
    the examples fall into batches; this is the convention of training (the loss divided by num_items_in_batch),
    of the ablation and of `lorasens validate`. The Trainer (5.x) prefixes the keys of compute_metrics after it
    sets its own `eval_loss`, so this "loss" replaces it (pinned by a test).
    """
    parts = prediction.predictions
    return {"loss": float(parts[:, 0].sum() / parts[:, 1].sum())}
# What a checkpoint needs for --resume. The Trainer writes trainer_state.json last (after the adapter, optimizer,
# scheduler and RNG state), so a checkpoint cut short by a kill or a full disk lacks it or holds a torn copy.
CHECKPOINT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "optimizer.pt", "scheduler.pt", TRAINER_STATE)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it is complete)."""
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        state = read_json(path / TRAINER_STATE, "trainer state")
    except ValueError as exc:  # UserError: corrupt
        return str(exc).split(": ", 1)[-1]
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(path):
        return "trainer_state.json does not match the folder's step"
    return adapter_problem(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped with a warning that names them."""
    folder = run_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] if folder.is_dir() else []
    for path in sorted(found, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("--resume: skipping incomplete checkpoint %s (%s)", path.name, problem)
    return None


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar, without printing a dict per logged step (we log every step to a file)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


class PlainProgressCallback(TrainerCallback):
    """Progress as about ten plain log lines ("step 10/30, loss 2.31"), for a stderr that is not a terminal."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        every = max(1, state.max_steps // 10)
        if state.is_world_process_zero and logs and "loss" in logs and (
                state.global_step % every == 0 or state.global_step == state.max_steps):
            logger.info("step %d/%d, loss %.4g", state.global_step, state.max_steps, logs["loss"])


class JsonlWriter:
    """Append-only JSON-lines file; on resume, lines past the resumed step are dropped (no duplicated steps)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [record for record in read_jsonl(self.path, torn_tail_ok=True) if record.get("step", 0) <= step]
        self.path.write_text("".join(dumps(record) + "\n" for record in kept))

    def reset(self) -> None:
        self.path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(dumps(record) + "\n")


class TrainLogCallback(TrainerCallback):
    """Writes `train_log.jsonl` (step, loss, lr, grad_norm, phase, tokens, step_time_s) and `eval_log.jsonl`."""

    def __init__(self, run_dir: Path, state: RunState):
        self.train = JsonlWriter(run_dir / TRAIN_LOG)
        self.eval = JsonlWriter(run_dir / EVAL_LOG)
        self.state = state
        self._step_start = 0.0
        self._step_time = 0.0
        self._time_since_log = 0.0
        self._tokens_at_last_log = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step:
            # A resumed Trainer keeps the logging/eval/save intervals of the checkpoint's trainer_state.json; the run
            # says (config.json) and does what this training's arguments say.
            before = (state.logging_steps, state.eval_steps, state.save_steps)
            state.compute_steps(args, state.max_steps)
            if before != (state.logging_steps, state.eval_steps, state.save_steps):
                logger.info("resume: logging / eval / save every %s / %s / %s steps (the checkpoint had %s / %s / %s)",
                            state.logging_steps, state.eval_steps, state.save_steps, *before)
        if not state.is_world_process_zero:
            return
        for writer in (self.train, self.eval):
            writer.truncate_after(state.global_step) if state.global_step else writer.reset()
        self._tokens_at_last_log = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_time = time.perf_counter() - self._step_start
        self._time_since_log += self._step_time

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            # A Trainer that does not count tokens (include_num_input_tokens_seen="no", the default outside lorasens
            # train) leaves the count at 0: that is "not counted", so the log says null, not 0 tokens.
            counted = args.include_num_input_tokens_seen not in ("no", False, None)
            tokens = state.num_input_tokens_seen - self._tokens_at_last_log if counted else None
            self._tokens_at_last_log = state.num_input_tokens_seen
            self.train.write(
                {
                    "step": state.global_step,
                    "loss": logs["loss"],
                    "lr": logs.get("learning_rate"),
                    "grad_norm": logs.get("grad_norm"),
                    "phase": self.state.phase,
                    "tokens": tokens,
                    "tokens_seen": state.num_input_tokens_seen if counted else None,
                    "step_time_s": round(self._step_time, 6),
                    "time_since_last_log_s": round(self._time_since_log, 6),
                    # NaN/inf are written null; this names which of them were not finite (a diverged step)
                    **({"non_finite": bad} if (bad := [k for k in ("loss", "grad_norm") if isinstance(logs.get(k), float)
                                                       and not math.isfinite(logs[k])]) else {}),
                }
            )
            self._time_since_log = 0.0
        if "eval_loss" in logs:
            self.eval.write({"step": state.global_step, "eval_loss": logs["eval_loss"], "phase": self.state.phase})


class BestAdapterCallback(TrainerCallback):
    """Keeps a copy of the LoRA weights with the lowest validation loss (LoRA weights are small)."""

    def __init__(self, lora_state_fn):
        self._lora_state_fn = lora_state_fn
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_loss, self.best_step = float(loss), state.global_step
            self.best_state = {k: v.detach().clone() for k, v in self._lora_state_fn().items()}


class DivergenceCallback(TrainerCallback):
    """Stops training at the first step whose loss or gradient norm is not finite, or whose LoRA weights are not.

    Checked at every step end (the weights: one fused max-abs per device/dtype group) and at every
    log (loss and grad_norm). Stopping also cancels that step's evaluation and checkpoint, so the checkpoints on disk
    all hold finite weights; `run_experiment` then stops with `TrainingDiverged` (exit 3) and writes no final_model.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.step: int | None = None
        self.reason = ""

    def _stop(self, control, step: int, reason: str):
        if self.step is None or self.step == step:
            self.step, self.reason = step, reason
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # The max-abs norm: NaN/inf exactly when an element is (an L2 norm would overflow on huge finite weights).
        if self.params and not bool(torch.isfinite(foreach_norms(self.params, ord=math.inf)).all()):
            return self._stop(control, state.global_step, "the LoRA weights are not finite")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                return self._stop(control, state.global_step, f"{key} is {value}")
