"""The experiment, step by step: config -> model -> LoRA -> data -> train -> save -> evaluate -> analyse -> report."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import set_seed

from lorasens.analysis import post
from lorasens.config import ExperimentConfig, resumable_fields, save_config
from lorasens.data.features import FeatureStats
from lorasens.data.prepare import TRAINING_SPLITS, prepare
from lorasens.data.registry import get_dataset_spec
from lorasens.errors import Interrupted, TrainingDiverged, UserError
from lorasens.evaluation import runner
from lorasens.experiment.lifecycle import attach_file_log, detach_file_log, finish, save_final_model, summary_head
from lorasens.experiment.script_callback import SensitivityCallback
from lorasens.metrics import ensure_meteor_ready
from lorasens.model.loading import LoadedModel, load_model
from lorasens.model.lora import (Placement, apply_lora, apply_placement, load_placement, lora_parameters, set_trainable,
                           targets_for)
from lorasens.model.module_map import ModuleMap, build_module_map
from lorasens.model.schedule import Schedule, parse_schedule_from_config
from lorasens.presentation import report
from lorasens.presentation.tensorboard_scalars import tensorboard_callbacks
from lorasens.rundir import check_run_dir, replace_run_dir
from lorasens.rundir.files import ADAPTER_WEIGHTS, CONFIG_FILE, FINAL_MODEL
from lorasens.rundir.load import adapter_problem, read_run_config
from lorasens.rundir.lock import hold_run_lock
from lorasens.training.context import AfterTrainingStep, RunContext
from lorasens.training.peft_methods import (AdaLoraAllocationCallback, adalora_effective_params,
                                            initialize_eva_from_features, kept_ranks)
from lorasens.training.phases import PhaseScheduleCallback
from lorasens.training.trainer import (
    BestAdapterCallback,
    DivergenceCallback,
    RunState,
    build_trainer,
    checkpoint_step,
    decide_head,
    decide_packing,
    latest_checkpoint,
)

logger = logging.getLogger(__name__)

# What happens after training, in order; each step adds to summary.json. Tests and scripts pass their own.
DEFAULT_STEPS: tuple[AfterTrainingStep, ...] = (
    runner.evaluate_after_training,
    post.analyze_after_training,
    report.report_after_training,
)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def run_experiment(
    cfg: ExperimentConfig,
    callbacks: list | tuple = (),
    after_training: tuple[AfterTrainingStep, ...] = DEFAULT_STEPS,
) -> RunResult:
    """Run one experiment. `callbacks` are added to the Trainer (the extension point for users);
    `after_training` are the steps run on the trained model (evaluation, analysis, report by default).

    The run directory is locked for the whole run (one writer per run); an interruption (Ctrl-C, SIGTERM) becomes
    `Interrupted` carrying how to continue the run."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    with hold_run_lock(cfg.run_dir, create=True) if main_process else contextlib.nullcontext():
        try:
            return _run_experiment(cfg, callbacks, after_training)
        except KeyboardInterrupt as exc:
            raise Interrupted(getattr(exc, "signum", 2), _resume_hint(cfg)) from None


def _resume_hint(cfg: ExperimentConfig) -> str:
    if not (cfg.run_dir / CONFIG_FILE).exists():
        return "nothing was written; start the run again"
    if latest_checkpoint(cfg.run_dir) is None:
        return f"no checkpoint was written (--save_steps {cfg.training.save_steps}); start again with --overwrite"
    return f"continue with: lorasens train --config {cfg.run_dir / CONFIG_FILE} --resume"


@dataclass
class RunInputs:
    """Everything a run loads before it touches its folder: any of it can still fail on user input."""

    loaded: LoadedModel
    module_map: ModuleMap
    schedule: Schedule | None
    placement: Placement | None
    lora_modules: list
    train_features: list[dict]
    train_stats: FeatureStats
    val_features: list[dict]
    val_stats: FeatureStats
    analysis_features: list[dict]


def _run_experiment(cfg: ExperimentConfig, callbacks: list | tuple, after_training: tuple[AfterTrainingStep, ...]) -> RunResult:
    """The stages of a run: check the folder -> load model, modules and data -> prepare the folder -> LoRA and the
    run's context -> Trainer and its callbacks -> train -> save final_model -> summary head -> after-training steps
    and summary.json (`lifecycle`, shared with SensitivityCallback in a user's script)."""
    started = time.time()
    run_dir = cfg.run_dir
    # Under torchrun every process runs this; only the main one (RANK 0, known before the process group exists)
    # checks and prepares the run directory: another rank could see the folder rank 0 just created as "a run".
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        check_run_dir(run_dir, cfg.output.overwrite, cfg.output.resume)
    checkpoint = _checkpoint_to_resume(cfg, run_dir) if cfg.output.resume else None
    set_seed(cfg.training.seed)
    inputs = _load_inputs(cfg)
    # Only rank 0 writes, else --overwrite has two processes deleting and writing the same files at once.
    if main_process:
        _prepare_folder(cfg, run_dir)
    log_handler = attach_file_log(run_dir) if main_process else logging.NullHandler()
    try:
        ctx = _run_context(cfg, run_dir, inputs)
        trainer_callbacks, best, divergence, allocation = _trainer_callbacks(ctx, inputs, callbacks)
        packing = decide_packing(ctx.model, ctx.tokenizer, inputs.train_features, cfg.training.packing,
                                 cfg.training.batch_size)
        head = decide_head(ctx.model, ctx.tokenizer, inputs.train_features, packing)
        ctx.trainer = build_trainer(cfg, run_dir, ctx.model, ctx.tokenizer, inputs.train_features,
                                    inputs.val_features if cfg.training.eval_steps else None, trainer_callbacks,
                                    packing, head)
        final_source, runtime = _train(ctx, checkpoint)
        if divergence.step is not None:
            raise TrainingDiverged(
                f"training diverged at step {divergence.step}: {divergence.reason}; stopped there (no final_model, "
                f"analysis or report). Logs up to that step and earlier checkpoints are kept in {run_dir}. Lower --lr "
                "or keep --max_grad_norm > 0")
        if ctx.trainer.is_fsdp_enabled:
            _gather_sharded_adapter(ctx, inputs, best)
        if not ctx.trainer.is_world_process_zero():
            return RunResult(run_dir, {})
        if best.best_state is not None and cfg.training.final_adapter == "best":
            set_peft_model_state_dict(ctx.model, best.best_state)
            final_source = f"best validation loss (step {best.best_step})"
        save_final_model(ctx.model, ctx.tokenizer, run_dir)
        ctx.summary.update(summary_head(
            run_dir, model=inputs.loaded.source, module_map=inputs.module_map, lora_modules=len(inputs.lora_modules),
            trainable_params=sum(lp.numel() for lp in ctx.lora),
            adapter=_adapter_summary(inputs.placement, ctx.model, allocation), steps=ctx.trainer.state.global_step,
            final_model_from=final_source, train_data=inputs.train_stats.as_dict(),
            validation_data=inputs.val_stats.as_dict(), runtime_s=runtime, packing=packing.as_dict(),
            labelled_head=head.as_dict()))
        return RunResult(run_dir, finish(ctx, after_training, started))
    finally:
        detach_file_log(log_handler)


def _load_inputs(cfg: ExperimentConfig) -> RunInputs:
    """Model, module map, placement or schedule, and the data: everything that can still fail on user input,
    before the run directory is touched."""
    loaded = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed, quantize=cfg.model.quantize)
    module_map = build_module_map(loaded.model, cfg.model.attn_modules, cfg.model.mlp_modules)
    schedule: Schedule | None = None
    placement: Placement | None = None
    if cfg.lora.placement:
        placement = load_placement(cfg.lora.placement, loaded.model, module_map)
        _check_placement_method(cfg, placement)
        lora_modules = placement.modules
    elif cfg.schedule.phase_strategy:
        schedule = parse_schedule_from_config(cfg, module_map=module_map)
        lora_modules = schedule.all_modules(module_map)
    else:
        lora_modules = targets_for(module_map, cfg.lora.target)
    # The analysis split (ablation, first-order estimate) is held out of train, disjoint from validation and test.
    prepared = prepare(cfg.data, loaded.tokenizer, cfg.training.seed)
    train_features, val_features, analysis_features = (prepared.features[s] for s in TRAINING_SPLITS)
    train_stats, val_stats = prepared.stats["train"], prepared.stats["validation"]
    if not train_features:
        raise UserError(f"no training example fits --max_length {cfg.data.max_length}; raise it")
    if cfg.evaluation.evaluate and get_dataset_spec(cfg.data.dataset).evaluation.needs_meteor:
        ensure_meteor_ready()  # METEOR needs Java (else WordNet for meteor_nltk): fail now, not after an hour of training
    if not val_features and (cfg.training.eval_steps or cfg.tracking.ablation):
        raise UserError(
            f"no validation example fits --max_length {cfg.data.max_length}; raise it, or use --eval_steps 0 --ablation false"
        )
    return RunInputs(loaded, module_map, schedule, placement, lora_modules, train_features, train_stats,
                     val_features, val_stats, analysis_features)


def _prepare_folder(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Every input is validated: only now is an old run replaced (--overwrite) and config.json written."""
    if cfg.output.overwrite:
        replace_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)


def _run_context(cfg: ExperimentConfig, run_dir: Path, inputs: RunInputs) -> RunContext:
    """LoRA (or the placement's adapter) on the model, every LoRA parameter trainable, and the run's context."""
    placement = inputs.placement
    if placement is not None:
        model = apply_placement(inputs.loaded.model, placement, cfg.lora.lora_dropout)
        if placement.eva:
            # On the first training batches, before lora_parameters: PEFT replaces the LoRA layers (new ranks
            # with rho > 1). A resumed run then loads its trained weights over these.
            initialize_eva_from_features(model, inputs.train_features, inputs.loaded.tokenizer, cfg.training.batch_size)
    else:
        model = apply_lora(inputs.loaded.model, inputs.lora_modules, cfg.lora.r, cfg.lora.lora_alpha,
                           cfg.lora.lora_dropout)
    lora = lora_parameters(model, inputs.module_map)
    # All LoRA parameters of every phase require grad now, so the Trainer's optimizer holds all of them.
    set_trainable(model, lora, inputs.lora_modules)
    return RunContext(cfg=cfg, run_dir=run_dir, model=model, tokenizer=inputs.loaded.tokenizer,
                      module_map=inputs.module_map, lora=lora, state=RunState(phase=cfg.lora.target),
                      schedule=inputs.schedule, val_features=inputs.val_features,
                      analysis_features=inputs.analysis_features)


def _trainer_callbacks(ctx: RunContext, inputs: RunInputs, callbacks: list | tuple):
    """The Trainer's callbacks: (all of them, the best-adapter keeper, the divergence guard, AdaLoRA's allocator)."""
    cfg, model = ctx.cfg, ctx.model
    best = BestAdapterCallback(lambda: get_peft_model_state_dict(model))
    divergence = DivergenceCallback([p for lp in ctx.lora for p in lp.tensors()])
    # The public callbacks a user's own training script uses (lorasens.SensitivityCallback and
    # PhaseScheduleCallback): one implementation of logging, measuring and phase switching.
    sensitivity = SensitivityCallback.for_run(ctx)
    trainer_callbacks = [sensitivity, best, divergence]
    if ctx.schedule is not None:
        trainer_callbacks.append(PhaseScheduleCallback(ctx.schedule, output_dir=ctx.run_dir, module_map=ctx.module_map,
                                                       reset_optimizer_on_switch=cfg.schedule.reset_optimizer_on_switch,
                                                       run_state=ctx.state))
    trainer_callbacks.extend(tensorboard_callbacks(ctx, sensitivity))  # gradient norms as scalars (--report_to)
    allocation = None
    if inputs.placement is not None and inputs.placement.method == "adalora":
        allocation = AdaLoraAllocationCallback(model, inputs.placement.adalora_target_total_rank,
                                               inputs.placement.adalora_target_params)
        trainer_callbacks.append(allocation)
    trainer_callbacks.extend(callbacks)
    return trainer_callbacks, best, divergence, allocation


def _train(ctx: RunContext, checkpoint: Path | None) -> tuple[str, float]:
    """Train (or, resumed after training had finished, restore the trained adapter): (final_model_from, runtime)."""
    if checkpoint is not None and checkpoint_step(checkpoint) >= ctx.cfg.training.max_steps:
        return _restore_trained(ctx.model, ctx.trainer, checkpoint, ctx.run_dir), 0.0  # nothing left to train
    try:
        output = ctx.trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: keep what was measured, then stop
        _stop_callbacks(ctx.trainer)
        raise
    return "last step", output.metrics.get("train_runtime", 0.0)


def _gather_sharded_adapter(ctx: RunContext, inputs: RunInputs, best: BestAdapterCallback) -> None:
    """The LoRA factors are sharded: gather them on every rank (a collective), then rank 0 evaluates and analyses
    an unsharded copy of the base with the gathered adapter (the base itself never changed)."""
    from lorasens.analysis.sharding import full

    cfg, placement = ctx.cfg, inputs.placement
    state = {k: full(v).detach().clone() for k, v in get_peft_model_state_dict(ctx.model).items()}
    if best.best_state is not None:
        best.best_state = {k: full(v) for k, v in best.best_state.items()}
    if ctx.trainer.is_world_process_zero():
        base = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed, quantize=cfg.model.quantize)
        model = apply_lora(base.model, inputs.lora_modules, cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout,
                           placement.rank_pattern if placement else None,
                           placement.alpha_pattern if placement else None)
        set_peft_model_state_dict(model, state)
        ctx.model, ctx.lora = model, lora_parameters(model, inputs.module_map)


def _check_placement_method(cfg: ExperimentConfig, placement: Placement) -> None:
    """AdaLoRA prunes ranks while it trains: the per-module measures assume fixed LoRA factors, and its schedule is
    fixed by total_step, so both must agree with the run's settings."""
    if placement.method != "adalora":
        return
    tracking = [f"--{name}" for name in ("track_gradients", "track_importance", "track_update_magnitude", "ablation")
                if getattr(cfg.tracking, name)]
    if tracking:
        raise UserError(f"--placement {cfg.lora.placement} is an AdaLoRA config: its ranks change while it trains, so "
                        f"{', '.join(tracking)} cannot measure it; set them to false")
    if placement.config.total_step != cfg.training.max_steps:
        raise UserError(f"--placement {cfg.lora.placement}: AdaLoRA's total_step {placement.config.total_step} must "
                        f"equal --max_steps {cfg.training.max_steps}")
    if cfg.training.eval_steps and cfg.training.final_adapter == "best":
        raise UserError("an AdaLoRA placement needs --final_adapter last (an earlier adapter holds other ranks)")


def _adapter_summary(placement: Placement | None, model, allocation) -> dict:
    """What the adapter is: method, initialisation, and for AdaLoRA the ranks it kept."""
    if placement is None:
        return {"method": "lora", "init": "default"}
    if placement.method == "lora":
        return {"method": "lora", "init": "eva" if placement.eva else str(placement.config.init_lora_weights)}
    ranks = kept_ranks(model)
    return {"method": "adalora", "init_r": placement.r, "target_total_rank": allocation.target_total_rank,
            "kept_total_rank": sum(ranks.values()), "effective_params": adalora_effective_params(model),
            "kept_ranks": ranks, "total_rank_by_step": allocation.history}


def _stop_callbacks(trainer) -> None:
    """Training stopped by an exception (the Trainer then calls no on_train_end): buffered rows (gradient CSVs) are
    written, so the report can plot them, and the progress bar is closed, so the error is the last line printed."""
    for callback in trainer.callback_handler.callbacks:
        if callable(getattr(callback, "flush", None)):
            with contextlib.suppress(OSError):  # a full disk: the error being raised says so already
                callback.flush()
        if getattr(callback, "training_bar", None) is not None:
            callback.training_bar.close()
            callback.training_bar = None


def _restore_trained(model, trainer, checkpoint: Path, run_dir: Path) -> str:
    """--resume of a run whose training had finished (killed during evaluation, analysis or report): no training
    step; the adapter comes from its final_model (when complete) or else from the checkpoint."""
    source = run_dir / FINAL_MODEL
    if adapter_problem(source) is not None:
        source = checkpoint
    set_peft_model_state_dict(model, load_file(str(source / ADAPTER_WEIGHTS)))
    trainer.state.global_step = checkpoint_step(checkpoint)
    logger.info("--resume: %s is at step %d of %d, nothing left to train; redoing evaluation, analysis and report "
                "with the adapter of %s", checkpoint.name, trainer.state.global_step, trainer.args.max_steps, source.name)
    return f"{source.name} (resumed after training had finished)"


def _checkpoint_to_resume(cfg: ExperimentConfig, run_dir: Path) -> Path:
    saved = read_run_config(run_dir)
    differences = _config_differences(saved, cfg) - resumable_fields()
    if differences:
        raise UserError(f"--resume: settings differ from the saved run in {', '.join(sorted(differences))}; resume with the same settings")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"--resume: {run_dir} has no complete checkpoint (run with --save_steps N to write them)")
    if checkpoint_step(checkpoint) > cfg.training.max_steps:
        raise UserError(f"--resume: --max_steps {cfg.training.max_steps} is below the checkpoint's step "
                        f"({checkpoint.name}); give --max_steps >= {checkpoint_step(checkpoint)}")
    return checkpoint


def _config_differences(a: ExperimentConfig, b: ExperimentConfig) -> set[str]:
    da, db = a.to_dict(), b.to_dict()
    return {k for section in da if isinstance(da[section], dict) for k in da[section] if da[section][k] != db[section].get(k)}


def device_summary() -> str:
    if torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name(0)})"
    return f"CPU ({torch.get_num_threads()} threads)"
