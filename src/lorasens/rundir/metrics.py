"""A run's loss and step figures, computed once from its logs (summary.json, the report and compare all use this).

The logs are the whole run: `--resume` truncates them back to the checkpoint's step and appends, so a resumed
run's best validation loss is the minimum over everything before *and* after the resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lorasens.rundir.files import EVAL_LOG, TRAIN_LOG
from lorasens.safeio import read_jsonl


@dataclass(frozen=True)
class RunMetrics:
    steps: int | None  # last logged optimizer step
    final_train_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None  # minimum validation loss over the whole run

    def as_dict(self) -> dict:
        return asdict(self)


def read_run_metrics(run_dir: str | Path) -> RunMetrics:
    run_dir = Path(run_dir)
    train = read_jsonl(run_dir / TRAIN_LOG, tolerant=True)
    evals = read_jsonl(run_dir / EVAL_LOG, tolerant=True)
    logged = [r for r in train if "loss" in r]
    eval_losses = [float(r["eval_loss"]) for r in evals if r.get("eval_loss") is not None]
    steps = [int(r["step"]) for r in train if r.get("step") is not None]
    return RunMetrics(
        steps=max(steps) if steps else None,
        # The last logged loss, null when it was not finite (a diverged run): never an earlier loss standing in.
        final_train_loss=(None if logged[-1]["loss"] is None else float(logged[-1]["loss"])) if logged else None,
        final_eval_loss=eval_losses[-1] if eval_losses else None,
        best_eval_loss=min(eval_losses) if eval_losses else None,
    )
