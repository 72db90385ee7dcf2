"""With `--report_to tensorboard`: group and layer gradient norms as TensorBoard scalars, next to loss and lr.

The values are the ones the gradient-tracking callback (`lorasens.analysis.callbacks.GradientTrackingCallback`)
measures for gradient_analysis.group_norms.csv and layer_norms.csv: every row it adds to those files is also
written, at the step it was measured, to the Trainer's own TensorBoard writer (the same event file as the loss).
Nothing is measured twice, and a frozen group (an empty cell, NaN) gets no point rather than a zero.

Scalars: `gradients/group/{attn,mlp,total}` and `gradients/layer_{LL}/{attn,mlp}`.
"""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def tensorboard_callbacks(context: dict) -> list[TrainerCallback]:
    """The scalar callback when the run reports to TensorBoard, else nothing."""
    if context["cfg"].training.report_to != "tensorboard":
        return []
    return [GradientScalarsCallback(context)]


class GradientScalarsCallback(TrainerCallback):
    def __init__(self, context: dict):
        self.context = context
        self.writer = None
        self._tapped: list = []  # BufferedCsv objects whose `add` we wrapped (unwrapped at the end)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from transformers.integrations import TensorBoardCallback

        from lorasens.analysis.callbacks import GradientTrackingCallback

        callbacks = self.context["trainer"].callback_handler.callbacks
        board = next((c for c in callbacks if isinstance(c, TensorBoardCallback)), None)
        tracker = next((c for c in callbacks if isinstance(c, GradientTrackingCallback)), None)
        if board is None or board.tb_writer is None:
            logger.warning("--report_to tensorboard: no TensorBoard writer (is tensorboard installed?); "
                           "gradient norms are not logged as scalars")
            return
        if tracker is None or "group" not in tracker.writers:
            logger.warning("--report_to tensorboard: gradient tracking is off (--track_gradients false); "
                           "no gradient-norm scalars")
            return
        self.writer = board.tb_writer
        self._tap(tracker.writers["group"], self._group_row)
        self._tap(tracker.writers["layer"], self._layer_row)

    def on_train_end(self, args, state, control, **kwargs):
        for csv_writer in self._tapped:
            csv_writer.__dict__.pop("add", None)
        self._tapped.clear()
        self.writer = None

    def _tap(self, csv_writer, on_row) -> None:
        """Wrap one CSV writer's `add` (on this instance only): each row goes to the file and to TensorBoard."""
        original = csv_writer.add
        columns = csv_writer.columns

        def add(values):
            on_row(dict(zip(columns, values)))
            return original(values)

        csv_writer.add = add
        self._tapped.append(csv_writer)

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
