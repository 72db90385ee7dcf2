"""`RunContext`: what the steps of one experiment share (the orchestrator builds it, callbacks and steps read it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Trainer

from lorasens.config import ExperimentConfig
from lorasens.model.lora import LoraParams
from lorasens.model.module_map import ModuleMap
from lorasens.model.schedule import Schedule
from lorasens.training.trainer import RunState


@dataclass
class RunContext:
    cfg: ExperimentConfig
    run_dir: Path
    model: torch.nn.Module  # the PeftModel being trained
    tokenizer: PreTrainedTokenizerBase
    module_map: ModuleMap
    lora: list[LoraParams]  # every LoRA module of the run, module-map order
    state: RunState  # the current phase, shared by the callbacks
    schedule: Schedule | None  # None for a static run
    val_features: list[dict]  # tokenised validation examples (validation loss, best checkpoint)
    analysis_features: list[dict] = field(default_factory=list)  # the analysis split (ablation, first-order)
    trainer: Trainer | None = None  # set once built; callbacks may rely on it from on_train_begin
    summary: dict = field(default_factory=dict)  # summary.json so far: each after-training step adds to it


# One step after training (evaluate, analyse, report): reads the context, returns entries for summary.json.
AfterTrainingStep = Callable[[RunContext], "dict | None"]
