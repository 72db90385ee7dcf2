"""Shared helpers for the benchmarks: a step timer callback and robust summaries."""

from __future__ import annotations

import statistics
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time between consecutive step starts (so logging and callback work after a step is included)."""

    def __init__(self):
        self.starts: list[float] = []
        self.end: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    def step_times(self, skip: int = 2) -> list[float]:
        marks = self.starts + [self.end]
        return [b - a for a, b in zip(marks[:-1], marks[1:])][skip:]


def median(values: list[float]) -> float:
    return statistics.median(values)
