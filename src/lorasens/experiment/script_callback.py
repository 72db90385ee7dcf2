"""lorasens in your own training script: `SensitivityCallback` for any Hugging Face Trainer (TRL's SFTTrainer too).

```python
from lorasens import SensitivityCallback, PhaseScheduleCallback
trainer = SFTTrainer(model=peft_model, args=..., train_dataset=..., eval_dataset=...,
                     callbacks=[SensitivityCallback(output_dir="runs/mine")])
trainer.train()
```

The callback writes the run directory `lorasens train` writes (same files, same code: `lorasens train` builds this
callback too): train_log.jsonl / eval_log.jsonl, the gradient CSVs, importance.csv and update_magnitude.csv while
training, and at train end final_model/ (the adapter as the Trainer left it), sensitivity.json,
recommended_lora_config.json (with an ablation when there is validation data), report.html and summary.json.

Finding the Trainer. The gradients must be measured where the Trainer clips them (see docs/ARCHITECTURE.md,
"Gradient timing"), on the Trainer's own accelerator; the Trainer does not pass itself (nor its accelerator) to
callbacks. Give it explicitly (`SensitivityCallback(..., trainer=trainer)` or `callback.attach(trainer)`), or let
the callback find it when training begins: the Trainer whose `on_train_begin` event is running is the first
`self` on the call stack that is a `transformers.Trainer` holding this very callback. That works where the script
never sees the Trainer object (LLaMA-Factory's `run_exp(callbacks=[...])`), and fails with a UserError, never
silently, when no such Trainer is found.

What the folder cannot know. config.json is lorasens's config schema filled with what the Trainer, the PEFT model
and the phase callback say (batch size, learning rate, LoRA rank, schedule...). What a training script does not
tell (the dataset, its max_length, the base model's name unless `model_name` is given) is listed under
`recorded_by.unknown_fields` in config.json and summary.json; the report shows those settings as unknown.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import torch
from transformers import Trainer, TrainerCallback

from lorasens.analysis import post
from lorasens.analysis.gradient_recorder import GradientTrackingCallback, RowListener
from lorasens.config import (
    EvaluationConfig,
    ExperimentConfig,
    LoraSettings,
    ModelConfig,
    OutputConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainingConfig,
    DataConfig,
    field_type,
)
from lorasens.errors import UserError
from lorasens.experiment.lifecycle import attach_file_log, detach_file_log, finish, save_final_model, summary_head
from lorasens.model.lora import LoraParams, ModuleMapSpec, lora_of_model, lora_target
from lorasens.model.module_map import ModuleMap
from lorasens.presentation import report
from lorasens.rundir import replace_run_dir
from lorasens.rundir.files import CONFIG_FILE, PHASES, RECORDED_BY
from lorasens.safeio import write_json
from lorasens.training.context import AfterTrainingStep, RunContext
from lorasens.training.phases import PhaseScheduleCallback
from lorasens.training.trainer import DivergenceCallback, RunState, TrainLogCallback

logger = logging.getLogger(__name__)

WHO = "SensitivityCallback"
# The value of a text setting a training script does not tell (e.g. the dataset); listed in unknown_fields too.
UNKNOWN = "unknown"
# What a user script's run does after training (lorasens train runs its own steps, evaluation first).
SCRIPT_STEPS: tuple[AfterTrainingStep, ...] = (post.analyze_after_training, report.report_after_training)


class SensitivityCallback(TrainerCallback):
    """Per-module LoRA gradients, importance, update magnitude, ablation and a recommended LoRA config for any
    Trainer. See the module docstring; the arguments:

    - `output_dir`: the run directory (refused if it already holds files, unless `overwrite=True`; a Trainer
      resumed from a checkpoint continues the files in it).
    - `module_map`: None (from the base model's architecture), or {"attn": [...], "mlp": [...]} module names for an
      architecture lorasens does not know, or a `ModuleMap`.
    - `validation_data`: held-out tokenised examples (a datasets.Dataset or a list of dicts with `input_ids` and
      `labels`, -100 on tokens without loss; without `labels` every token counts) for the ablation and the
      first-order estimate (what `lorasens train` computes on its analysis split); default: the Trainer's
      `eval_dataset` when it is tokenised. Without either, both are skipped (the recorded measures still rank).
    - `tracking`: what is measured and how the recommendation is budgeted (`lorasens.config.TrackingConfig`: the
      `--track_*`, `--ablation*`, `--budget*`, `--allocate`, `--min_rank` settings).
    - `model_name`: how lorasens can load the base model again (alias, Hub id or path), for `lorasens analyze`;
      default: the model's `name_or_path`.
    - `trainer`: the Trainer, when you have it (else found when training begins, see the module docstring).
    """

    def __init__(
        self,
        output_dir: str | Path,
        module_map: ModuleMapSpec = None,
        validation_data=None,
        *,
        trainer: Trainer | None = None,
        tokenizer=None,
        tracking: TrackingConfig | None = None,
        model_name: str | None = None,
        overwrite: bool = False,
    ):
        self.run_dir = Path(output_dir)
        self.module_map_spec = module_map
        self.validation_data = validation_data
        self.tracking = tracking if tracking is not None else TrackingConfig()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.overwrite = overwrite
        self._get_trainer: Callable[[], Trainer | None] = (lambda: trainer) if trainer is not None else (lambda: None)
        # Set by `for_run` (lorasens train): the run's context; the orchestrator prepared the folder, wrote
        # config.json and runs the after-training steps itself.
        self._run: RunContext | None = None
        self.after_training: tuple[AfterTrainingStep, ...] = SCRIPT_STEPS
        self._listeners: list[tuple[str, RowListener]] = []
        self.run_state: RunState | None = None
        self.module_map: ModuleMap | None = None
        self.lora: list[LoraParams] = []
        self.train_log: TrainLogCallback | None = None
        self.tracker: GradientTrackingCallback | None = None
        self.trainer: Trainer | None = None
        self.phases: PhaseScheduleCallback | None = None
        self.cfg: ExperimentConfig | None = None
        self.unknown_fields: list[str] = []
        self.analysis_features: list[dict] = []  # held-out examples for the ablation and first-order estimate
        self._log_handler: logging.Handler | None = None
        self._started = 0.0
        self.divergence: DivergenceCallback | None = None

    @classmethod
    def for_run(cls, ctx: RunContext) -> "SensitivityCallback":
        """The callback `lorasens train` uses (its context knows the config, the module map and the phase state)."""
        callback = cls(ctx.run_dir, module_map=ctx.module_map, tracking=ctx.cfg.tracking, tokenizer=ctx.tokenizer)
        callback._run = ctx
        callback._get_trainer = lambda: ctx.trainer
        callback.run_state = ctx.state
        return callback

    def attach(self, trainer: Trainer) -> "SensitivityCallback":
        """Name the Trainer explicitly (and add this callback to it if it is not there yet)."""
        self._get_trainer = lambda: trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- what the tensorboard scalars subscribe to -----------------------------------------------------------------

    @property
    def writers(self) -> dict:
        return self.tracker.writers if self.tracker is not None else {}

    def add_listener(self, kind: str, listener: RowListener) -> None:
        """Group / layer rows of the gradient tracker, as `GradientTrackingCallback.add_listener`."""
        if self.tracker is not None:
            self.tracker.add_listener(kind, listener)
        else:
            self._listeners.append((kind, listener))

    # -- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._started = time.time()
        trainer = self._get_trainer() or find_trainer(self)
        if trainer is None:
            raise UserError(f"{WHO}: cannot find the Trainer that is training (it does not pass itself to callbacks); "
                            "pass SensitivityCallback(..., trainer=trainer) or call callback.attach(trainer)")
        self.trainer = trainer
        self.module_map, self.lora = lora_of_model(model, self.module_map_spec, WHO)
        self.phases = next((c for c in trainer.callback_handler.callbacks if isinstance(c, PhaseScheduleCallback)), None)
        if self.run_state is None:
            self.run_state = self.phases.state if self.phases is not None else RunState(phase=lora_target(self.lora))
        if self.tokenizer is None:
            self.tokenizer = find_tokenizer(processing_class, trainer)
        if getattr(args, "logging_nan_inf_filter", False):
            # The Trainer's default logs a NaN/inf loss as the mean of the earlier ones (0.0 on a first bad step),
            # which hides a diverged run; the true loss is logged (null in train_log.jsonl) and marks the run diverged.
            args.logging_nan_inf_filter = False
            logger.info("%s: logging the true loss (logging_nan_inf_filter off) so a diverged run shows", WHO)
        self.divergence = DivergenceCallback([p for lp in self.lora for p in (lp.A, lp.B)])
        if self._run is None:
            self.analysis_features = self._validation_features(trainer)
            self.cfg, self.unknown_fields = recorded_config(self, args, state, model)
            if state.is_world_process_zero:
                self._prepare_run_dir(args, state)
        main = state.is_world_process_zero
        if main and self.phases is not None and self.phases.path is None:
            # phases.json beside the other files; written now if the phase callback already entered its first phase.
            self.phases.path = self.run_dir / PHASES
            if self.phases.transitions:
                write_json(self.phases.path, self.phases.summary())
        self.train_log = TrainLogCallback(self.run_dir, self.run_state)
        self.train_log.on_train_begin(args, state, control, **kwargs)
        t = self.tracking
        if t.track_gradients or t.track_importance or t.track_update_magnitude:
            self.tracker = GradientTrackingCallback(self.run_dir, self.lora, self.run_state, t, lambda: trainer)
            for kind, listener in self._listeners:
                self.tracker.add_listener(kind, listener)
            self._listeners.clear()
            self.tracker.on_train_begin(args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self.train_log.on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self.train_log.on_step_end(args, state, control, **kwargs)
        self._check_divergence("on_step_end", args, state, control, **kwargs)
        if self.tracker is not None:
            self.tracker.on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.train_log.on_log(args, state, control, logs=logs, **kwargs)
        self._check_divergence("on_log", args, state, control, logs=logs, **kwargs)

    def _check_divergence(self, event, args, state, control, **kwargs) -> None:
        """Marks the run diverged at the first non-finite loss, gradient norm or LoRA weight (the training it
        observes goes on: a callback never stops it); _finish then writes no recommendation."""
        if self._run is not None or self.divergence is None or self.divergence.step is not None:
            return  # lorasens train has its own DivergenceCallback, which stops the run
        probe = type(control)(**dataclasses.asdict(control)) if dataclasses.is_dataclass(control) else control
        getattr(self.divergence, event)(args, state, probe, **kwargs)
        if self.divergence.step is not None:
            logger.warning("%s: training diverged at step %d (%s); the run is marked diverged and gets no "
                           "recommendation", WHO, self.divergence.step, self.divergence.reason)

    def on_save(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.on_save(args, state, control, **kwargs)

    def flush(self) -> None:
        """Write the buffered CSV rows now (lorasens train calls it when training stops on an exception)."""
        if self.tracker is not None:
            self.tracker.flush()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        try:
            if self.tracker is not None:
                self.tracker.on_train_end(args, state, control, **kwargs)
            if self._run is None and state.is_world_process_zero:
                self._finish(state, model)
        finally:
            detach_file_log(self._log_handler)
            self._log_handler = None

    # -- a user script's run directory -----------------------------------------------------------------------------

    def _prepare_run_dir(self, args, state) -> None:
        """As `lorasens train`: never mix two runs in one folder, never delete a folder that is not a run."""
        run_dir, resumed = self.run_dir, state.global_step > 0
        if resumed and not (run_dir / CONFIG_FILE).exists():
            raise UserError(f"{WHO}: the Trainer resumes from a checkpoint but {run_dir} holds no run to continue "
                            f"(no {CONFIG_FILE})")
        # The Trainer's own output_dir may already exist inside the run directory (checkpoints/, as lorasens train
        # keeps them); empty, it is no sign of an earlier run.
        trainer_dir = Path(args.output_dir).resolve()
        earlier = [p for p in run_dir.iterdir() if not (p.resolve() == trainer_dir and not any(p.iterdir()))] \
            if run_dir.is_dir() else []
        if earlier and not resumed:
            if not self.overwrite:
                raise UserError(f"{WHO}: {run_dir} already holds files ({earlier[0].name}, ...); pass overwrite=True "
                                "to replace that run, or choose another output_dir")
            if not (run_dir / CONFIG_FILE).exists():
                raise UserError(f"{WHO}: {run_dir} is not empty and is not a lorasens run directory (no "
                                f"{CONFIG_FILE}); refusing to delete it")
            replace_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {**self.cfg.to_dict(), RECORDED_BY: self.recorded_by()}
        write_json(self.run_dir / CONFIG_FILE, config)
        self._log_handler = attach_file_log(self.run_dir)

    def recorded_by(self) -> dict:
        return {"recorder": f"lorasens.{WHO}", "trainer": type(self.trainer).__name__,
                "unknown_fields": list(self.unknown_fields)}

    def _validation_features(self, trainer: Trainer) -> list[dict]:
        data, explicit = self.validation_data, self.validation_data is not None
        if data is None:
            data = trainer.eval_dataset
            if isinstance(data, dict):
                logger.warning("%s: the Trainer has several eval datasets; the ablation uses none of them (pass "
                               "validation_data=...)", WHO)
                return []
        features = tokenised_features(data, explicit)
        if features and self.tokenizer is None:  # an optional analysis never stops the training it observes
            logger.warning("%s: no tokenizer found (not passed, no processing_class, none in the data collator); the "
                           "ablation and first-order estimate are skipped: pass tokenizer=... to get them", WHO)
            return []
        if not features and self.tracking.ablation:
            logger.info("%s: no tokenised validation data; the ranking uses the gradient measures only (no ablation)",
                        WHO)
        return features

    def _finish(self, state, model) -> None:
        """After training (main process): the adapter, the analysis, the report and summary.json, as a run does
        (the same `lifecycle` stages as `lorasens train`)."""
        save_final_model(model, self.tokenizer, self.run_dir)
        schedule = self.phases.schedule if self.phases is not None else None
        ctx = RunContext(cfg=self.cfg, run_dir=self.run_dir, model=model, tokenizer=self.tokenizer,
                         module_map=self.module_map, lora=self.lora, state=self.run_state, schedule=schedule,
                         val_features=[], analysis_features=self.analysis_features, trainer=self.trainer)
        ctx.summary.update(summary_head(
            self.run_dir, model=self.cfg.model.model, module_map=self.module_map, lora_modules=len(self.lora),
            trainable_params=sum(p.A.numel() + p.B.numel() for p in self.lora), steps=state.global_step,
            final_model_from="the model at train end (as the Trainer left it)",
            train_data={"examples": _length(self.trainer.train_dataset)},
            validation_data={"examples": _length(self.trainer.eval_dataset)},
            analysis_data={"examples": len(self.analysis_features)}, runtime_s=time.time() - self._started,
            recorded_by=self.recorded_by()))
        steps = self.after_training
        if self.divergence is not None and self.divergence.step is not None:
            ctx.summary["diverged"] = {"step": self.divergence.step, "reason": self.divergence.reason}
            # Rankings of NaN measures recommend nothing: no sensitivity analysis, no recommendation.
            steps = tuple(s for s in steps if s is not post.analyze_after_training)
        finish(ctx, steps, self._started)
        logger.info("%s: run directory %s written", WHO, self.run_dir)


def find_tokenizer(processing_class, trainer: Trainer):
    """The tokenizer where a Trainer keeps it: its processing_class (a processor's .tokenizer), else its data
    collator's `tokenizer` (DataCollatorForLanguageModeling(tok) with no processing_class); None if neither."""
    for holder in (processing_class, getattr(trainer, "processing_class", None),
                   getattr(getattr(trainer, "data_collator", None), "tokenizer", None)):
        if holder is not None:
            return getattr(holder, "tokenizer", holder)
    return None


def find_trainer(callback: TrainerCallback) -> Trainer | None:
    """The Trainer whose event is running: the first `self` up the call stack that is a Trainer holding `callback`.

    Events are called by the Trainer's CallbackHandler from inside a Trainer method, so that frame is a few levels up.
    Requiring that the Trainer holds this callback keeps another Trainer further up the stack from being taken."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def tokenised_features(data, explicit: bool) -> list[dict]:
    """Rows {input_ids, labels} from a datasets.Dataset or a sequence of dicts; [] for None, or for untokenised
    data that was not asked for explicitly (the Trainer's own eval_dataset of raw text)."""
    if data is None:
        return []
    rows = data.to_list() if hasattr(data, "to_list") else list(data)
    if not rows:
        return []
    if not isinstance(rows[0], dict) or "input_ids" not in rows[0]:
        if not explicit:
            return []
        raise UserError(f"{WHO}: validation_data must be tokenised: rows with input_ids (and labels, -100 on tokens "
                        "without loss)")
    features = []
    for row in rows:
        ids = [int(i) for i in row["input_ids"]]
        labels = row.get("labels")
        features.append({"input_ids": ids, "labels": [int(i) for i in labels] if labels is not None else list(ids)})
    return features


def recorded_config(callback: SensitivityCallback, args, state, model) -> tuple[ExperimentConfig, list[str]]:
    """lorasens's config for a run it did not start, from what the Trainer, the PEFT model and the phase callback
    tell, and the names (section.field) of the settings nobody told it (stored with their default or "unknown")."""
    unknown: list[str] = []
    base = model.get_base_model()
    peft_config = model.peft_config[model.active_adapter]
    name = callback.model_name or getattr(getattr(base, "config", None), "_name_or_path", "") or ""
    if not name:
        unknown.append("model.model")
    spec = callback.module_map_spec if isinstance(callback.module_map_spec, dict) else {}
    dtype = next(base.parameters()).dtype
    model_cfg = ModelConfig(model=name or UNKNOWN,
                            attn_modules=",".join(spec["attn"]) if spec.get("attn") else None,
                            mlp_modules=",".join(spec["mlp"]) if spec.get("mlp") else None,
                            precision={torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "auto"))
    lora_cfg = LoraSettings(target=lora_target(callback.lora), r=int(peft_config.r),
                            lora_alpha=float(peft_config.lora_alpha), lora_dropout=float(peft_config.lora_dropout))
    max_length = getattr(args, "max_length", None)  # SFTConfig has it, TrainingArguments not
    if not isinstance(max_length, int) or max_length <= 0:
        unknown.append("data.max_length")
        max_length = DataConfig().max_length
    n_held_out = len(callback.analysis_features)
    n_eval = _length(callback.trainer.eval_dataset)
    if not n_eval:
        unknown.append("data.eval_samples")
    if not n_held_out:
        unknown.append("data.analysis_samples")
    unknown += ["data.dataset", "data.data_dir", "data.prompt_template"]
    data_cfg = DataConfig(dataset=UNKNOWN, max_length=max_length, eval_samples=n_eval or DataConfig().eval_samples,
                          analysis_samples=n_held_out or None)

    scheduler = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if scheduler not in _choices("training", "lr_scheduler"):
        unknown.append("training.lr_scheduler")
        scheduler = TrainingConfig().lr_scheduler
    report_to = [r for r in (args.report_to or []) if r != "none"]
    report = report_to[0] if report_to and report_to[0] in _choices("training", "report_to") else "none"
    warmup = args.warmup_steps if args.warmup_steps >= 1 else args.warmup_steps * state.max_steps  # a ratio below 1
    training_cfg = TrainingConfig(
        batch_size=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
        max_steps=state.max_steps, lr=args.learning_rate, lr_scheduler=scheduler, warmup_steps=int(warmup),
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or 0.0, seed=args.seed,
        eval_steps=_every_n_steps(args.eval_strategy, args.eval_steps),
        save_steps=_every_n_steps(args.save_strategy, args.save_steps),
        logging_steps=max(1, int(args.logging_steps)) if args.logging_steps >= 1 else 1,
        gradient_checkpointing=bool(getattr(args, "activation_checkpointing", False)), report_to=report)
    if args.logging_steps < 1:
        unknown.append("training.logging_steps")  # a ratio of the run; the train log has the steps
    phases = callback.phases
    schedule_cfg = ScheduleConfig()
    if phases is not None:
        schedule = phases.schedule
        schedule_cfg = ScheduleConfig(
            phase_strategy=phases.strategy,
            phase_ends=None if schedule is None or schedule.lisa or len(schedule.ends) < 2
            else ",".join(str(e) for e in schedule.ends[:-1]),
            reset_optimizer_on_switch=phases.reset_optimizer)
        if schedule is None:  # the phase callback runs after this one and has not parsed its ends yet
            schedule_cfg = ScheduleConfig(phase_strategy=phases.strategy, phase_ends=phases.phase_ends,
                                          phase1_end=phases.phase1_end, phase2_end=phases.phase2_end,
                                          reset_optimizer_on_switch=phases.reset_optimizer)
    tracking = callback.tracking
    if not n_held_out and tracking.ablation:
        tracking = dataclasses.replace(tracking, ablation=False)  # no data to ablate on: config.json says so
    cfg = ExperimentConfig(
        model=model_cfg, lora=lora_cfg, data=data_cfg, training=training_cfg, schedule=schedule_cfg,
        tracking=tracking,
        evaluation=EvaluationConfig(evaluate=False),
        output=OutputConfig(output_dir=str(callback.run_dir.parent), experiment_name=callback.run_dir.name),
    )
    return cfg, unknown


def _every_n_steps(strategy, value) -> int:
    """`--eval_steps` / `--save_steps` from a Trainer strategy: N for "steps" every N >= 1, else 0 (never / other)."""
    if str(getattr(strategy, "value", strategy)) != "steps" or not value or value < 1:
        return 0
    return int(value)


def _choices(section: str, name: str) -> tuple:
    return get_args(field_type(section, name))


def _length(data) -> int | None:
    """Examples in a dataset; None when unknown (None, an IterableDataset, several named eval datasets)."""
    if isinstance(data, dict):
        return None
    try:
        return len(data)
    except TypeError:  # an IterableDataset
        return None

