"""Recording per-module LoRA gradient norms, Taylor importance and update magnitude while the Trainer trains.

Which gradient is recorded (see docs/ARCHITECTURE.md, "Gradient timing"): the one backward produced for the
optimizer step, i.e. after gradient accumulation and after the DDP all-reduce, and *before* clipping. The Trainer
has no callback event between backward and clipping (`on_pre_optimizer_step` already sees clipped gradients, and
the gradients are zeroed before `on_step_end`). Both of its paths, clipping (`max_grad_norm > 0`) and the plain
norm for the log (`max_grad_norm = 0`, clipping at inf), call `trainer.accelerator.clip_grad_norm_` exactly once
per optimizer step, right after the all-reduce. So on `on_train_begin` this callback wraps that method on the
Trainer's own accelerator instance (not the class, not globally): the wrapper measures, then calls the original.
The total norm recorded is therefore the pre-clip norm the Trainer logs as `grad_norm`.

Speed: the norms of all LoRA gradients are computed on the device by `torch._foreach_norm` (one call per
device/dtype group); the measurements of a step stay on the device until `on_step_end`, where they are
concatenated and moved to the host once. Rows are buffered and appended to the CSVs at checkpoints and at the end.
Only the main process records (after the all-reduce every rank holds the same gradients). Under FSDP2 the LoRA
matrices and their gradients are sharded: every rank measures its shards and the ranks add them up in one
all-reduce per logging step (`lorasens.analysis.sharding`: exact norms, nothing big gathered); rank 0 writes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback

from lorasens.analysis.csvlog import BufferedCsv, cell, read_rows
from lorasens.analysis.measures import foreach_norms, taylor_importance_in, update_magnitudes
from lorasens.analysis.sharding import full as gathered, is_sharded, sharded_importance, sharded_norms
from lorasens.config import TrackingConfig
from lorasens.model.lora import LoraParams
from lorasens.model.module_map import GROUPS
from lorasens.rundir import files
from lorasens.training.trainer import RunState

logger = logging.getLogger(__name__)

MATRICES = ("A", "B")


# A listener gets every aggregate row the tracker writes, as {column: value}, at the step it was measured.
RowListener = Callable[[dict], None]
# Rows published to listeners: the group and layer norms (module-level rows stay in their files).
PUBLISHED = ("group", "layer")


@dataclass
class _Pending:
    """Measurements of one optimizer step taken at clipping time, still on the device."""

    step: int
    phase: str
    active: np.ndarray  # indices into the flat parameter list (A0, B0, A1, B1, ...) that had a gradient
    grad_norms: torch.Tensor | None
    importance: torch.Tensor | None


class GradientTrackingCallback(TrainerCallback):
    """Writes the gradient-norm CSVs, importance.csv and update_magnitude.csv every `grad_log_interval` steps.

    `get_trainer` returns the Trainer whose accelerator is wrapped; it is called at `on_train_begin`, so the
    Trainer may be built after this callback. Listeners (`add_listener`) get the group and layer rows.
    """

    def __init__(self, run_dir: Path, lora: list[LoraParams], run_state: RunState, tracking: TrackingConfig,
                 get_trainer: Callable[[], Trainer | None]):
        self.lora = list(lora)
        self.run_state = run_state
        self.tracking = tracking
        self.get_trainer = get_trainer
        self.listeners: dict[str, list[RowListener]] = {kind: [] for kind in PUBLISHED}
        self.interval = tracking.grad_log_interval
        self.params = [p for lp in self.lora for p in (lp.A, lp.B)]
        self.writers: dict[str, BufferedCsv] = {}
        if tracking.track_gradients:
            self.writers["group"] = BufferedCsv(run_dir / files.GROUP_NORMS, files.GROUP_NORMS_COLUMNS)
            self.writers["layer"] = BufferedCsv(run_dir / files.LAYER_NORMS, files.LAYER_NORMS_COLUMNS)
            self.writers["module"] = BufferedCsv(run_dir / files.MODULE_NORMS, files.MODULE_NORMS_COLUMNS)
        if tracking.track_importance:
            self.writers["importance"] = BufferedCsv(run_dir / files.IMPORTANCE, files.IMPORTANCE_COLUMNS)
        if tracking.track_update_magnitude:
            self.writers["update"] = BufferedCsv(run_dir / files.UPDATE_MAGNITUDE, files.UPDATE_MAGNITUDE_COLUMNS)
        modules = [lp.module for lp in self.lora]
        # The constant "layer,group,module" cells of each module's rows, formatted once.
        self._module_cells = [f"{m.layer},{m.group},{cell(m.module_type)}" for m in modules]
        self._group_index = {g: np.array([i for i, m in enumerate(modules) if m.group == g], dtype=int) for g in GROUPS}
        self.layers = sorted({m.layer for m in modules})
        self._layer_index = {
            (layer, g): np.array([i for i, m in enumerate(modules) if m.layer == layer and m.group == g], dtype=int)
            for layer in self.layers
            for g in GROUPS
        }
        # Importance EMA per module, started at 0 as AdaLoRA does and bias-corrected as Adam's moments are (see
        # `ema_bias_corrected`); `updates` counts each module's EMA updates. Frozen modules keep both until they
        # train again.
        self.ema = np.zeros(len(self.lora))
        self.updates = np.zeros(len(self.lora), dtype=int)
        self._pending: _Pending | None = None
        self._scratch: dict[tuple, torch.Tensor] = {}  # importance products: 1/8 of the LoRA parameters' size
        self._active = False
        self._follower = False  # a rank other than 0 under sharding: measures (collectives) but writes nothing
        self._accelerator = None

    @property
    def _needs_gradients(self) -> bool:
        return self.tracking.track_gradients or self.tracking.track_importance

    # -- Trainer events ------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.get_trainer()
        sharded = trainer is not None and trainer.accelerator.distributed_type == DistributedType.FSDP
        if sharded:
            self._refresh_params(trainer.model)
        if not state.is_world_process_zero:
            if sharded:  # every rank takes part in the all-reduces of the measures
                self._follower = self._active = True
                if self._needs_gradients:
                    self._wrap_clipping(trainer)
            return
        self._active = True
        for writer in self.writers.values():
            writer.start(state.global_step)
        if self.tracking.track_importance and state.global_step:
            self._restore_ema()
        if self._needs_gradients:
            self._wrap_clipping(self.get_trainer())

    def on_step_end(self, args, state, control, **kwargs):
        if not self._active:
            return
        step = state.global_step
        pending = self._pending if self._pending is not None and self._pending.step == step else None
        self._pending = None
        record_update = self.tracking.track_update_magnitude and step % self.interval == 0
        if pending is None and not record_update:
            return
        parts = [t for t in ((pending.grad_norms, pending.importance) if pending else ()) if t is not None]
        if record_update:
            lora = self.lora
            if is_sharded([lp.A for lp in lora]):  # the small LoRA factors gathered (see lorasens.analysis.sharding)
                lora = [LoraParams(lp.module, gathered(lp.A.detach()), gathered(lp.B.detach()), lp.scaling) for lp in lora]
            parts.append(update_magnitudes(lora))
        if self._follower:
            return
        device = next((t.device for t in parts if t.numel()), parts[0].device)
        values = torch.cat([t.to(device) for t in parts]).cpu().double().numpy()  # the one device->host copy
        offset = 0
        if pending is not None:
            n = len(pending.active)
            if pending.grad_norms is not None:
                self._write_norms(step, pending.phase, pending.active, values[offset : offset + n])
                offset += n
            if pending.importance is not None:
                self._write_importance(step, pending.phase, pending.active, values[offset : offset + n])
                offset += n
        if record_update:
            phase = pending.phase if pending else self.run_state.phase
            writer, head = self.writers["update"], f"{step},{cell(phase)},"
            for module, value in zip(self._module_cells, values[offset:]):
                writer.add_line(f"{head}{module},{cell(np.float32(value))}")

    def on_save(self, args, state, control, **kwargs):
        self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()
        self._unwrap_clipping()
        self._active = False

    def flush(self) -> None:
        if self._follower:
            return
        for writer in self.writers.values():
            writer.flush()

    # -- Measuring at clipping time ------------------------------------------------------------------------------

    def add_listener(self, kind: str, listener: RowListener) -> None:
        """Call `listener` with every row of kind "group" or "layer" as it is recorded."""
        self.listeners[kind].append(listener)

    def _publish(self, kind: str, values: tuple) -> None:
        """Buffer the row for its CSV and hand it to the listeners of its kind."""
        writer = self.writers[kind]
        writer.add(values)
        for listener in self.listeners[kind]:
            listener(dict(zip(writer.columns, values)))

    def _wrap_clipping(self, trainer: Trainer) -> None:
        accelerator = trainer.accelerator
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # ZeRO partitions gradients outside param.grad; FSDP2 (DTensor shards) is measured exactly instead.
            logger.warning("gradient tracking is not supported with %s; gradient norms and importance are not recorded",
                           accelerator.distributed_type)
            return
        self._unwrap_clipping()
        original = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            self._record_gradients(trainer.state.global_step + 1)
            return original(parameters, max_norm, *args, **kwargs)

        # An instance attribute shadows the class method for this accelerator only.
        accelerator.clip_grad_norm_ = clip_grad_norm_
        self._accelerator = accelerator

    def _unwrap_clipping(self) -> None:
        if self._accelerator is not None:
            self._accelerator.__dict__.pop("clip_grad_norm_", None)
            self._accelerator = None

    def _record_gradients(self, step: int) -> None:
        """Called just before clipping for optimizer step `step` (numbered as the Trainer logs it)."""
        if step % self.interval or (self._pending is not None and self._pending.step == step):
            return
        active = [i for i, p in enumerate(self.params) if p.requires_grad and p.grad is not None]
        params = [self.params[i] for i in active]
        grads = [p.grad for p in params]
        with torch.no_grad():
            # With every module frozen the tensors are empty and the step is still written (all cells empty).
            sharded = is_sharded(grads)
            norms = (sharded_norms(grads) if sharded else foreach_norms(grads)) if self.tracking.track_gradients else None
            if self.tracking.track_importance and sharded:
                importance = sharded_importance(params, grads)
            elif self.tracking.track_importance:
                importance = taylor_importance_in(params, grads, self._scratch)
            else:
                importance = None
        self._pending = _Pending(step, self.run_state.phase, np.array(active, dtype=int), norms, importance)

    def _refresh_params(self, model: torch.nn.Module) -> None:
        """Point at the model's current LoRA parameters: FSDP2 replaces them by sharded ones when it wraps."""
        named = dict(model.named_parameters())
        lora = []
        for lp in self.lora:
            found = {}
            for matrix in ("A", "B"):
                tail = f"{lp.module.name}.lora_{matrix}."
                name = next((n for n in named if tail in n and n.endswith(".weight")), None)
                found[matrix] = named[name] if name else getattr(lp, matrix)
            lora.append(LoraParams(lp.module, found["A"], found["B"], lp.scaling))
        self.lora = lora
        self.params = [p for lp in self.lora for p in (lp.A, lp.B)]

    # -- Rows ----------------------------------------------------------------------------------------------------

    def _per_param(self, active: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values per parameter (0 where frozen) and the mask of the ones that trained (had a gradient).

        Frozen is the mask, not NaN: a measured NaN (a diverged step) stays NaN and is written `nan`, never empty."""
        full, mask = np.zeros(len(self.params)), np.zeros(len(self.params), dtype=bool)
        full[active], mask[active] = values, True
        return full, mask

    @staticmethod
    def _masked_sum(values: np.ndarray, mask: np.ndarray) -> float | None:
        """Sum over the trained entries; None (an empty cell) when every entry is frozen or there are none."""
        return float(values[mask].sum()) if mask.any() else None

    @staticmethod
    def _root(value: float | None) -> float | None:
        return None if value is None else math.sqrt(value)

    def _write_norms(self, step: int, phase: str, active: np.ndarray, norms: np.ndarray) -> None:
        per_param, mask = self._per_param(active, norms)
        module_sq = (per_param**2)[0::2] + (per_param**2)[1::2]  # per module: |grad A|^2 + |grad B|^2
        module_mask = mask[0::2] | mask[1::2]
        module_writer, head = self.writers["module"], f"{step},{cell(phase)},"
        for i, module in enumerate(self._module_cells):
            for j, matrix in enumerate(MATRICES):
                k = 2 * i + j
                module_writer.add_line(f"{head}{module},{matrix},{cell(np.float32(per_param[k]) if mask[k] else None)}")
        group = {g: self._root(self._masked_sum(module_sq[idx], module_mask[idx])) for g, idx in self._group_index.items()}
        total = self._root(self._masked_sum(module_sq, module_mask))
        self._publish("group", (step, phase, *(group[g] for g in GROUPS), total))
        for layer in self.layers:
            cells = (self._root(self._masked_sum(module_sq[idx], module_mask[idx]))
                     for idx in (self._layer_index[layer, g] for g in GROUPS))
            self._publish("layer", (step, phase, layer, *cells))

    def _write_importance(self, step: int, phase: str, active: np.ndarray, values: np.ndarray) -> None:
        per_param, mask = self._per_param(active, values)
        beta = self.tracking.importance_ema
        writer, head = self.writers["importance"], f"{step},{cell(phase)},"
        module_values = per_param[0::2] + per_param[1::2]  # sum over A and B
        module_mask = mask[0::2] | mask[1::2]
        for i, module in enumerate(self._module_cells):
            if not module_mask[i]:
                writer.add_line(f"{head}{module},")  # frozen: empty cell
                continue
            self.ema[i] = beta * self.ema[i] + (1 - beta) * float(module_values[i])
            self.updates[i] += 1
            writer.add_line(f"{head}{module},{cell(ema_bias_corrected(float(self.ema[i]), beta, int(self.updates[i])))}")

    def _restore_ema(self) -> None:
        """On --resume, continue the EMA from the CSV: the update count is the module's number of non-empty rows,
        and the raw EMA is the last (bias-corrected) value times (1 - beta^count)."""
        index = {(lp.module.layer, lp.module.module_type): i for i, lp in enumerate(self.lora)}
        last = np.zeros(len(self.lora))
        self.updates[:] = 0
        for row in read_rows(self.writers["importance"].path):
            i = index.get((int(row["layer"]), row["module"]))
            if i is not None and row["importance"] != "":
                last[i] = float(row["importance"])
                self.updates[i] += 1
        beta = self.tracking.importance_ema
        self.ema = np.array([value * (1 - beta**n) for value, n in zip(last, self.updates)])


def ema_bias_corrected(ema: float, beta: float, updates: int) -> float:
    """An EMA started at 0, divided by 1 - beta^updates (Adam's bias correction), so that it is a weighted mean of
    the values seen: without it a module updated 5 times at beta 0.85 is scaled by 1 - 0.85^5 = 0.56."""
    return ema / (1 - beta**updates) if updates else math.nan
