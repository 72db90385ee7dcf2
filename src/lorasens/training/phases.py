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
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from lorasens.errors import UserError
from lorasens.model.lora import LoraParams, ModuleMapSpec, lora_of_model, set_trainable
from lorasens.model.module_map import ModuleMap
from lorasens.model.schedule import Schedule, parse_phases, parse_schedule
from lorasens.rundir.files import PHASES, module_key
from lorasens.safeio import read_json, write_json
from lorasens.training.trainer import RunState

logger = logging.getLogger(__name__)

WHO = "PhaseScheduleCallback"


class PhaseScheduleCallback(TrainerCallback):
    """Applies a phase schedule (which LoRA modules train until which step) in any Trainer.

    `schedule` is a strategy as `--phase_strategy` takes it ("both->mlp->attn", "early->late", "lisa:...") or a
    parsed `Schedule`; `phase_ends` as `--phase_ends` takes it: "300,600", [300, 600] or fractions of the run's
    max_steps [0.3, 0.6]. The LoRA modules, the module map and max_steps are taken from the Trainer when training
    begins; `module_map` is needed only for architectures the module map does not know ({"attn": [...], "mlp":
    [...]}). `output_dir` receives phases.json (a `SensitivityCallback` in the same Trainer sets it to its own).

    Refuses (UserError) a model without LoRA, a schedule that trains modules without LoRA, an optimizer built
    without the LoRA parameters of some scheduled module, reentrant activation checkpointing and DDP without
    `ddp_find_unused_parameters` -- each would silently break a guarantee of the module docstring.
    """

    def __init__(
        self,
        schedule: str | Schedule,
        phase_ends: str | Sequence[float] | None = None,
        *,
        output_dir: str | Path | None = None,
        reset_optimizer_on_switch: bool = False,
        module_map: ModuleMapSpec = None,
        phase1_end: int | None = None,
        phase2_end: int | None = None,
        run_state: RunState | None = None,
    ):
        if isinstance(schedule, Schedule):
            if phase_ends is not None or phase1_end is not None or phase2_end is not None:
                raise UserError(f"{WHO}: a parsed Schedule carries its own phase ends; give no phase_ends")
            self._parsed: Schedule | None = schedule
            self.strategy = schedule.strategy
        else:
            parse_phases(schedule)  # a misspelt strategy fails here, not when training starts
            self._parsed = None
            self.strategy = schedule
        self.phase_ends = _ends_text(phase_ends)
        self.phase1_end, self.phase2_end = phase1_end, phase2_end
        self.module_map_spec = module_map
        self.state = run_state if run_state is not None else RunState()
        self.path = Path(output_dir) / PHASES if output_dir is not None else None
        self.reset_optimizer = reset_optimizer_on_switch
        self.schedule: Schedule | None = self._parsed
        self.module_map: ModuleMap | None = module_map if isinstance(module_map, ModuleMap) else None
        self.lora: list[LoraParams] = []
        self.current: int | None = None
        self.transitions: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._resolve(args, state, model, optimizer)
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

    def _resolve(self, args, state, model, optimizer) -> None:
        """The model's LoRA and the schedule for this run, and every check that keeps the guarantees."""
        self.module_map, self.lora = lora_of_model(model, self.module_map_spec, WHO)
        if self._parsed is None:
            self.schedule = parse_schedule(self.strategy, state.max_steps, self.phase_ends, self.phase1_end,
                                           self.phase2_end, self.module_map, seed=args.seed)
        elif self.schedule.ends[-1] != state.max_steps:
            raise UserError(f"{WHO}: the schedule ends at step {self.schedule.ends[-1]}, the Trainer runs "
                            f"{state.max_steps} steps")
        scheduled = self.schedule.all_modules(self.module_map)
        with_lora = {lp.module for lp in self.lora}
        without = [m for m in scheduled if m not in with_lora]
        if without:
            raise UserError(f"{WHO}: the schedule trains {len(without)} module(s) without LoRA "
                            f"({_names(without)}); put LoRA on them (LoraConfig target_modules) or change the schedule")
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            held = {id(p) for group in inner.param_groups for p in group["params"]}
            missing = [lp.module for lp in self.lora if lp.module in set(scheduled)
                       and not (id(lp.A) in held and id(lp.B) in held)]
            if missing:
                raise UserError(
                    f"{WHO}: the optimizer was built without the LoRA parameters of {len(missing)} scheduled module(s) "
                    f"({_names(missing)}), so they could never train in their phase. Leave every LoRA parameter "
                    "trainable (PEFT's default) when the Trainer builds its optimizer, or build yours over all of them; "
                    "the callback freezes by phase itself.")
        ckpt_kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None) or {})
        if getattr(args, "activation_checkpointing", False) and ckpt_kwargs.get("use_reentrant", False):
            raise UserError(f"{WHO}: reentrant activation checkpointing loses the gradients of layers after a frozen "
                            "one; set activation_checkpointing_kwargs={'use_reentrant': False}")
        if args.world_size > 1 and not args.ddp_find_unused_parameters:
            raise UserError(f"{WHO}: under DDP, modules frozen by a phase get no gradient; set "
                            "ddp_find_unused_parameters=True so the reducer does not wait for them")

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


def _ends_text(phase_ends: str | Sequence[float] | None) -> str | None:
    """Phase ends as `--phase_ends` takes them: "300,600" stays, [300, 600] and [0.3, 0.6] become "300,600"/"0.3,0.6"."""
    if phase_ends is None or isinstance(phase_ends, str):
        return phase_ends
    if not all(isinstance(end, (int, float)) and not isinstance(end, bool) for end in phase_ends):
        raise UserError(f"{WHO}: phase_ends must be a string like '300,600' or a list of steps or fractions, "
                        f"got {phase_ends!r}")
    return ",".join(str(end) for end in phase_ends)


def _names(modules) -> str:
    shown = [module_key(m.layer, m.module_type) for m in modules]
    return ", ".join(shown[:4]) + (f", ... ({len(shown) - 4} more)" if len(shown) > 4 else "")
