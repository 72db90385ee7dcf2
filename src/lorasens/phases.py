"""Phase switching as a Trainer callback.

How freezing is done right (see docs/ARCHITECTURE.md):
- Every LoRA parameter of every phase requires grad when the Trainer builds its optimizer, so all of them are in
  the optimizer from step 0; the first phase's freezing is applied afterwards, in `on_train_begin`.
- Freezing goes through `lora.set_trainable`, which also sets `.grad = None`: AdamW skips parameters without a
  gradient, so a frozen parameter does not move at all (no weight decay, no momentum), bitwise.
- Non-reentrant activation checkpointing (set in training.py) keeps gradients flowing to trainable layers that
  follow frozen ones. With the embeddings' require-grad hook removed (`disable_input_require_grads`), autograd
  never goes below the first layer that has a trainable parameter.
- The phase is derived from `state.global_step`, so `--resume` from a checkpoint lands in the right phase, and
  phases.json keeps the transitions before the checkpoint (no duplicate record for the resumed phase).
- `--reset_optimizer_on_switch` drops the AdamW state (moments, step count) of modules that become trainable at a
  switch; by default it is kept, so a module re-activated later continues with its old moments.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from lorasens.lora import LoraParams, set_trainable
from lorasens.module_map import ModuleMap
from lorasens.rundir.files import PHASES
from lorasens.safeio import read_json, write_json
from lorasens.schedule import Schedule
from lorasens.training import RunState

logger = logging.getLogger(__name__)



class PhaseCallback(TrainerCallback):
    def __init__(
        self,
        schedule: Schedule,
        module_map: ModuleMap,
        lora: list[LoraParams],
        state: RunState,
        run_dir: Path | None = None,
        reset_optimizer_on_switch: bool = False,
    ):
        self.schedule = schedule
        self.module_map = module_map
        self.lora = lora
        self.state = state
        self.path = run_dir / PHASES if run_dir else None
        self.reset_optimizer = reset_optimizer_on_switch
        self.current: int | None = None
        self.transitions: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        disable_input_require_grads(model)
        index = self.schedule.phase_index(state.global_step)
        previous = None
        if state.global_step:
            # Resumed from a checkpoint: keep the transitions before it, and treat a checkpoint that sits exactly on
            # a boundary like the uninterrupted run does (a switch, with its optimizer reset when asked for).
            if self.path and self.path.exists():
                self.transitions = [t for t in read_json(self.path, "phase summary")["transitions"] if t["step"] < state.global_step]
            previous = self.schedule.phase_index(state.global_step - 1)
        self._enter(index, previous, state, model, optimizer, record=previous != index)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        index = self.schedule.phase_index(state.global_step)
        if index != self.current:
            self._enter(index, self.current, state, model, optimizer, record=True)

    def _enter(self, index: int, previous: int | None, state, model, optimizer, record: bool) -> None:
        modules = self.schedule.modules(index, self.module_map)
        trainable = set_trainable(model, self.lora, modules)
        if self.reset_optimizer and optimizer is not None and previous is not None and previous != index:
            # Decided from the schedule, not from requires_grad, so a resumed run resets exactly what the
            # uninterrupted run reset at the same step.
            was_active = set(self.schedule.modules(previous, self.module_map))
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            for lp in self.lora:
                if lp.module in modules and lp.module not in was_active:
                    for p in (lp.A, lp.B):
                        inner.state.pop(p, None)  # AdamW re-initialises moments and its step count lazily
        label = self.schedule.label(index, self.module_map)
        self.current = index
        self.state.phase, self.state.phase_index = label, index
        if not record:
            return
        self.transitions.append(
            {
                "step": state.global_step,
                "phase": index + 1,
                "label": label,
                "trainable_modules": [m.name for m in modules],
                "trainable_params": trainable,
            }
        )
        if state.is_world_process_zero:
            logger.info("step %d: phase %d (%s): %d modules, %d trainable parameters", state.global_step, index + 1, label, len(modules), trainable)
            if self.path:
                write_json(self.path, self.summary())

    def summary(self) -> dict:
        return {
            "strategy": self.schedule.strategy,
            "ends": list(self.schedule.ends),
            "phases": [self.schedule.label(i, self.module_map) for i in range(len(self.schedule.ends))],
            "transitions": self.transitions,
        }


def disable_input_require_grads(model) -> None:
    """Remove the hook that makes the input embeddings' output require grad.

    transformers installs it when the Trainer turns on activation checkpointing (inside `train()`, so it is removed
    here, at train begin). It is only needed by *reentrant* checkpointing; we use non-reentrant checkpointing, and
    with the hook autograd would compute input gradients through every frozen layer down to the embeddings, so
    freezing the early layers would save no backward compute.
    """
    if model is None:
        return
    for module in model.modules():
        if hasattr(module, "disable_input_require_grads") and getattr(module, "_require_grads_hooks", None):
            module.disable_input_require_grads()
