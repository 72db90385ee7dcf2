"""`RunContext`: one run as an object. `lorasens train` and `SensitivityCallback` build it while training (the steps
after training share it); `load_run` rebuilds it from a finished run's folder for `eval`, `analyze`, `validate` and
the Python API (then the training-only fields keep their defaults: no phase state, schedule, features or Trainer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, Trainer

from lorasens.config import ExperimentConfig
from lorasens.errors import UserError
from lorasens.model.loading import load_model
from lorasens.model.lora import LoraParams, lora_parameters
from lorasens.model.module_map import ModuleMap, build_module_map
from lorasens.model.schedule import Schedule
from lorasens.rundir.files import FINAL_MODEL
from lorasens.rundir.load import adapter_problem, read_run_config, require_known
from lorasens.training.trainer import RunState


@dataclass
class RunContext:
    cfg: ExperimentConfig
    run_dir: Path
    model: torch.nn.Module  # the PeftModel being trained (loaded: the final adapter, or the base model; eval mode)
    tokenizer: PreTrainedTokenizerBase
    module_map: ModuleMap
    lora: list[LoraParams]  # every LoRA module of the run, module-map order
    # Training only (a loaded run leaves the defaults):
    state: RunState | None = None  # the current phase, shared by the callbacks
    schedule: Schedule | None = None  # None for a static run
    val_features: list[dict] = field(default_factory=list)  # tokenised validation examples (loss, best checkpoint)
    analysis_features: list[dict] = field(default_factory=list)  # the analysis split (ablation, first-order)
    trainer: Trainer | None = None  # set once built; callbacks may rely on it from on_train_begin
    summary: dict = field(default_factory=dict)  # summary.json so far: each after-training step adds to it


# One step after training (evaluate, analyse, report): reads the context, returns entries for summary.json.
AfterTrainingStep = Callable[[RunContext], "dict | None"]


def load_run(run_dir: str | Path, adapter: bool = True) -> RunContext:
    """A finished run from its folder: the base model of its config.json + `final_model/` (with `adapter`)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    require_known(run_dir, {"model.model"}, "its base model cannot be loaded again (give "
                  "SensitivityCallback(model_name=...) the name lorasens loads it by)")
    loaded = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed, quantize=cfg.model.quantize)
    module_map = build_module_map(loaded.model, cfg.model.attn_modules, cfg.model.mlp_modules)
    model = loaded.model
    if adapter:
        if not (run_dir / FINAL_MODEL).is_dir():
            raise UserError(f"{run_dir} has no {FINAL_MODEL}/ adapter (did the run finish?)")
        problem = adapter_problem(run_dir / FINAL_MODEL)
        if problem:
            raise UserError(f"{run_dir / FINAL_MODEL}: {problem}; rerun the training (--resume from a checkpoint)")
        model = PeftModel.from_pretrained(model, run_dir / FINAL_MODEL)
    model.eval()
    lora = lora_parameters(model, module_map) if adapter else []
    return RunContext(cfg=cfg, run_dir=run_dir, model=model, tokenizer=loaded.tokenizer, module_map=module_map,
                      lora=lora)
