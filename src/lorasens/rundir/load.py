"""What a finished run's folder says before its model is loaded: its config, the settings a run recorded in a
user's script did not know, and whether a saved adapter can be loaded (`training.context.load_run` uses these)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from lorasens.config import ExperimentConfig, config_from_dict
from lorasens.errors import UserError
from lorasens.rundir.files import ABLATION, ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE, unknown_fields
from lorasens.safeio import read_json


def read_run_config(run_dir: Path) -> ExperimentConfig:
    if not (run_dir / CONFIG_FILE).exists():
        raise UserError(f"{run_dir} is not a lorasens run directory (no {CONFIG_FILE})")
    return config_from_dict(read_json(run_dir / CONFIG_FILE, "the run's config"))


def require_known(run_dir: Path, names: set[str], purpose: str) -> None:
    """Refuse, naming what is missing, to rebuild from settings a run recorded in a user's script did not know."""
    missing = sorted(names & unknown_fields(read_json(Path(run_dir) / CONFIG_FILE, tolerant=True)))
    if missing:
        raise UserError(f"{run_dir} was recorded by SensitivityCallback in a training script that did not tell "
                        f"lorasens {', '.join(missing)}; {purpose}")


def adapter_problem(path: Path) -> str | None:
    """Why a saved PEFT adapter folder (final_model/, a checkpoint) cannot be loaded; None when it can."""
    missing = [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        read_json(path / ADAPTER_CONFIG, "adapter config")
    except ValueError as exc:  # UserError: corrupt
        return str(exc).split(": ", 1)[-1]
    try:
        # Opening checks the header and that the tensors cover the file exactly (a truncated file fails).
        with safe_open(str(path / ADAPTER_WEIGHTS), "pt") as fh:
            if not list(fh.keys()):
                return f"{ADAPTER_WEIGHTS} holds no tensors"
    except Exception as exc:  # safetensors raises its own error types for a torn header or body
        return f"{ADAPTER_WEIGHTS} is truncated or unreadable ({str(exc).splitlines()[0][:80]})"
    return None


@dataclass(frozen=True)
class AblationDelta:
    """One ablated set's loss increase over the all-on adapter, with its bootstrap CI (None where not recorded)."""

    delta: float
    low: float | None
    high: float | None


def read_ablation(run_dir: Path, kind: str) -> dict[str, AblationDelta]:
    """{set name: delta} for the rows of one kind (all, group, layer, module_type, module) of
    sensitivity_ablation.csv; empty without an ablation. Unreadable rows are skipped."""
    path = Path(run_dir) / ABLATION
    if not path.exists():
        return {}
    out = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("kind") != kind:
                continue
            try:
                out[row["name"]] = AblationDelta(float(row["delta_loss"]),
                                                 float(row["delta_ci_low"]) if row.get("delta_ci_low") else None,
                                                 float(row["delta_ci_high"]) if row.get("delta_ci_high") else None)
            except (KeyError, ValueError):
                continue
    return out


def read_ablation_deltas(run_dir: Path, kind: str) -> dict[str, float]:
    """{set name: delta} for one kind of sensitivity_ablation.csv's rows, without the intervals."""
    return {name: d.delta for name, d in read_ablation(run_dir, kind).items()}
