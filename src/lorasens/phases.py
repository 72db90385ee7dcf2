"""Phase switching as a Trainer callback.

How freezing is done right (see docs/ARCHITECTURE.md):
- Every LoRA parameter of every phase requires grad when the Trainer builds its optimizer, so all of them are in
  the optimizer from step 0; the first phase's freezing is applied afterwards, in `on_train_begin`.
- Freezing goes through `lora.set_trainable`, which also sets `.grad = None`: AdamW skips parameters without a
  gradient, so a frozen parameter does not move at all (no weight decay, no momentum), bitwise.
- Non-reentrant activation checkpointing (set in training.py) keeps gradients flowing to trainable layers that
  follow frozen ones, and autograd never goes below the first layer that has a trainable parameter.
- The phase is derived from `state.global_step`, so `--resume` from a checkpoint lands in the right phase.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from lorasens.lora import LoraParams, set_trainable
from lorasens.module_map import ModuleMap
from lorasens.schedule import Schedule
from lorasens.training import RunState

logger = logging.getLogger(__name__)

PHASES_FILE = "phases.json"


class PhaseCallback(TrainerCallback):
    def __init__(
        self,
        schedule: Schedule,
        module_map: ModuleMap,
        lora: list[LoraParams],
        state: RunState,
        run_dir: Path | None = None,
        seed: int = 0,
        reset_optimizer_on_switch: bool = False,
    ):
        self.schedule = schedule
        self.module_map = module_map
        self.lora = lora
        self.state = state
        self.path = run_dir / PHASES_FILE if run_dir else None
        self.seed = seed
        self.reset_optimizer = reset_optimizer_on_switch
        self.current: int | None = None
        self.transitions: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.path and self.path.exists() and state.global_step:
            previous = json.loads(self.path.read_text())["transitions"]
            self.transitions = [t for t in previous if t["step"] < state.global_step]
        self._enter(self.schedule.phase_index(state.global_step), state, model, optimizer, is_world_zero=state.is_world_process_zero)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        index = self.schedule.phase_index(state.global_step)
        if index != self.current:
            self._enter(index, state, model, optimizer, is_world_zero=state.is_world_process_zero)

    def _enter(self, index: int, state, model, optimizer, is_world_zero: bool) -> None:
        modules = self.schedule.modules(index, self.module_map, self.seed)
        before = {id(p) for lp in self.lora for p in (lp.A, lp.B) if p.requires_grad}
        trainable = set_trainable(model, self.lora, modules)
        if self.reset_optimizer and optimizer is not None and self.current is not None:
            inner = getattr(optimizer, "optimizer", optimizer)
            for lp in self.lora:
                for p in (lp.A, lp.B):
                    if p.requires_grad and id(p) not in before:
                        inner.state.pop(p, None)
        label = self.schedule.label(index, self.module_map, self.seed)
        self.current = index
        self.state.phase, self.state.phase_index = label, index
        record = {
            "step": state.global_step,
            "phase": index + 1,
            "label": label,
            "trainable_modules": [m.name for m in modules],
            "trainable_params": trainable,
        }
        self.transitions.append(record)
        if is_world_zero:
            logger.info("step %d: phase %d (%s): %d modules, %d trainable parameters", state.global_step, index + 1, label, len(modules), trainable)
            if self.path:
                self.path.write_text(json.dumps(self.summary(), indent=2) + "\n")

    def summary(self) -> dict:
        return {
            "strategy": self.schedule.strategy,
            "ends": list(self.schedule.ends),
            "phases": [self.schedule.label(i, self.module_map, self.seed) for i in range(len(self.schedule.ends))],
            "transitions": self.transitions,
        }
