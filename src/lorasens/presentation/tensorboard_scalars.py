"""With `--report_to tensorboard`: group and layer gradient norms as TensorBoard scalars, next to loss and lr.

The values are the ones the gradient-tracking callback (`lorasens.analysis.gradient_recorder.GradientTrackingCallback`)
measures for gradient_analysis.group_norms.csv and layer_norms.csv: every row it adds to those files is also
written, at the step it was measured, to the Trainer's own TensorBoard writer (the same event file as the loss).
Nothing is measured twice, and a frozen group (an empty cell, NaN) gets no point rather than a zero.

Scalars: `gradients/group/{attn,mlp,total}` and `gradients/layer_{LL}/{attn,mlp}`.
"""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from lorasens.analysis.gradient_recorder import GradientTrackingCallback
from lorasens.training.context import RunContext

logger = logging.getLogger(__name__)


def tensorboard_callbacks(ctx: RunContext, tracker) -> list[TrainerCallback]:
    """The scalar callback when the run reports to TensorBoard, else nothing. `tracker` publishes the rows: a
    `GradientTrackingCallback`, or the `SensitivityCallback` that builds one when training begins."""
    if ctx.cfg.training.report_to != "tensorboard":
        return []
    return [GradientScalarsCallback(lambda: ctx.trainer, tracker)]


class GradientScalarsCallback(TrainerCallback):
    """Subscribes to the tracker's group and layer rows and writes them to the Trainer's TensorBoard writer."""

    def __init__(self, get_trainer, tracker: GradientTrackingCallback | None):  # or a SensitivityCallback
        self.get_trainer = get_trainer
        self.tracker = tracker
        self.writer = None
        self._subscribed = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        callbacks = self.get_trainer().callback_handler.callbacks
        board = next((c for c in callbacks if isinstance(c, TensorBoardCallback)), None)
        if board is None or board.tb_writer is None:
            logger.warning("--report_to tensorboard: no TensorBoard writer (is tensorboard installed?); "
                           "gradient norms are not logged as scalars")
            return
        if self.tracker is None or "group" not in self.tracker.writers:
            logger.warning("--report_to tensorboard: gradient tracking is off (--track_gradients false); "
                           "no gradient-norm scalars")
            return
        self.writer = board.tb_writer
        if not self._subscribed:  # once, even if train() is called again
            self.tracker.add_listener("group", self._group_row)
            self.tracker.add_listener("layer", self._layer_row)
            self._subscribed = True

    def on_train_end(self, args, state, control, **kwargs):
        self.writer = None

    def _scalar(self, tag: str, value, step: int) -> None:
        if self.writer is None or value is None:
            return
        value = float(value)
        if not math.isnan(value):  # frozen: no point (a gap), never a zero
            self.writer.add_scalar(tag, value, step)

    def _group_row(self, row: dict) -> None:
        for group in ("attn", "mlp", "total"):
            self._scalar(f"gradients/group/{group}", row.get(group), int(row["step"]))

    def _layer_row(self, row: dict) -> None:
        layer = int(row["layer"])
        for group in ("attn", "mlp"):
            self._scalar(f"gradients/layer_{layer:02d}/{group}", row.get(group), int(row["step"]))
