"""The run directory: created safely, never deleted by accident.

The package owns everything about a run's folder: its file names and readers (`rundir.files`), the figures
computed from its logs (`rundir.metrics.read_run_metrics`) and what a finished run's folder says before its model
is loaded (`rundir.load`; `training.context.load_run` rebuilds the run). This module decides whether a folder may
be used for a run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from lorasens.errors import UserError
from lorasens.rundir.files import CONFIG_FILE, LOCK_FILE, SUMMARY_FILE


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to reuse a folder unless told to (--overwrite or --resume). Deletes nothing."""
    exists = run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if resume:
        if not (run_dir / CONFIG_FILE).exists():
            raise UserError(f"--resume: {run_dir} is not a lorasens run directory (no {CONFIG_FILE})")
        return
    if not exists:
        return
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run; pass --overwrite to replace it, --resume to continue it, or choose another --experiment_name")
    if not (run_dir / CONFIG_FILE).exists():
        raise UserError(f"{run_dir} is not empty and is not a lorasens run directory (no {CONFIG_FILE}); refusing to delete it")


def replace_run_dir(run_dir: Path) -> None:
    """Called only after all input was validated and the model and data loaded (--overwrite)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in run_dir.iterdir():
        if path.name == LOCK_FILE:
            continue  # the lock this process holds for the run
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


RunStatus = Literal["complete", "incomplete", "new"]


def run_status(run_dir: Path) -> RunStatus:
    """complete: summary.json (written last) is there; incomplete: config.json but no summary; new: neither."""
    if (run_dir / SUMMARY_FILE).exists():
        return "complete"
    if (run_dir / CONFIG_FILE).exists():
        return "incomplete"
    return "new"
