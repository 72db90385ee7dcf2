"""The sensitivity analysis of a finished run: ablation, sensitivity.json and recommended_lora_config.json.

Reads only the run's files (the gradient/importance CSVs) and its model, so the same function serves the end of
training (`analyze_after_training`) and any finished run (`lorasens analyze RUN_DIR`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lorasens.analysis.ablation import ablation_max_tokens, run_ablation, validation_batches
from lorasens.analysis.csvlog import BufferedCsv
from lorasens.analysis.measures import update_magnitudes
from lorasens.analysis.sensitivity import (
    COMBINED,
    agreement,
    combined_scores,
    grad_norm_scores,
    importance_scores,
    key_of,
    ranking,
    recommended_lora_config,
    select_budget,
)
from lorasens.config import ExperimentConfig, with_overrides
from lorasens.context import RunContext
from lorasens.data.features import build_features
from lorasens.data.registry import load_examples
from lorasens.lora import LoraParams
from lorasens.module_map import ModuleMap
from lorasens.rundir import files
from lorasens.rundir.load import load_run

logger = logging.getLogger(__name__)

TOP_IN_SUMMARY = 5


def analyze_after_training(ctx: RunContext) -> dict:
    """Step after training in run_experiment (main process only)."""
    return analyze(ctx.run_dir, ctx.cfg, ctx.model, ctx.module_map, ctx.lora, ctx.val_features, ctx.tokenizer)


def analyze(run_dir: Path, cfg: ExperimentConfig, model: torch.nn.Module, module_map: ModuleMap,
            lora: list[LoraParams], val_features: list[dict] | None, tokenizer) -> dict:
    """Write sensitivity_ablation.csv (if cfg.tracking.ablation), sensitivity.json, recommended_lora_config.json."""
    run_dir = Path(run_dir)
    tracking = cfg.tracking
    keys = [key_of(lp.module) for lp in lora]
    measures: dict[str, dict[str, float]] = {}
    if (run_dir / files.MODULE_NORMS).exists():
        measures["grad_norm"] = grad_norm_scores(run_dir)
    if (run_dir / files.IMPORTANCE).exists():
        measures["importance"] = importance_scores(run_dir)
    measures["update_magnitude"] = dict(zip(keys, update_magnitudes(lora).cpu().double().tolist()))
    measures = {name: {k: scores[k] for k in keys if k in scores} for name, scores in measures.items()}

    ablation_rows = None
    ablation_info: dict = {}
    if tracking.ablation:
        if not val_features:
            logger.warning("ablation skipped: no validation examples")
        else:
            # Single-module ablations within the budget: the modules the other measures rank highest.
            order = ranking(combined_scores(keys, measures))
            by_key = {key_of(lp.module): lp.module for lp in lora}
            singles = [by_key[k] for k in order[: tracking.ablation_max_single]]
            device = next(model.parameters()).device
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            # As many examples per pass as memory allows (sorted by length, so padding stays small).
            batches = validation_batches(val_features, None, pad, device,
                                         max_tokens=ablation_max_tokens(model, module_map.num_layers))
            result = run_ablation(model, lora, batches, singles, layers_path=module_map.layers_path,
                                  num_examples=len(val_features))
            ablation_rows = result.rows()
            ablation_info = {"ablation_time_s": round(result.wall_time_s, 2), "ablation_method": result.method,
                             "ablation_sets": len(result.sets), "ablation_batches": len(batches)}
            writer = BufferedCsv(run_dir / files.ABLATION, files.ABLATION_COLUMNS)
            writer.start(0)
            for row in ablation_rows:
                writer.add(row.values())
            writer.flush()
            measures["ablation"] = {files.module_key(row.layer, row.module): row.delta_loss
                                    for row in ablation_rows if row.kind == "module"}

    combined = combined_scores(keys, measures)
    selected = select_budget(lora, combined, tracking.budget_modules, tracking.budget_unit)
    lora_config = recommended_lora_config(selected, module_map, cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout)
    (run_dir / files.RECOMMENDED_CONFIG).write_text(json.dumps(lora_config, indent=2) + "\n")

    sizes = {key_of(lp.module): lp.A.numel() + lp.B.numel() for lp in lora}
    selected_keys = [key_of(m) for m in selected]
    budget = {
        "unit": tracking.budget_unit,
        "value": tracking.budget_modules if tracking.budget_modules is not None else 0.5,
        "ranked_by": f"{COMBINED}: mean normalised rank over {', '.join(measures)}",
        "selected": selected_keys,
        "num_selected": len(selected),
        "num_modules": len(lora),
        "params_selected": sum(sizes[k] for k in selected_keys),
        "params_total": sum(sizes.values()),
    }
    all_measures = {**measures, COMBINED: combined}
    sensitivity = {
        "modules": [{"key": key_of(lp.module), "layer": lp.module.layer, "group": lp.module.group,
                     "module": lp.module.module_type} for lp in lora],
        "measures": {name: _finite(scores) for name, scores in all_measures.items()},
        "rankings": {name: ranking(scores) for name, scores in all_measures.items()},
        "agreement": agreement(measures),
        "budget": budget,
        "gradient_timing": "gradient norms and importance use the gradient backward produced for each optimizer "
                           "step: after accumulation and the DDP all-reduce, before clipping",
    }
    if ablation_rows is not None:
        sensitivity["ablation_reference_loss"] = ablation_rows[0].loss
    (run_dir / files.SENSITIVITY).write_text(json.dumps(sensitivity, indent=2) + "\n")
    logger.info("sensitivity: top modules %s; recommended LoRA on %d of %d modules (%s)",
                ", ".join(sensitivity["rankings"][COMBINED][:TOP_IN_SUMMARY]), len(selected), len(lora),
                files.RECOMMENDED_CONFIG)
    return {
        "recommendation": {"file": files.RECOMMENDED_CONFIG, "modules": selected_keys,
                           "num_selected": len(selected), "num_modules": len(lora),
                           "target_modules": lora_config["target_modules"],
                           **({"layers_to_transform": lora_config["layers_to_transform"]}
                              if "layers_to_transform" in lora_config else {})},
        "sensitivity_top": sensitivity["rankings"][COMBINED][:TOP_IN_SUMMARY],
        "sensitivity_agreement": sensitivity["agreement"],
        **ablation_info,
    }


def _finite(scores: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: an unscored module is null."""
    return {k: (None if v != v else v) for k, v in scores.items()}


def analyze_run(run_dir: str | Path, overrides: dict | None = None) -> dict:
    """`lorasens analyze`: rebuild a finished run's model and re-run the analysis with optional overrides
    (flat field -> value, fields marked `reanalysable`; checked like any config)."""
    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    cfg = with_overrides(loaded.cfg, overrides or {})
    val_features = None
    if cfg.tracking.ablation:
        examples = load_examples(cfg.data.dataset, "validation", cfg.data.data_dir, cfg.training.seed,
                                 cfg.data.eval_samples)
        val_features, _ = build_features(examples, loaded.tokenizer, cfg.data.max_length, "validation")
    return analyze(run_dir, cfg, loaded.model, loaded.module_map, loaded.lora, val_features, loaded.tokenizer)
