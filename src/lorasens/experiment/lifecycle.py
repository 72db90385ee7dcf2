"""One run's lifecycle, shared by `lorasens train` (`run.run_experiment`) and `SensitivityCallback` in a user's
own training script. Each driver prepares its folder its own way (the CLI from a config, the callback from what the
Trainer tells it) and trains; from there the stages are the same functions:

    attach_file_log -> [train] -> save_final_model -> summary_head -> finish (after-training steps, summary.json)

`summary_head` is the one place the summary's keys are built; `finish` runs the after-training steps
(evaluation, analysis, report) in order and writes summary.json last, so its presence means "the run finished".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lorasens.model.module_map import ModuleMap
from lorasens.presentation.plots import plot_training_loss
from lorasens.rundir.files import FINAL_MODEL, RECORDED_BY, RUN_LOG, SUMMARY_FILE
from lorasens.rundir.metrics import read_run_metrics
from lorasens.safeio import write_json
from lorasens.training.context import AfterTrainingStep, RunContext

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def attach_file_log(run_dir: Path) -> logging.Handler:
    """Copy the package's log records to RUN_DIR/run.log (until `detach_file_log`)."""
    handler = logging.FileHandler(Path(run_dir) / RUN_LOG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger("lorasens").addHandler(handler)
    return handler


def detach_file_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("lorasens").removeHandler(handler)
        handler.close()


def save_final_model(model, tokenizer, run_dir: Path) -> None:
    """final_model/: the adapter (PEFT layout) and the tokenizer beside it."""
    model.save_pretrained(Path(run_dir) / FINAL_MODEL)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(Path(run_dir) / FINAL_MODEL)


def summary_head(run_dir: Path, *, model: str, module_map: ModuleMap, lora_modules: int, trainable_params: int,
                 steps: int, final_model_from: str, train_data: dict, validation_data: dict, runtime_s: float,
                 adapter: dict | None = None, analysis_data: dict | None = None, packing: dict | None = None,
                 labelled_head: dict | None = None, recorded_by: dict | None = None) -> dict:
    """The summary's entries known when training has ended (draws training_loss.png; the loss figures come from the
    logs, `rundir.metrics`). Optional entries are left out when None."""
    plot_training_loss(run_dir)
    metrics = read_run_metrics(run_dir)
    entries = {
        "run_dir": str(run_dir),
        "model": model,
        "architecture": module_map.architecture,
        "num_layers": module_map.num_layers,
        "lora_modules": lora_modules,
        "trainable_params": trainable_params,
        "adapter": adapter,
        "steps": steps,
        "final_train_loss": metrics.final_train_loss,
        "final_eval_loss": metrics.final_eval_loss,
        "best_eval_loss": metrics.best_eval_loss,
        "late_eval_fall": metrics.late_eval_fall,
        "final_model_from": final_model_from,
        "train_data": train_data,
        "validation_data": validation_data,
        "analysis_data": analysis_data,
        "train_runtime_s": round(runtime_s, 2),
        "packing": packing,
        "labelled_head": labelled_head,
        RECORDED_BY: recorded_by,
    }
    optional = ("adapter", "analysis_data", "packing", "labelled_head", RECORDED_BY)
    return {k: v for k, v in entries.items() if not (k in optional and v is None)}


def finish(ctx: RunContext, after_training: tuple[AfterTrainingStep, ...], started: float) -> dict:
    """Run the after-training steps in order (each adds its summary entries), then write summary.json, last."""
    for step in after_training:
        ctx.summary.update(step(ctx) or {})
    ctx.summary["wall_time_s"] = round(time.time() - started, 2)
    write_json(ctx.run_dir / SUMMARY_FILE, ctx.summary)
    return ctx.summary
