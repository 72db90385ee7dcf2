"""Rebuild a finished run's model from its directory (for `lorasens eval`, `analyze` and the Python API)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from lorasens.config import ExperimentConfig, config_from_dict
from lorasens.errors import UserError
from lorasens.lora import LoraParams, lora_parameters
from lorasens.models import load_model
from lorasens.module_map import ModuleMap, build_module_map
from lorasens.rundir.files import CONFIG_FILE, FINAL_MODEL


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
    return config_from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))


def load_run(run_dir: str | Path, adapter: bool = True) -> LoadedRun:
    """The base model of the run's config.json + `final_model/` (with `adapter`)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    loaded = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed)
    module_map = build_module_map(loaded.model, cfg.model.attn_modules, cfg.model.mlp_modules)
    model = loaded.model
    if adapter:
        if not (run_dir / FINAL_MODEL / "adapter_config.json").exists():
            raise UserError(f"{run_dir} has no {FINAL_MODEL}/ adapter (did the run finish?)")
        model = PeftModel.from_pretrained(model, run_dir / FINAL_MODEL)
    model.eval()
    lora = lora_parameters(model, module_map) if adapter else []
    return LoadedRun(cfg, model, loaded.tokenizer, module_map, lora)
