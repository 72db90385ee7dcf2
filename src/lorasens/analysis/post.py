"""The sensitivity analysis of a finished run: ablation, sensitivity.json and recommended_lora_config.json.

Reads only the run's files (the gradient/importance CSVs) and its model, so the same function serves the end of
training (`analyze_after_training`) and any finished run (`lorasens analyze RUN_DIR`).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from lorasens.analysis.ablation import ablation_max_tokens, run_ablation, validation_batches
from lorasens.analysis.budget import (
    DEFAULT_BUDGET,
    ModuleSize,
    ablation_type_shares,
    allocate_ranks,
    allocate_spread_ranks,
    allocate_type_ranks,
    budget_limit,
    eva_start,
    rank_allocation_config,
    select_within_budget,
)
from lorasens.analysis.csvlog import BufferedCsv, read_rows
from lorasens.analysis.first_order import first_order_estimates
from lorasens.analysis.measures import update_magnitudes
from lorasens.analysis.sensitivity import (
    COMBINED,
    agreement,
    combined_scores,
    full_coverage,
    grad_norm_scores,
    importance_scores,
    key_of,
    module_sizes,
    per_parameter,
    ranking,
    recommended_lora_config,
    size_correlation,
)
from lorasens.analysis.stats import (
    BOOTSTRAP_SAMPLES,
    CONFIDENCE,
    bootstrap_deltas,
    rank_interval_is_wide,
    spearman,
)
from lorasens.config import ExperimentConfig, TrackingConfig, with_overrides
from lorasens.data.prepare import prepare
from lorasens.errors import UserError
from lorasens.model.lora import LoraParams
from lorasens.model.module_map import LoraModule, ModuleMap
from lorasens.rundir import files
from lorasens.rundir.files import CONFIG_FILE, unknown_fields
from lorasens.rundir.load import read_ablation_deltas, read_run_config, require_known
from lorasens.safeio import read_json, write_json
from lorasens.training.context import RunContext, load_run
from lorasens.training.trainer import decide_packing

logger = logging.getLogger(__name__)

TOP_IN_SUMMARY = 5


def analyze_after_training(ctx: RunContext) -> dict:
    """Step after training in run_experiment (main process only)."""
    return analyze(ctx.run_dir, ctx.cfg, ctx.model, ctx.module_map, ctx.lora, ctx.analysis_features, ctx.tokenizer)


def training_measures(source: Path, keys: list[str], lora: list[LoraParams] | None) -> dict[str, dict[str, float]]:
    """grad_norm, importance and update_magnitude recorded by the run in `source`.

    update_magnitude comes from `lora` (the final adapter) when given, else from the last row per module of the
    source's update_magnitude.csv (a probe run's adapter is not loaded).
    """
    measures: dict[str, dict[str, float]] = {}
    if (source / files.MODULE_NORMS).exists():
        measures["grad_norm"] = grad_norm_scores(source)
    if (source / files.IMPORTANCE).exists():
        measures["importance"] = importance_scores(source)
    if lora is not None:
        measures["update_magnitude"] = dict(zip(keys, update_magnitudes(lora).cpu().double().tolist()))
    elif (source / files.UPDATE_MAGNITUDE).exists():
        last: dict[str, float] = {}
        for row in read_rows(source / files.UPDATE_MAGNITUDE):
            if row["delta_w_norm"] != "":
                last[files.module_key(int(row["layer"]), row["module"])] = float(row["delta_w_norm"])
        measures["update_magnitude"] = last
    return {name: {k: scores[k] for k in keys if k in scores} for name, scores in measures.items()}


def analyze(run_dir: Path, cfg: ExperimentConfig, model: torch.nn.Module, module_map: ModuleMap,
            lora: list[LoraParams], analysis_features: list[dict] | None, tokenizer, probe: Path | None = None) -> dict:
    """Write sensitivity_ablation.csv (if cfg.tracking.ablation), sensitivity.json, recommended_lora_config.json.

    `analysis_features`: the analysis split (held out of train; disjoint from validation and test), on which the
    first-order estimate and the ablation are computed. `probe`: a run directory whose training-time measures
    replace this run's (`lorasens analyze --probe`).

    Stages: the training-time measures -> the first-order estimate -> the ablation -> the recommendation ->
    sensitivity.json -> the summary entries.
    """
    run_dir = Path(run_dir)
    tracking = cfg.tracking
    keys = [key_of(lp.module) for lp in lora]
    sizes = module_sizes(lora)
    params = {s.key: s.params(cfg.lora.r) for s in sizes}
    measures = training_measures(probe, keys, None) if probe else training_measures(run_dir, keys, lora)
    source = probe or run_dir
    if not (source / files.MODULE_NORMS).exists() and not (source / files.IMPORTANCE).exists():
        logger.warning("%s has no gradient CSVs (%s, %s): the recommendation rests on the update magnitude%s only",
                       source, files.MODULE_NORMS, files.IMPORTANCE, " and the ablation" if tracking.ablation else "")
    measured_under = _measured_under(cfg, probe)

    batches, packing, first_order_info = None, None, {}
    if analysis_features:
        batches, packing, first_order_info = _first_order(run_dir, cfg, model, module_map, lora, keys,
                                                          analysis_features, tokenizer, measures)
    else:
        logger.warning("first-order estimate and ablation skipped: no analysis examples")

    scale = "per_param" if tracking.budget_unit == "params" else "raw"
    ranked_by = full_coverage(keys, measures)
    combined = combined_scores(keys, _on_scale(measures, params, scale, ranked_by))

    ablation: dict = {}
    ablation_info: dict = {}
    if tracking.ablation and batches and not ablation_reranks(tracking, len(lora)):
        # The ablation cannot change the recommendation: write it now, usable while the ablation runs.
        early, early_config = _recommend(cfg, run_dir, module_map, lora, sizes, combined)
        write_json(run_dir / files.RECOMMENDED_CONFIG, early_config)
        logger.info("recommended %s (%s); the ablation follows and does not change it", describe_budget(early),
                    files.RECOMMENDED_CONFIG)
    if tracking.ablation and batches:
        ablation, ablation_info = _ablate(run_dir, cfg, model, module_map, lora, batches, packing,
                                          len(analysis_features), combined, measures)
        if "ablation" in full_coverage(keys, {"ablation": measures["ablation"]}):
            ranked_by = full_coverage(keys, measures)
            combined = combined_scores(keys, _on_scale(measures, params, scale, ranked_by))

    budget, lora_config = _recommend(cfg, run_dir, module_map, lora, sizes, combined)
    budget.update({"ranked_by": ranked_by, "ranking_scale": scale})
    write_json(run_dir / files.RECOMMENDED_CONFIG, lora_config)

    sensitivity = _sensitivity(sizes, lora, params, measures, combined, measured_under, budget, ablation)
    write_json(run_dir / files.SENSITIVITY, sensitivity)
    top = sensitivity["rankings"][COMBINED][:TOP_IN_SUMMARY]
    logger.info("sensitivity: top modules %s; recommended %s (%s)", ", ".join(top), describe_budget(budget),
                files.RECOMMENDED_CONFIG)
    return {
        "recommendation": {"file": files.RECOMMENDED_CONFIG, "modules": budget["selected"],
                           "description": describe_budget(budget),
                           "num_selected": budget["num_selected"], "num_modules": len(lora),
                           "params_used": budget["params_used"], "params_budget": budget["params_budget"],
                           "allocate": budget["allocate"], "target_modules": lora_config["target_modules"],
                           **({"ranks": budget["ranks"], "min_rank": budget["min_rank"]} if "ranks" in budget else {}),
                           **({"layers_to_transform": lora_config["layers_to_transform"]}
                              if "layers_to_transform" in lora_config else {})},
        "sensitivity_top": top,
        "sensitivity_agreement": sensitivity["agreement"],
        **first_order_info,
        **ablation_info,
    }


def ablation_reranks(tracking: TrackingConfig, num_modules: int) -> bool:
    """Whether the ablation can change the recommendation: it joins the ranking when it covers every module, and
    --allocate types splits the budget by its deltas."""
    return tracking.allocation == "types" or tracking.ablation_max_single >= num_modules


def _first_order(run_dir: Path, cfg: ExperimentConfig, model, module_map: ModuleMap, lora: list[LoraParams],
                 keys: list[str], analysis_features: list[dict], tokenizer, measures: dict):
    """The analysis batches (the training run's batching, as many examples per pass as memory allows) and the
    first-order estimate on them (added to `measures`): (batches, packing decision, summary entries)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_tokens = ablation_max_tokens(model, module_map.num_layers)
    # The training run's batching (padding-free where exact), as many examples per pass as memory allows.
    packing = decide_packing(model, tokenizer, analysis_features, cfg.training.packing, cfg.training.batch_size)
    batches = validation_batches(analysis_features, None, pad, device, max_tokens=max_tokens,
                                 packing=packing.enabled)
    # The backward keeps every layer's activations: smaller batches than the no-grad ablation passes.
    grad_batches = validation_batches(analysis_features, None, pad, device, max_tokens=max(256, max_tokens // 8))
    started = time.perf_counter()
    measures["first_order"] = dict(zip(keys, first_order_estimates(model, lora, grad_batches)))
    return batches, packing, _first_order_cost(time.perf_counter() - started, run_dir)


def _ablate(run_dir: Path, cfg: ExperimentConfig, model, module_map: ModuleMap, lora: list[LoraParams], batches,
            packing, num_examples: int, combined: dict, measures: dict) -> tuple[dict, dict]:
    """The ablation (sensitivity_ablation.csv; its deltas added to `measures`): (ablation section of
    sensitivity.json, summary entries)."""
    # Single-module ablations within the limit: the modules the other measures rank highest.
    by_key = {key_of(lp.module): lp.module for lp in lora}
    singles = [by_key[k] for k in ranking(combined)[: cfg.tracking.ablation_max_single]]
    result = run_ablation(model, lora, batches, singles, layers_path=module_map.layers_path,
                          num_examples=num_examples)
    ablation, rows = _ablation_uncertainty(result)
    ablation_info = {"ablation_time_s": round(result.wall_time_s, 2), "ablation_method": result.method,
                     "ablation_sets": len(result.sets), "ablation_batches": len(batches),
                     "ablation_packed": packing.enabled}
    writer = BufferedCsv(run_dir / files.ABLATION, files.ABLATION_COLUMNS)
    writer.start(0)
    for row in rows:
        writer.add(row)
    writer.flush()
    measures["ablation"] = ablation.pop("deltas")
    return ablation, ablation_info


def _sensitivity(sizes, lora: list[LoraParams], params: dict, measures: dict, combined: dict, measured_under: dict,
                 budget: dict, ablation: dict) -> dict:
    """The content of sensitivity.json."""
    per_param = {name: per_parameter(scores, params) for name, scores in measures.items()}
    all_measures = {**measures, COMBINED: combined}
    sensitivity = {
        "modules": [{"key": s.key, "layer": lp.module.layer, "group": lp.module.group, "module": lp.module.module_type,
                     "in_features": s.in_features, "out_features": s.out_features, "lora_params": params[s.key]}
                    for s, lp in zip(sizes, lora)],
        "measures": {name: _finite(scores) for name, scores in all_measures.items()},
        "measures_per_param": {name: _finite(scores) for name, scores in per_param.items()},
        "rankings": {name: ranking(scores) for name, scores in all_measures.items()},
        "agreement": agreement(measures),
        "size_correlation": {"raw": size_correlation(measures, params),
                             "per_param": size_correlation(per_param, params)},
        "measured_under": measured_under,
        "budget": budget,
        "loss_convention": LOSS_CONVENTION,
        "gradient_timing": "gradient norms and importance use the gradient backward produced for each optimizer "
                           "step: after accumulation and the DDP all-reduce, before clipping",
    }
    if "first_order" in measures and "ablation" in measures:
        sensitivity["first_order_agreement"] = _first_order_agreement(measures["first_order"], measures["ablation"])
    if ablation:
        sensitivity["ablation"] = ablation
        sensitivity["ablation_reference_loss"] = ablation["reference_loss"]
    return sensitivity


def _first_order_cost(seconds: float, run_dir: Path) -> dict:
    """The first-order estimate's wall time, and as a multiple of the run's median training step (train_log.jsonl)."""
    info = {"first_order_time_s": round(seconds, 3)}
    steps = []
    try:
        for line in (run_dir / files.TRAIN_LOG).read_text().splitlines():
            step_time = json.loads(line).get("step_time_s")
            if isinstance(step_time, (int, float)) and step_time > 0:
                steps.append(step_time)
    except (OSError, ValueError):
        pass
    if steps:
        info["first_order_train_steps"] = round(seconds / statistics.median(steps), 3)
    logger.info("first-order estimate: %.2f s%s", seconds, f" ({info['first_order_train_steps']:.2f} training steps)"
                if "first_order_train_steps" in info else "")
    return info


def describe_budget(budget: dict) -> str:
    """One line: how many modules, and how many LoRA parameters of the budget, the recommendation uses."""
    text = f"LoRA on {budget['num_selected']} of {budget['num_modules']} modules, {budget['params_used']} LoRA parameters"
    if budget.get("params_budget"):
        text += f" of a budget of {budget['params_budget']:.0f} ({100 * budget['params_used'] / budget['params_budget']:.1f}%)"
    else:
        text += f" ({100 * budget['params_used'] / budget['params_total']:.1f}% of all modules' total)"
    how = {"types": ", one rank per module type (shares from the ablation)",
           "spread": ", one rank on every module it reaches (the most sensitive one rank higher)",
           "ranks": (f", per-module ranks (at least {budget['min_rank']} on every module)" if budget.get("min_rank")
                     else ", per-module ranks")}.get(budget.get("allocate"), "")
    return text + how + (", EVA initialisation" if budget.get("init") == "eva" else "")


LOSS_CONVENTION = ("token-weighted mean next-token cross-entropy over the target tokens (sum of target-token "
                   "losses / number of target tokens), as the Trainer's training loss with num_items_in_batch")


def _on_scale(measures: dict[str, dict[str, float]], params: dict[str, int], scale: str,
              names: list[str]) -> dict[str, dict[str, float]]:
    """The measures `names` on the ranking scale: raw, or per LoRA parameter."""
    return {n: per_parameter(measures[n], params) if scale == "per_param" else measures[n] for n in names}


def _measured_under(cfg: ExperimentConfig, probe: Path | None) -> dict:
    """Where grad_norm/importance/update_magnitude come from, and whether a phase schedule confounds them."""
    if probe is not None:
        probe_cfg = read_run_config(probe)
        return {"source": str(probe), "phase_strategy": probe_cfg.schedule.phase_strategy, "probe": True}
    strategy = cfg.schedule.phase_strategy
    info = {"source": "this run", "phase_strategy": strategy, "probe": False}
    if strategy:
        info["note"] = ("measured under a phase schedule: modules trained different steps at different learning "
                        "rates, so grad_norm, importance and update_magnitude compare modules of different phases "
                        "unfairly; `lorasens analyze RUN_DIR --probe STATIC_RUN_DIR` takes them from a static run")
        logger.warning("sensitivity measures were taken under the phase schedule %s; see measured_under in %s",
                       strategy, files.SENSITIVITY)
    return info


def _ablation_uncertainty(result) -> tuple[dict, list[tuple]]:
    """Bootstrap CIs of every ablation delta and rank intervals of the single modules; the CSV rows."""
    rows = result.rows()
    module_sets = [i for i, s in enumerate(result.sets) if s.kind == "module"]
    sums = result.loss_sums.numpy()
    boot = bootstrap_deltas(sums[0], sums, result.token_counts.numpy(), ranked=module_sets)
    rank_of = {i: j for j, i in enumerate(module_sets)}
    csv_rows, ci, intervals, deltas = [], {}, {}, {}
    for i, row in enumerate(rows):
        rank = (int(boot.rank[rank_of[i]]), int(boot.rank_low[rank_of[i]]), int(boot.rank_high[rank_of[i]])) \
            if i in rank_of else (None, None, None)
        csv_rows.append((*row.values(), float(boot.low[i]), float(boot.high[i]), *rank))
        if row.kind == "module":
            key = files.module_key(row.layer, row.module)
            deltas[key] = row.delta_loss
            ci[key] = [float(boot.low[i]), float(boot.high[i])]
            intervals[key] = [rank[1], rank[2]]
    wide = [k for k, (lo, hi) in intervals.items() if rank_interval_is_wide(lo, hi, len(intervals))]
    info = {"reference_loss": rows[0].loss, "examples": int(sums.shape[1]),
            "target_tokens": int(result.token_counts.sum()), "confidence": CONFIDENCE,
            "bootstrap_samples": BOOTSTRAP_SAMPLES, "delta_ci": ci, "rank_interval": intervals,
            "wide_rank_interval": wide, "deltas": deltas}
    return info, csv_rows


def _first_order_agreement(estimate: dict[str, float], measured: dict[str, float]) -> dict:
    common = [k for k in measured if k in estimate]
    pearson = None
    if len(common) >= 3:
        x, y = [estimate[k] for k in common], [measured[k] for k in common]
        if np.std(x) > 0 and np.std(y) > 0:
            pearson = float(np.corrcoef(x, y)[0, 1])
    return {"modules": len(common), "spearman": spearman(estimate, measured), "pearson": pearson}


def _recommend(cfg: ExperimentConfig, run_dir: Path, module_map: ModuleMap, lora: list[LoraParams],
               sizes: list[ModuleSize], combined: dict[str, float]) -> tuple[dict, dict]:
    """The budget summary for sensitivity.json and the recommended LoraConfig keyword arguments."""
    tracking, r = cfg.tracking, cfg.lora.r
    by_key = {key_of(lp.module): lp.module for lp in lora}
    params_total = sum(s.params(r) for s in sizes)
    budget = {"unit": tracking.budget_unit, "value": tracking.budget if tracking.budget is not None else DEFAULT_BUDGET,
              "allocate": tracking.allocation, "num_modules": len(lora), "params_total": params_total}
    if tracking.allocation in ("ranks", "spread", "types"):
        limit = budget_limit(tracking.budget, "params", sizes, r)
        if tracking.allocation == "types":
            ranks = allocate_type_ranks(sizes, {k: m.module_type for k, m in by_key.items()},
                                        _type_shares(run_dir, tracking, by_key.values()), limit)
        elif tracking.allocation == "spread":
            ranks = allocate_spread_ranks(sizes, combined, limit)
        else:
            ranks = allocate_ranks(sizes, combined, limit, min_rank=tracking.min_rank)
        budget["min_rank"] = tracking.min_rank
        chosen = [s.key for s in sizes if ranks[s.key] > 0]
        base = recommended_lora_config([by_key[k] for k in chosen], module_map, r, cfg.lora.lora_alpha,
                                       cfg.lora.lora_dropout)
        config = rank_allocation_config(base, {by_key[k].name: ranks[k] for k in chosen})
        used = sum(s.params(ranks[s.key]) for s in sizes)
        budget.update({"limit": limit, "used": used, "params_budget": limit, "params_used": used,
                       "used_fraction": used / limit, "ranks": {k: ranks[k] for k in chosen}})
    else:
        selection = select_within_budget(sizes, combined, tracking.budget, tracking.budget_unit, r)
        chosen = list(selection.keys)
        config = recommended_lora_config([by_key[k] for k in chosen], module_map, r, cfg.lora.lora_alpha,
                                         cfg.lora.lora_dropout)
        budget.update(selection.as_dict())
        # A budget of modules has no parameter limit: the parameters it takes depend on which modules win.
        budget["params_budget"] = selection.limit if tracking.budget_unit == "params" else None
    budget.update({"selected": chosen, "num_selected": len(chosen), "init": tracking.recommend_init})
    if tracking.recommend_init == "eva":
        config.update(eva_start())  # rho 1: every module keeps the rank chosen here
    return budget, config


def type_shares_from_ablation(run_dir: Path, modules: Iterable[LoraModule]) -> dict[str, float] | None:
    """--allocate types' budget share per module type, from the run's group and module-type ablation deltas
    (sensitivity_ablation.csv; `ablation_type_shares`); None when the run has no module-type ablation."""
    type_deltas = read_ablation_deltas(run_dir, "module_type")
    if not type_deltas:
        return None
    group_of_type = {m.module_type: m.group for m in modules}
    return ablation_type_shares(type_deltas, group_of_type, read_ablation_deltas(run_dir, "group"))


def _type_shares(run_dir: Path, tracking: TrackingConfig, modules: Iterable[LoraModule]) -> dict[str, float]:
    shares = type_shares_from_ablation(run_dir, modules)
    if shares is None:
        why = "the ablation is off (--ablation false)" if not tracking.ablation else "the run has no ablation results"
        raise UserError(f"--allocate types splits the budget by the ablation's group and module-type deltas, but "
                        f"{why}; run with --ablation true or choose --allocate ranks or modules")
    return shares


def _finite(scores: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: an unscored module is null."""
    return {k: (None if v != v else v) for k, v in scores.items()}


def analyze_run(run_dir: str | Path, overrides: dict | None = None, probe: str | Path | None = None) -> dict:
    """`lorasens analyze`: rebuild a finished run's model and re-run the analysis with optional overrides
    (flat field -> value, fields marked `reanalysable`; checked like any config)."""
    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    cfg = with_overrides(loaded.cfg, overrides or {})
    probe_dir = None
    if probe is not None:
        probe_dir = Path(probe)
        if not (probe_dir / CONFIG_FILE).exists():
            raise UserError(f"--probe {probe_dir} is not a lorasens run directory (no {CONFIG_FILE})")
        probe_cfg = read_run_config(probe_dir)
        if probe_cfg.model.model != cfg.model.model:
            raise UserError(f"--probe {probe_dir} trained {probe_cfg.model.model}, the run {cfg.model.model}: "
                            "a probe must use the same model")
    if "data.dataset" in unknown_fields(read_json(run_dir / CONFIG_FILE, tolerant=True)):
        # Recorded by SensitivityCallback in a training script: its held-out data is the script's, not a dataset
        # lorasens can load. Re-ranking from the recorded measures is still possible, if asked for explicitly.
        require_known(run_dir, {"data.dataset"} if cfg.tracking.ablation else set(),
                      "its held-out data is the script's, so the ablation and first-order estimate cannot be rerun "
                      "here: analyze it with --ablation false (rankings from the recorded measures), or pass "
                      "validation_data to the callback")
        logger.warning("%s: data unknown to lorasens; first-order estimate and ablation not recomputed", run_dir)
        return analyze(run_dir, cfg, loaded.model, loaded.module_map, loaded.lora, None, loaded.tokenizer, probe_dir)
    features = prepare(cfg.data, loaded.tokenizer, cfg.training.seed, ("analysis",)).features["analysis"]
    return analyze(run_dir, cfg, loaded.model, loaded.module_map, loaded.lora, features, loaded.tokenizer, probe_dir)
