"""`lorasens validate RUN_DIR`: is the recommended placement better than other placements of the same size?

A recommendation is only evidence if it beats placements that hold as many LoRA parameters. For every seed this
trains fresh adapters, from scratch, with the run's model, data and hyper-parameters, through the same code path
as `lorasens train` (`run_experiment` with a `--placement` file), for:

1. `recommended`: the run's recommended_lora_config.json (with its rank_pattern when it has one), or with
   `--budget` a new selection from the run's combined sensitivity ranking;
2. `random_1..N`: random module sets at the run's rank, each within `MATCH_TOLERANCE` of the recommendation's LoRA
   parameter count;
3. heuristics at the same parameter count (ranks fitted, see `fit_ranks`): `qv` (PEFT's default q_proj,v_proj in
   every layer), `mlp` (the MLP modules), `uniform` (every module at one lowered rank);
4. `all` (every module at the run's rank: the ceiling) and `complement` (the modules the recommendation leaves out).

Each adapter is scored on a test split disjoint from train, validation and analysis (by prompt): the token-weighted
mean loss over target tokens, and with `--metric` a generation metric. Files in OUT (default RUN_DIR/validation):
plan.json, runs/PLACEMENT_seedS/ (one `lorasens train` run each, plus test_scores.json),
placement_validation.csv / .json / .png. A killed validate rerun with the same settings continues: a sub-run with
test_scores.json is done, one with summary.json is only scored, one with just config.json is retrained.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from scipy import stats

from lorasens.safeio import read_json as safe_read_json
from lorasens.analysis.ablation import per_example_losses, validation_batches
from lorasens.analysis.budget import ModuleSize, rank_allocation_config, select_within_budget
from lorasens.analysis.sensitivity import COMBINED, key_of
from lorasens.config import ExperimentConfig, check_environment, config_from_dict
from lorasens.data.features import build_features
from lorasens.data.registry import Example, get_dataset_spec, group_by_prompt, load_examples, subset
from lorasens.data.templates import apply_prompt_template
from lorasens.errors import UserError
from lorasens.evaluation.metrics import ensure_meteor_ready
from lorasens.evaluation.runner import evaluate_model, settings_from_config
from lorasens.models import load_model
from lorasens.module_map import ModuleMap, build_module_map
from lorasens.plots.validation_plots import plot_placement_validation
from lorasens.report import write_report
from lorasens.rundir import files, run_status
from lorasens.rundir.load import load_run, read_run_config
from lorasens.run import run_experiment

logger = logging.getLogger(__name__)

OUT_DIR = files.VALIDATION_DIR
PLAN_FILE = "plan.json"
RUNS_DIR = "runs"
PLACEMENTS_DIR = "placements"
TEST_SCORES = "test_scores.json"
CSV_FILE, JSON_FILE, PNG_FILE, CSV_COLUMNS = (files.VALIDATION_CSV, files.VALIDATION_JSON, files.VALIDATION_PNG,
                                               files.VALIDATION_COLUMNS)
MATCH_TOLERANCE = 0.05  # matched-random placements hold the recommendation's LoRA parameters within 5%
RANDOM_TRIES = 2000
TEST_SEED = 0  # the test subset is the same for every placement and seed
KINDS = ("recommended", "matched_random", "heuristic", "ceiling", "complement")
MATCHED = "matched_random"


@dataclass(frozen=True)
class PlacementSpec:
    """One placement: a rank per module key ("L3.q_proj"); modules without an entry get no LoRA."""

    name: str
    kind: str
    ranks: dict[str, int]
    description: str

    def params(self, sizes: dict[str, ModuleSize]) -> int:
        return sum(sizes[k].params(r) for k, r in self.ranks.items())


@dataclass
class ValidateSettings:
    seeds: tuple[int, ...] = (1, 2, 3)
    max_steps: int | None = None  # None: the run's
    budget: float | None = None  # None: the run's recommendation; else a fraction (< 1) or count of LoRA parameters
    random_sets: int = 3
    metric: str | None = None
    test_samples: int = 200

    def check(self) -> ValidateSettings:
        if not self.seeds:
            raise UserError("--seeds needs at least one seed, e.g. 1,2,3")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds has a repeated seed: {','.join(map(str, self.seeds))}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max_steps must be > 0, got {self.max_steps}")
        if self.budget is not None and self.budget <= 0:
            raise UserError(f"--budget must be > 0 (a fraction < 1 or a count of LoRA parameters), got {self.budget}")
        if self.random_sets < 1:
            raise UserError(f"--random_sets must be >= 1, got {self.random_sets}")
        if self.test_samples < 1:
            raise UserError(f"--test_samples must be >= 1, got {self.test_samples}")
        return self


def parse_seeds(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise UserError(f"--seeds needs a comma list of whole numbers (e.g. 1,2,3), got {text!r}")
    return tuple(int(p) for p in parts)


# ---------------------------------------------------------------------------------------------------------------
# Placements


def module_sizes(model: torch.nn.Module, module_map: ModuleMap) -> dict[str, ModuleSize]:
    """In/out widths of every module of the map, by key (GPT-2's Conv1D stores its weight as in x out)."""
    sizes = {}
    for m in module_map.modules:
        layer = model.get_submodule(m.name)
        if isinstance(layer, torch.nn.Linear):
            n_in, n_out = layer.in_features, layer.out_features
        else:
            n_in, n_out = layer.weight.shape
        sizes[key_of(m)] = ModuleSize(key_of(m), int(n_in), int(n_out))
    return sizes


def recommended_ranks(run_dir: Path, model: torch.nn.Module, module_map: ModuleMap) -> dict[str, int]:
    """The modules (and ranks) of RUN_DIR/recommended_lora_config.json, resolved with PEFT's own matchers."""
    path = run_dir / files.RECOMMENDED_CONFIG
    if not path.exists():
        raise UserError(f"{run_dir} has no {files.RECOMMENDED_CONFIG} (run `lorasens analyze {run_dir}` first)")
    config = LoraConfig(**json.loads(path.read_text()))
    ranks = {}
    for m in module_map.modules:
        if check_target_module_exists(config, m.name):
            pattern = config.rank_pattern or {}
            ranks[key_of(m)] = int(pattern.get(get_pattern_key(pattern.keys(), m.name), config.r))
    if not ranks:
        raise UserError(f"{path} selects no module of the run's model")
    return {k: r for k, r in ranks.items() if r > 0}


def budget_ranks(run_dir: Path, sizes: dict[str, ModuleSize], budget: float, r: int) -> dict[str, int]:
    """`--budget`: the run's combined sensitivity ranking, cut at a LoRA-parameter budget (rank r everywhere)."""
    path = run_dir / files.SENSITIVITY
    if not path.exists():
        raise UserError(f"--budget needs {path} (run `lorasens analyze {run_dir}` first)")
    scores = (safe_read_json(path, files.SENSITIVITY).get("measures") or {}).get(COMBINED)  # corrupt: one line
    if not scores:
        raise UserError(f"{path} has no {COMBINED!r} measure to rank modules by")
    scores = {k: (math.nan if v is None else v) for k, v in scores.items()}
    selection = select_within_budget(list(sizes.values()), scores, budget, "params", r)
    return {k: r for k in selection.keys}


def fit_ranks(keys: list[str], sizes: dict[str, ModuleSize], target: int) -> dict[str, int]:
    """Ranks for `keys` holding about `target` LoRA parameters: rank b everywhere, b+1 on an evenly spread subset.

    b = floor(target / cost of rank 1 on all keys); then modules spread evenly over `keys` (map order, so over
    layers) get one more rank while that brings the total closer to the target. Modules left at rank 0 get no LoRA.
    """
    unit = sum(sizes[k].in_features + sizes[k].out_features for k in keys)
    base = target // unit
    ranks = {k: base for k in keys}
    used = base * unit
    for index in spread_order(len(keys)):
        k = keys[index]
        cost = sizes[k].in_features + sizes[k].out_features
        if abs(used + cost - target) < abs(used - target):
            ranks[k] += 1
            used += cost
    return {k: r for k, r in ranks.items() if r > 0}


def spread_order(n: int) -> list[int]:
    """0..n-1 in an order that keeps any prefix spread out: 0, n/2, n/4, 3n/4, n/8, ... then whatever is left."""
    seen: dict[int, None] = {}
    denominator = 1
    while len(seen) < n and denominator <= 2 * n:
        for numerator in range(denominator):
            seen.setdefault((numerator * n) // denominator, None)
        denominator *= 2
    for i in range(n):
        seen.setdefault(i, None)
    return list(seen)


def matched_random(keys: list[str], sizes: dict[str, ModuleSize], r: int, target: int, rng: random.Random,
                   tolerance: float = MATCH_TOLERANCE) -> dict[str, int]:
    """A random module set at rank r whose LoRA parameters lie within `tolerance` of `target`, centred on it.

    Modules are added in a random order while the total stays <= target, then the one left-out module that brings
    the total closest to the target is added if it does (so a set is as likely a little above as below: filling up
    to target * (1 + tolerance) would give the random sets systematically more parameters than the recommendation).
    A draw further than `tolerance` away is discarded; raises when no draw matches (modules too large).
    """
    for _ in range(RANDOM_TRIES):
        order = keys[:]
        rng.shuffle(order)
        chosen, used = set(), 0
        for k in order:
            cost = sizes[k].params(r)
            if used + cost <= target:
                chosen.add(k)
                used += cost
        rest = [k for k in order if k not in chosen]
        if rest:
            last = min(rest, key=lambda k: abs(used + sizes[k].params(r) - target))
            if abs(used + sizes[last].params(r) - target) < abs(used - target):
                chosen.add(last)
                used += sizes[last].params(r)
        if chosen and abs(used - target) <= tolerance * target:
            return {k: r for k in keys if k in chosen}
    raise UserError(f"no random module set at rank {r} holds {target} LoRA parameters within {tolerance:.0%}; "
                    "use a larger --budget")


def plan_placements(ranks_rec: dict[str, int], sizes: dict[str, ModuleSize], module_map: ModuleMap, r: int,
                    random_sets: int) -> list[PlacementSpec]:
    """Every placement validate trains (see the module docstring), all at the recommendation's LoRA parameters."""
    keys = [key_of(m) for m in module_map.modules]
    target = sum(sizes[k].params(v) for k, v in ranks_rec.items())
    allocation = len(set(ranks_rec.values())) > 1 or set(ranks_rec.values()) != {r}
    placements = [PlacementSpec("recommended", "recommended", dict(ranks_rec),
                                "the run's recommendation" + (" (rank allocation)" if allocation else ""))]
    for i in range(1, random_sets + 1):
        rng = random.Random(f"matched-random-{i}")  # the same sets for every seed: seeds vary training only
        placements.append(PlacementSpec(f"random_{i}", MATCHED, matched_random(keys, sizes, r, target, rng),
                                        f"random modules at rank {r}, LoRA parameters within {MATCH_TOLERANCE:.0%}"))
    types = {m.module_type for m in module_map.modules}
    if {"q_proj", "v_proj"} <= types:
        qv = [key_of(m) for m in module_map.modules if m.module_type in ("q_proj", "v_proj")]
        placements.append(PlacementSpec("qv", "heuristic", fit_ranks(qv, sizes, target),
                                        "PEFT's default q_proj,v_proj in every layer, rank fitted to the budget"))
    else:
        logger.info("validate: no q_proj/v_proj in %s; the qv heuristic is left out", module_map.architecture)
    mlp = [key_of(m) for m in module_map.modules if m.group == "mlp"]
    placements.append(PlacementSpec("mlp", "heuristic", fit_ranks(mlp, sizes, target),
                                    "the MLP modules of every layer, rank fitted to the budget"))
    placements.append(PlacementSpec("uniform", "heuristic", fit_ranks(keys, sizes, target),
                                    "every module at one lowered rank, fitted to the budget"))
    placements.append(PlacementSpec("all", "ceiling", {k: r for k in keys}, f"every module at rank {r} (ceiling)"))
    rest = {k: r for k in keys if k not in ranks_rec}
    if rest:
        placements.append(PlacementSpec("complement", "complement", rest,
                                        f"the modules the recommendation leaves out, at rank {r}"))
    return [p for p in placements if p.ranks]


def placement_config(spec: PlacementSpec, module_map: ModuleMap, r: int, alpha: float, dropout: float) -> dict:
    """peft.LoraConfig arguments for a placement; alpha / rank stays the run's, so every module's scaling is too."""
    paths = {key_of(m): m.name for m in module_map.modules}
    base = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "task_type": "CAUSAL_LM",
            "target_modules": [paths[k] for k in paths if k in spec.ranks]}
    return rank_allocation_config(base, {paths[k]: v for k, v in spec.ranks.items()})


# ---------------------------------------------------------------------------------------------------------------
# The test split


def held_out_examples(cfg: ExperimentConfig, seeds: tuple[int, ...], test_samples: int) -> tuple[list[Example], dict]:
    """`test_samples` distinct prompts of the test split that no training, validation or analysis split holds.

    Left out: every prompt of the whole train split (so the train subset of any seed, and an analysis split carved
    out of train, are covered whatever their sampling) and of every seed's validation subset (E2E without
    testset_w_refs.csv falls back to devset.csv, which is also the validation file). One example per prompt,
    target = its first reference, all references kept for `--metric`.
    """
    data = cfg.data

    def prompts(examples: list[Example]) -> set[str]:
        return {ex.prompt for ex in apply_prompt_template(examples, data.prompt_template, data.dataset)}

    seen = prompts(load_examples(data.dataset, "train", data.data_dir, TEST_SEED))
    for seed in sorted(set(seeds) | {cfg.training.seed}):
        seen |= prompts(load_examples(data.dataset, "validation", data.data_dir, seed, data.eval_samples))
    test = apply_prompt_template(load_examples(data.dataset, "test", data.data_dir, TEST_SEED), data.prompt_template,
                                 data.dataset)
    grouped = group_by_prompt(test)
    fresh = [ex for ex in grouped if ex.prompt not in seen]
    if not fresh:
        raise UserError(f"the {data.dataset} test split has no prompt outside the train/validation splits")
    chosen = subset(fresh, test_samples, TEST_SEED)
    info = {"split": "test", "prompts_in_split": len(grouped), "prompts_excluded_as_seen": len(grouped) - len(fresh),
            "prompts_used": len(chosen)}
    return chosen, info


def example_losses(model: torch.nn.Module, features: list[dict], batch_size: int, pad_token_id: int) -> list[tuple[float, int]]:
    """(summed NLL over target tokens, target tokens) per feature, in input order: the ablation engine's exact
    full-model pass, padded batches."""
    device = next(model.parameters()).device
    batches = validation_batches(features, batch_size, pad_token_id, device)
    sums, counts = per_example_losses(model, batches, len(features))
    return list(zip(sums.tolist(), counts.tolist()))


# ---------------------------------------------------------------------------------------------------------------
# Running


@dataclass
class SubRun:
    placement: PlacementSpec
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name

    def status(self) -> str:
        if (self.run_dir / TEST_SCORES).exists():
            return "complete"
        status = run_status(self.run_dir)  # a finished training still needs its test scores
        return "trained" if status == "complete" else status


@dataclass
class ValidationResult:
    out_dir: Path
    rows: list[dict]
    summary: dict
    outcome: dict[str, str] = field(default_factory=dict)  # sub-run -> skipped (complete) | scored | trained


def validate_run(run_dir: str | Path, settings: ValidateSettings, out_dir: str | Path | None = None,
                 overwrite: bool = False) -> ValidationResult:
    settings.check()
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / OUT_DIR
    started = time.time()

    loaded = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed)
    module_map = build_module_map(loaded.model, cfg.model.attn_modules, cfg.model.mlp_modules)
    sizes = module_sizes(loaded.model, module_map)
    r, alpha = cfg.lora.r, cfg.lora.lora_alpha
    if settings.budget is not None:
        rec = budget_ranks(run_dir, sizes, settings.budget, r)
    else:
        rec = recommended_ranks(run_dir, loaded.model, module_map)
    placements = plan_placements(rec, sizes, module_map, r, settings.random_sets)
    examples, test_info = held_out_examples(cfg, settings.seeds, settings.test_samples)
    if settings.metric is not None and get_dataset_spec(cfg.data.dataset).evaluation.needs_meteor:
        ensure_meteor_ready()  # METEOR: fail now, not after the first training

    plan = {"run_dir": str(run_dir.resolve()), "settings": asdict(settings), "max_steps": settings.max_steps or cfg.training.max_steps,
            "test": {**test_info, "prompts": [ex.prompt for ex in examples]},
            "placements": [{"name": p.name, "kind": p.kind, "description": p.description,
                            "lora_params": p.params(sizes), "ranks": p.ranks} for p in placements]}
    plan["settings"]["seeds"] = list(settings.seeds)
    _prepare_out(out, plan, overwrite)
    (out / PLACEMENTS_DIR).mkdir(exist_ok=True)
    placement_files = {}
    for p in placements:
        path = out / PLACEMENTS_DIR / f"{p.name}.json"
        path.write_text(json.dumps(placement_config(p, module_map, r, alpha, cfg.lora.lora_dropout), indent=2) + "\n")
        placement_files[p.name] = path.resolve()

    tokenizer = loaded.tokenizer
    features, stats = build_features(examples, tokenizer, cfg.data.max_length, "test")
    if not features:
        raise UserError(f"no test example fits --max_length {cfg.data.max_length}")
    del loaded
    subruns = [SubRun(p, seed, out / RUNS_DIR / f"{p.name}_seed{seed}") for seed in settings.seeds for p in placements]
    todo = [s for s in subruns if s.status() != "complete"]
    logger.info("validate: %d placements x %d seeds = %d trainings (%d done, %d to go); %d test prompts, budget %d "
                "LoRA parameters", len(placements), len(settings.seeds), len(subruns), len(subruns) - len(todo),
                len(todo), len(features), placements[0].params(sizes))
    outcome = {s.name: "skipped (complete)" for s in subruns if s not in todo}

    def write_finished_seeds() -> tuple[list[dict], dict] | None:
        """The three files over the seeds whose trainings are all scored (all seeds once the validation is done)."""
        done = tuple(seed for seed in settings.seeds
                     if all(sub.status() == "complete" for sub in subruns if sub.seed == seed))
        if not done:
            return None
        rows = [_row(sub, sizes, settings) for sub in subruns if sub.seed in done]
        summary = summarise(rows, replace(settings, seeds=done), placements, sizes, test_info, cfg, run_dir)
        summary["seeds_planned"] = list(settings.seeds)
        summary["complete"] = len(done) == len(settings.seeds)
        summary["wall_time_s"] = round(time.time() - started, 2)  # of this invocation
        write_outputs(out, rows, summary)
        return rows, summary

    write_finished_seeds()  # a resumed validation is readable at once
    for index, sub in enumerate(todo, 1):
        status = sub.status()
        logger.info("validate [%d/%d] %s (%s)", index, len(todo), sub.name, status)
        if status != "trained":
            _train(cfg, sub, placement_files[sub.placement.name], settings, rerun=status == "incomplete")
        _score(sub, features, examples, cfg, settings, sizes)
        outcome[sub.name] = "scored" if status == "trained" else "trained"
        if all(o.status() == "complete" for o in subruns if o.seed == sub.seed) and sub is not todo[-1]:
            write_finished_seeds()  # a seed is finished: the files cover it from now on
    rows, summary = write_finished_seeds()
    _update_report(run_dir, out)
    return ValidationResult(out, rows, summary, outcome)


def _prepare_out(out: Path, plan: dict, overwrite: bool) -> None:
    """A validation folder holds one plan: rerunning the same plan continues it; another plan needs --overwrite."""
    plan_path = out / PLAN_FILE
    if out.exists() and any(out.iterdir()):
        if not plan_path.exists():
            raise UserError(f"{out} exists and is not a validation folder (no {PLAN_FILE}); choose another --out")
        if overwrite:
            shutil.rmtree(out)
        elif json.loads(plan_path.read_text()) != plan:
            raise UserError(f"{out} holds a validation with other settings or placements; pass --overwrite to "
                            "replace it, or --out DIR to keep both")
    out.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")


def training_config(cfg: ExperimentConfig, sub: SubRun, placement_file: Path, settings: ValidateSettings,
                    rerun: bool) -> ExperimentConfig:
    """The run's config with this placement and seed: static (no phases), and nothing after training but the test."""
    config = json.loads(placement_file.read_text())
    data = cfg.to_dict()
    data["lora"].update(placement=str(placement_file), r=config["r"], lora_alpha=config["lora_alpha"])
    data["training"].update(seed=sub.seed, save_steps=0, report_to="none",
                            max_steps=settings.max_steps or cfg.training.max_steps)
    data["schedule"].update(dynamic_lora=False, phase_strategy=None, phase1_end=None, phase2_end=None,
                            phase_ends=None, reset_optimizer_on_switch=False)
    data["tracking"].update(track_gradients=False, track_importance=False, track_update_magnitude=False,
                            ablation=False)
    data["evaluation"].update(evaluate=False, baseline=False)
    data["output"].update(output_dir=str(sub.run_dir.parent), experiment_name=sub.run_dir.name, overwrite=rerun,
                          resume=False)
    return check_environment(config_from_dict(data))


def _train(cfg: ExperimentConfig, sub: SubRun, placement_file: Path, settings: ValidateSettings, rerun: bool) -> None:
    run_experiment(training_config(cfg, sub, placement_file, settings, rerun), after_training=())


def _score(sub: SubRun, features: list[dict], examples: list[Example], cfg: ExperimentConfig,
           settings: ValidateSettings, sizes: dict[str, ModuleSize]) -> None:
    loaded = load_run(sub.run_dir)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    per_example = example_losses(loaded.model, features, cfg.evaluation.eval_batch_size, pad)
    nll, tokens = sum(x for x, _ in per_example), sum(t for _, t in per_example)
    trained = sum(lp.A.numel() + lp.B.numel() for lp in loaded.lora)
    expected = sub.placement.params(sizes)
    if trained != expected:
        raise RuntimeError(f"{sub.name}: the adapter holds {trained} LoRA parameters, the placement {expected}")
    scores = {"test_loss": nll / tokens, "test_tokens": tokens, "lora_params": trained,
              "num_modules": len(loaded.lora), "per_example": [[round(x, 6), t] for x, t in per_example]}
    if settings.metric is not None:
        scores["metric"] = settings.metric
        scores["metric_value"] = _metric(loaded, examples, cfg, settings)
    (sub.run_dir / TEST_SCORES).write_text(json.dumps(scores) + "\n")
    logger.info("validate: %s test loss %.4f (%d LoRA parameters)", sub.name, scores["test_loss"], trained)


def _metric(loaded, examples: list[Example], cfg: ExperimentConfig, settings: ValidateSettings) -> float | None:
    eval_settings = settings_from_config(cfg, "test", len(examples))
    result = evaluate_model(loaded.model, loaded.tokenizer, cfg, eval_settings, examples=examples)
    metrics = result["metrics"]
    if settings.metric not in metrics:
        numeric = [k for k, v in metrics.items() if isinstance(v, (int, float))]
        raise UserError(f"--metric {settings.metric!r} is not a metric of {cfg.data.dataset}; valid: {', '.join(numeric)}")
    value = metrics[settings.metric]
    return None if value is None else float(value)


def _row(sub: SubRun, sizes: dict[str, ModuleSize], settings: ValidateSettings) -> dict:
    scores = json.loads((sub.run_dir / TEST_SCORES).read_text())
    modules = " ".join(f"{k}:{v}" for k, v in sub.placement.ranks.items())
    return {"placement": sub.placement.name, "kind": sub.placement.kind, "seed": sub.seed,
            "num_modules": scores["num_modules"], "lora_params": scores["lora_params"], "test_loss": scores["test_loss"],
            "test_tokens": scores["test_tokens"], "metric": settings.metric or "",
            "metric_value": scores.get("metric_value"), "modules": modules,
            "_per_example": scores["per_example"]}


# ---------------------------------------------------------------------------------------------------------------
# Statistics and files


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean and its two-sided Student-t confidence interval (None bounds for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def summarise(rows: list[dict], settings: ValidateSettings, placements: list[PlacementSpec],
              sizes: dict[str, ModuleSize], test_info: dict, cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Per placement: mean test loss and 95% CI over seeds; paired per-seed differences recommended - X."""
    by = {(row["placement"], row["seed"]): row for row in rows}
    seeds = list(settings.seeds)
    per_placement = {}
    for p in placements:
        losses = [by[(p.name, s)]["test_loss"] for s in seeds]
        entry = {"kind": p.kind, "description": p.description, "lora_params": p.params(sizes),
                 "num_modules": len(p.ranks), "test_loss": mean_ci(losses)}
        metric_values = [by[(p.name, s)]["metric_value"] for s in seeds]
        if settings.metric is not None and all(v is not None for v in metric_values):
            entry["metric"] = {"name": settings.metric, **mean_ci(metric_values)}
        per_placement[p.name] = entry
    random_names = [p.name for p in placements if p.kind == MATCHED]
    target = placements[0].params(sizes)
    per_seed_random = {s: sum(by[(n, s)]["test_loss"] for n in random_names) / len(random_names) for s in seeds}
    per_placement[MATCHED] = {"kind": MATCHED, "description": f"mean of the {len(random_names)} matched-random sets per seed",
                              "lora_params": round(sum(per_placement[n]["lora_params"] for n in random_names) / len(random_names)),
                              "num_modules": None, "test_loss": mean_ci(list(per_seed_random.values()))}
    rec = {s: by[("recommended", s)]["test_loss"] for s in seeds}
    paired = {}
    others = {MATCHED: per_seed_random}
    others.update({p.name: {s: by[(p.name, s)]["test_loss"] for s in seeds} for p in placements if p.name != "recommended"})
    for name, values in others.items():
        diffs = [rec[s] - values[s] for s in seeds]
        paired[name] = {**mean_ci(diffs), "per_seed": dict(zip(map(str, seeds), diffs)),
                        "recommended_lower_in": sum(d < 0 for d in diffs)}
    paired[MATCHED]["recommended_lower_than_random_set"] = sum(
        rec[s] < by[(n, s)]["test_loss"] for s in seeds for n in random_names)
    paired[MATCHED]["comparisons"] = len(seeds) * len(random_names)
    summary = {
        "run_dir": str(run_dir),
        "model": cfg.model.model,
        "dataset": cfg.data.dataset,
        "seeds": seeds,
        "max_steps": settings.max_steps or cfg.training.max_steps,
        "budget_lora_params": target,
        "all_modules_lora_params": sum(s.params(cfg.lora.r) for s in sizes.values()),
        "match_tolerance": MATCH_TOLERANCE,
        "loss": "token-weighted mean next-token cross-entropy over the target tokens of the test examples",
        "test": test_info,
        "confidence_intervals": "95% Student-t intervals over seeds (paired by seed for differences)",
        "placements": per_placement,
        "paired_difference": paired,
        "measures": measure_agreement(rows, run_dir, placements),
        "verdict": verdict(paired[MATCHED], len(seeds)),
    }
    return summary


def verdict(diff: dict, seeds: int) -> str:
    mean, low, high = diff["mean"], diff["ci_low"], diff["ci_high"]
    text = f"recommended - matched-random test loss = {mean:+.4f}"
    if low is None:
        return text + f" (one seed: no confidence interval; rerun with --seeds 1,2,3)"
    text += f" (95% CI [{low:+.4f}, {high:+.4f}], {seeds} seeds): "
    if high < 0:
        return text + "the recommendation beats parameter-matched random placements"
    if low > 0:
        return text + "the recommendation is worse than parameter-matched random placements"
    return text + "no significant difference from parameter-matched random placements"


def measure_agreement(rows: list[dict], run_dir: Path, placements: list[PlacementSpec]) -> dict:
    """For each measure of sensitivity.json: does it rank the same-size placements (recommended + random) as their
    test loss does? Spearman between a placement's summed measure and its mean test loss; negative = the measure
    would have picked lower-loss placements."""
    path = run_dir / files.SENSITIVITY
    if not path.exists():
        return {}
    measures = safe_read_json(path, files.SENSITIVITY).get("measures") or {}
    same_size = [p for p in placements if p.kind in ("recommended", MATCHED)]
    if len(same_size) < 3:
        return {}
    loss = {p.name: sum(r["test_loss"] for r in rows if r["placement"] == p.name) /
            sum(1 for r in rows if r["placement"] == p.name) for p in same_size}
    result = {}
    for name, scores in measures.items():
        totals = [sum((scores.get(k) or 0.0) for k in p.ranks) for p in same_size]
        rho = stats.spearmanr(totals, [loss[p.name] for p in same_size]).statistic
        result[name] = {"spearman_with_test_loss": None if rho != rho else float(rho),
                        "best_placement": same_size[max(range(len(totals)), key=totals.__getitem__)].name}
    result["best_placement_by_test_loss"] = min(loss, key=loss.get)
    result["placements_compared"] = [p.name for p in same_size]
    return result


def write_outputs(out: Path, rows: list[dict], summary: dict) -> None:
    with (out / CSV_FILE).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS})
    (out / JSON_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_placement_validation(out)
    logger.info("validate: %s", summary["verdict"])


def _update_report(run_dir: Path, out: Path) -> None:
    """Redraw the run's report.html so it shows the validation section (only when validating into the run)."""
    if out.resolve() != (run_dir / OUT_DIR).resolve():
        return
    try:
        write_report(run_dir, redraw=False)
    except UserError as exc:
        logger.warning("report.html not updated: %s", exc)
