"""Rebuild a finished run's model from its directory (for `lorasens eval`, `analyze` and the Python API)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open

from lorasens.config import ExperimentConfig, config_from_dict
from lorasens.errors import UserError
from lorasens.model.lora import LoraParams, lora_parameters
from lorasens.model.loading import load_model
from lorasens.model.module_map import ModuleMap, build_module_map
from lorasens.rundir import files
from lorasens.rundir.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE, FINAL_MODEL, unknown_fields
from lorasens.safeio import read_json


@dataclass
class LoadedRun:
    cfg: ExperimentConfig
    model: torch.nn.Module  # PeftModel with the run's final adapter (or the base model), eval mode
    tokenizer: object
    module_map: ModuleMap
    lora: list[LoraParams]


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


def load_run(run_dir: str | Path, adapter: bool = True) -> LoadedRun:
    """The base model of the run's config.json + `final_model/` (with `adapter`)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    require_known(run_dir, {"model.model"}, "its base model cannot be loaded again (give "
                  "SensitivityCallback(model_name=...) the name lorasens loads it by)")
    loaded = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed, quantize=cfg.model.quantize)
    module_map = build_module_map(loaded.model, cfg.model.attn_modules, cfg.model.mlp_modules)
    model = loaded.model
    if adapter:
        if not (run_dir / FINAL_MODEL).is_dir():
            raise UserError(f"{run_dir} has no {FINAL_MODEL}/ adapter (did the run finish?)")
        problem = adapter_problem(run_dir / FINAL_MODEL)
        if problem:
            raise UserError(f"{run_dir / FINAL_MODEL}: {problem}; rerun the training (--resume from a checkpoint)")
        model = PeftModel.from_pretrained(model, run_dir / FINAL_MODEL)
    model.eval()
    lora = lora_parameters(model, module_map) if adapter else []
    return LoadedRun(cfg, model, loaded.tokenizer, module_map, lora)


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
