"""A run's loss and step figures, computed once from its logs (summary.json, the report and compare all use this).

The logs are the whole run: `--resume` truncates them back to the checkpoint's step and appends, so a resumed
run's best validation loss is the minimum over everything before *and* after the resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lorasens.rundir.files import EVAL_LOG, TRAIN_LOG
from lorasens.safeio import read_jsonl

# A run whose validation loss fell by more than this fraction of its final value over its last quarter is still
# learning: 1% is about the size of the differences between placements that a comparison tries to resolve.
STILL_FALLING = 0.01


@dataclass(frozen=True)
class RunMetrics:
    steps: int | None  # last logged optimizer step
    final_train_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None  # minimum validation loss over the whole run
    # Validation loss at the last evaluation at or before 3/4 of the final evaluation's step, minus the final one:
    # > 0 while the loss still falls at the end of the run. None with no evaluation that early.
    late_eval_fall: float | None = None

    def still_falling(self, tolerance: float = STILL_FALLING) -> bool | None:
        """Whether the validation loss fell by more than `tolerance` (a fraction of its final value) over the last
        quarter of the run: a comparison of such adapters is one of adapters still learning."""
        if self.late_eval_fall is None or not self.final_eval_loss:
            return None
        return self.late_eval_fall > tolerance * self.final_eval_loss

    def as_dict(self) -> dict:
        return asdict(self)


def read_run_metrics(run_dir: str | Path) -> RunMetrics:
    run_dir = Path(run_dir)
    train = read_jsonl(run_dir / TRAIN_LOG, tolerant=True)
    evals = read_jsonl(run_dir / EVAL_LOG, tolerant=True)
    logged = [r for r in train if "loss" in r]
    evaluated = [(int(r["step"]), float(r["eval_loss"])) for r in evals
                 if r.get("eval_loss") is not None and r.get("step") is not None]
    eval_losses = [loss for _, loss in evaluated]
    steps = [int(r["step"]) for r in train if r.get("step") is not None]
    return RunMetrics(
        steps=max(steps) if steps else None,
        # The last logged loss, null when it was not finite (a diverged run): never an earlier loss standing in.
        final_train_loss=(None if logged[-1]["loss"] is None else float(logged[-1]["loss"])) if logged else None,
        final_eval_loss=eval_losses[-1] if eval_losses else None,
        best_eval_loss=min(eval_losses) if eval_losses else None,
        late_eval_fall=_late_fall(evaluated),
    )


def _late_fall(evaluated: list[tuple[int, float]]) -> float | None:
    if len(evaluated) < 2:
        return None
    last_step, last_loss = evaluated[-1]
    earlier = [loss for step, loss in evaluated[:-1] if step <= 0.75 * last_step]
    return round(earlier[-1] - last_loss, 6) if earlier else None
