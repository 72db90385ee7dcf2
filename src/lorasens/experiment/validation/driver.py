"""`lorasens validate RUN_DIR`: plan the arms, tune each arm's learning rate, train every seed, score on the test set.

1. Plan (plan.json, placements/NAME.json): every arm at the budget of the run's recommendation, checked to ±5%.
2. Sweep (sweep/NAME_lrX/): each arm at each rate of `lr_grid` on the first seed, `sweep_steps` long; the rate with
   the lowest *validation* loss is the arm's (the test split is never looked at).
3. Trainings (runs/NAME_seedS/): every arm and seed at its rate, `max_steps` long, last-step adapter, validation
   loss logged along the way; then scored on the test prompts: per-prompt loss and, with generation, the dataset's
   metrics per prompt (test_scores.json).
4. Outputs after every finished seed (`outputs.write_outputs`).

Every training goes through `run_experiment` (the `lorasens train` path) with a placement file. A killed validate
rerun with the same settings continues: finished trainings are not redone.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lorasens.analysis.ablation import per_example_losses, validation_batches
from lorasens.analysis.budget import (ModuleSize, allocate_spread_ranks, allocate_type_ranks, fit_ranks,
                                      starts_with_eva)
from lorasens.analysis.post import type_shares_from_ablation
from lorasens.analysis.sensitivity import key_of
from lorasens.config import ExperimentConfig, check_environment, config_from_dict
from lorasens.data.features import build_features
from lorasens.data.prepare import examples as split_examples
from lorasens.data.prepare import prepare
from lorasens.data.registry import Example, get_dataset_spec, group_by_prompt, subset
from lorasens.errors import UserError
from lorasens.evaluation.predictions import read_rows
from lorasens.evaluation.runner import evaluate_model, settings_from_config
from lorasens.experiment.run import run_experiment
from lorasens.experiment.validation import arms as A
from lorasens.experiment.validation import peers
from lorasens.experiment.validation.outputs import Finished, write_outputs
from lorasens.metrics import ensure_meteor_ready
from lorasens.model.loading import load_model
from lorasens.model.module_map import ModuleMap, build_module_map
from lorasens.rundir import files, run_status
from lorasens.rundir.load import read_run_config
from lorasens.safeio import read_json, write_json
from lorasens.training.context import load_run

logger = logging.getLogger(__name__)

PLAN_FILE = files.VALIDATION_PLAN
TEST_SCORES = files.VALIDATION_TEST_SCORES
TEST_SEED = 0  # the test subset is the same for every arm and seed
TEST_MAX_LENGTH = 8192  # test prompts are scored uncut (a longer one is an error, not a silently shorter test)


@dataclass
class ValidateSettings:
    seeds: tuple[int, ...] = (1, 2, 3)
    extra_seeds: tuple[int, ...] = ()  # more seeds for the arms in extra_seed_arms
    extra_seed_arms: tuple[str, ...] = ()
    arms: tuple[str, ...] | None = None  # None: every arm that applies
    random_sets: int = 6
    max_steps: int | None = None  # None: the run's
    sweep_steps: int | None = None  # None: half of max_steps
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    budget: float | None = None  # None: the run's recommendation; else a fraction (< 1) or count of LoRA parameters
    test_samples: int | None = None  # None: every unseen test prompt
    generate: bool = True

    def check(self) -> ValidateSettings:
        if not self.seeds:
            raise UserError("--seeds needs at least one seed, e.g. 1,2,3")
        every = (*self.seeds, *self.extra_seeds)
        if len(set(every)) != len(every):
            raise UserError(f"--seeds/--extra_seeds repeat a seed: {','.join(map(str, every))}")
        unknown = [a for a in (*(self.arms or ()), *self.extra_seed_arms) if a not in A.ARMS]
        if unknown:
            raise UserError(f"unknown arm(s) {', '.join(unknown)}; valid: {', '.join(A.ARMS)}")
        if self.arms is not None and "recommended" not in self.arms:
            self.arms = ("recommended", *self.arms)  # every comparison is against it
        for name in ("max_steps", "sweep_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name} must be > 0, got {value}")
        if not self.lr_grid or any(not (lr > 0) for lr in self.lr_grid):
            raise UserError(f"--lr_grid needs learning rates > 0, got {self.lr_grid}")
        if self.budget is not None and self.budget <= 0:
            raise UserError(f"--budget must be > 0 (a fraction < 1 or a count of LoRA parameters), got {self.budget}")
        if self.random_sets < 1:
            raise UserError(f"--random_sets must be >= 1, got {self.random_sets}")
        if self.test_samples is not None and self.test_samples < 1:
            raise UserError(f"--test_samples must be >= 1, got {self.test_samples}")
        return self

    def seeds_of(self, arm: str) -> tuple[int, ...]:
        return (*self.seeds, *self.extra_seeds) if arm in self.extra_seed_arms else self.seeds


@dataclass
class Job:
    """One training: an arm at a learning rate and seed, in its own run folder."""

    arm: A.Arm
    seed: int
    lr: float
    steps: int
    run_dir: Path
    kind: str  # sweep | test

    def status(self) -> str:
        if self.kind == "test" and (self.run_dir / TEST_SCORES).exists():
            return "complete"
        status = run_status(self.run_dir)
        if self.kind == "sweep":
            return status
        return "trained" if status == "complete" else status


@dataclass
class ValidationResult:
    out_dir: Path
    summary: dict
    outcome: dict[str, str] = field(default_factory=dict)  # training -> skipped (complete) | scored | trained


def parse_seeds(text: str, flag: str = "--seeds") -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise UserError(f"{flag} needs a comma list of whole numbers (e.g. 1,2,3), got {text!r}")
    return tuple(int(p) for p in parts)


# ---------------------------------------------------------------------------------------------------------------
# Planning


def module_sizes(model: torch.nn.Module, module_map: ModuleMap) -> dict[str, ModuleSize]:
    """In/out widths of every module of the map, by key (GPT-2's Conv1D stores its weight as in x out)."""
    sizes = {}
    for m in module_map.modules:
        layer = model.get_submodule(m.name)
        n_in, n_out = (layer.in_features, layer.out_features) if isinstance(layer, torch.nn.Linear) else layer.weight.shape
        sizes[key_of(m)] = ModuleSize(key_of(m), int(n_in), int(n_out))
    return sizes


def recommended_ranks(run_dir: Path, model: torch.nn.Module, module_map: ModuleMap) -> dict[str, int]:
    """The modules (and ranks) of RUN_DIR/recommended_lora_config.json, resolved with PEFT's own matchers."""
    from lorasens.model.lora import load_placement

    path = run_dir / files.RECOMMENDED_CONFIG
    if not path.exists():
        raise UserError(f"{run_dir} has no {files.RECOMMENDED_CONFIG} (run `lorasens analyze {run_dir}` first)")
    placement = load_placement(path, model, module_map)
    config = placement.config
    from peft.utils.other import get_pattern_key

    pattern = config.rank_pattern or {}
    ranks = {key_of(m): int(pattern.get(get_pattern_key(pattern.keys(), m.name), config.r)) for m in placement.modules}
    return {k: r for k, r in ranks.items() if r > 0}


def recommended_start(run_dir: Path) -> str:
    """How the recommendation's LoRA starts: "eva" when its config asks for EVA's start (--recommend_init eva)."""
    config = read_json(run_dir / files.RECOMMENDED_CONFIG, "the recommended config")
    return "eva" if starts_with_eva(config) else "default"


def _sensitivity(run_dir: Path) -> dict:
    path = run_dir / files.SENSITIVITY
    if not path.exists():
        raise UserError(f"{run_dir} has no {files.SENSITIVITY} (run `lorasens analyze {run_dir}` first)")
    return read_json(path, "the run's sensitivity")


FLOOR_RANK = 1  # the ranks_floor arm's --min_rank


def plan_arms(cfg: ExperimentConfig, run_dir: Path, settings: ValidateSettings) -> tuple[list[A.Arm], dict]:
    """Every arm of `settings.arms` at the recommendation's LoRA parameters; (arms, budget facts)."""
    from lorasens.analysis.budget import select_within_budget
    from lorasens.analysis.sensitivity import COMBINED

    loaded = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    module_map = build_module_map(model, cfg.model.attn_modules, cfg.model.mlp_modules)
    sizes = module_sizes(model, module_map)
    r = cfg.lora.r
    sensitivity = _sensitivity(run_dir)
    if settings.budget is not None:
        scores = {k: (math.nan if v is None else v) for k, v in (sensitivity.get("measures") or {}).get(COMBINED, {}).items()}
        rec = {k: r for k in select_within_budget(list(sizes.values()), scores, settings.budget, "params", r).keys}
    else:
        rec = recommended_ranks(run_dir, model, module_map)
    target = sum(sizes[k].params(v) for k, v in rec.items())
    wanted = settings.arms or tuple(A.ARMS)
    keys = list(sizes)
    train_features = _train_features(cfg, tokenizer)
    rng = random.Random("lorasens-validate")
    start = recommended_start(run_dir)
    arms: list[A.Arm] = [A.Arm("recommended", "recommended", rec, init=start)]
    combined = (sensitivity.get("measures") or {}).get(COMBINED) or {}
    weights = {k: (v or 0.0) for k, v in combined.items()}  # an unscored module (null) weighs 0
    rank_profile = A.allocated_ranks(sizes, weights, target) if weights else {}
    random_sets = max(settings.random_sets, len(settings.seeds_of("random")))
    for name in wanted:
        if name == "recommended":
            continue
        if name in ("ranks", "ranks_floor"):
            arms += _rank_arms(name, sizes, weights, rank_profile, rec, target, start)
        elif name == "spread":
            arms += _spread_arm(sizes, weights, rec, target)
        elif name == "types":
            arms += _types_arm(run_dir, module_map, sizes, rec, target)
        elif name == "value":
            per_param = (sensitivity.get("measures_per_param") or {}).get("first_order")
            if per_param:
                arms.append(A.Arm("value", "value", A.value_ranks(sizes, per_param, r, target)))
            else:
                logger.info("validate: the run has no first_order measure; the value arm is left out")
        elif name in ("eva_init", "ranks_eva_init"):
            arms += _eva_start_arms(name, rec, rank_profile, start)
        elif name == "eva":
            arms.append(peers.eva_arm(model, module_map, sizes, train_features, tokenizer, cfg.training.batch_size, target))
        elif name == "adalora":
            arms.append(peers.adalora_arm(sizes, target))
        elif name == "gora":
            arms.append(peers.gora_arm(model, module_map, sizes, train_features, tokenizer, cfg.training.batch_size,
                                       target))
        elif name == "kappa":
            arms.append(peers.kappa_arm(model, module_map, sizes, r, target))
        elif name == "qv":
            qv = [key_of(m) for m in module_map.modules if m.module_type in ("q_proj", "v_proj")]
            if qv:
                arms.append(A.Arm("qv", "qv", fit_ranks(qv, sizes, target)))
        elif name == "uniform":
            arms.append(A.Arm("uniform", "uniform", fit_ranks(keys, sizes, target)))
        elif name == "mlp":
            arms.append(A.Arm("mlp", "mlp", fit_ranks([key_of(m) for m in module_map.modules if m.group == "mlp"],
                                                       sizes, target)))
        elif name == "random":
            for i in range(1, random_sets + 1):
                arms.append(A.Arm(f"random_{i}", "random",
                                  A.matched_random(keys, sizes, r, target, random.Random(f"matched-random-{i}"))))
        elif name == "random_typed":
            arms.append(A.Arm("random_typed", "random_typed", A.random_typed(rec, module_map, rng)))
        elif name == "ranks_shuffled" and rank_profile:
            arms.append(A.Arm("ranks_shuffled", "ranks_shuffled", A.shuffled_ranks(rank_profile, module_map, rng)))
        elif name == "all":
            arms.append(A.Arm("all", "all", {k: r for k in keys}))
    for arm in arms:
        if arm.adalora is None:
            A.check_matched(arm, planned_params(arm, sizes), target)
    budget = {"lora_params": target, "all_modules_lora_params": sum(s.params(r) for s in sizes.values()),
              "modules": len(rec), "r": r, "module_sizes": {k: [s.in_features, s.out_features] for k, s in sizes.items()}}
    return arms, budget


def _eva_start_arms(name: str, rec: dict[str, int], rank_profile: dict[str, int], start: str) -> list[A.Arm]:
    """EVA's start on the recommendation's modules (`eva_init`) or on the ranks allocation (`ranks_eva_init`): what
    separates where the budget goes from how it starts. Left out where it would be the recommendation itself."""
    if name == "eva_init":
        if start == "eva":
            logger.info("validate: the recommendation already starts with EVA; the eva_init arm is left out")
            return []
        return [A.Arm("eva_init", "eva_init", rec, init="eva", eva_rho=1.0)]
    if not rank_profile or rank_profile == rec:
        return []
    return [A.Arm("ranks_eva_init", "ranks_eva_init", rank_profile, init="eva", eva_rho=1.0)]


def _rank_arms(name: str, sizes: dict[str, ModuleSize], weights: dict[str, float], rank_profile: dict[str, int],
               rec: dict[str, int], target: int, start: str = "default") -> list[A.Arm]:
    """The `ranks` arm (unless the recommendation already is that allocation with the default start; with EVA's start
    the same ranks from the default start are the contrast) or the `ranks_floor` arm (where rank FLOOR_RANK on every
    module fits the budget); none without a combined ranking."""
    if not weights:
        return []
    if name == "ranks":
        if rank_profile == rec and start == "default":  # the run already recommends this (--allocate ranks)
            logger.info("validate: the recommendation is the ranks allocation; the ranks arm is left out")
            return []
        return [A.Arm("ranks", "ranks", rank_profile)]
    if sum(s.params(FLOOR_RANK) for s in sizes.values()) > target:
        logger.info("validate: rank %d on every module exceeds the budget; the ranks_floor arm is left out", FLOOR_RANK)
        return []
    return [A.Arm("ranks_floor", "ranks_floor", A.allocated_ranks(sizes, weights, target, min_rank=FLOOR_RANK))]


def _spread_arm(sizes: dict[str, ModuleSize], weights: dict[str, float], rec: dict[str, int],
                target: int) -> list[A.Arm]:
    """The `spread` arm (--allocate spread); none without a combined ranking or when it is the recommendation."""
    if not weights:
        logger.info("validate: the run has no combined ranking; the spread arm is left out")
        return []
    ranks = {k: r for k, r in allocate_spread_ranks(list(sizes.values()), weights, target).items() if r}
    if ranks == rec:
        logger.info("validate: the recommendation is the spread allocation; the spread arm is left out")
        return []
    return [A.Arm("spread", "spread", ranks)]


def _types_arm(run_dir: Path, module_map, sizes: dict[str, ModuleSize], rec: dict[str, int],
               target: int) -> list[A.Arm]:
    """The `types` arm (--allocate types) from the probe's group and module-type ablation deltas; none without an
    ablation, without a positive delta, or when the recommendation already is that allocation."""
    try:
        shares = type_shares_from_ablation(run_dir, module_map.modules)
    except UserError as exc:  # no positive delta
        logger.info("validate: %s; the types arm is left out", exc)
        return []
    if shares is None:
        logger.info("validate: the run has no module-type ablation; the types arm is left out")
        return []
    type_of = {key_of(m): m.module_type for m in module_map.modules}
    ranks = allocate_type_ranks(list(sizes.values()), type_of, shares, target)
    ranks = {k: r for k, r in ranks.items() if r > 0}
    if ranks == rec:
        logger.info("validate: the recommendation is the types allocation; the types arm is left out")
        return []
    return [A.Arm("types", "types", ranks)]


def planned_params(arm: A.Arm, sizes: dict[str, ModuleSize]) -> int:
    return int(arm.extra.get("planned_params") or arm.params(sizes))


def _train_features(cfg: ExperimentConfig, tokenizer) -> list[dict]:
    """The training examples of the run's first seed, in file order, as the trainings see them (EVA's and GoRA's
    planning passes read the first batches)."""
    return prepare(cfg.data, tokenizer, cfg.training.seed, ("train",)).features["train"]


# ---------------------------------------------------------------------------------------------------------------
# The test split


def held_out_examples(cfg: ExperimentConfig, seeds: tuple[int, ...], test_samples: int | None) -> tuple[list[Example], dict]:
    """Distinct test prompts that no training, validation or analysis split holds (for any seed), one example per
    prompt with all its references (its first reference is the loss target)."""
    data = cfg.data
    seen = {ex.prompt for ex in split_examples(data, "train", TEST_SEED)}
    for seed in sorted(set(seeds) | {cfg.training.seed}):
        seen |= {ex.prompt for ex in split_examples(data, "validation", seed, data.eval_samples)}
    test = split_examples(data, "test", TEST_SEED)
    grouped = group_by_prompt(test)
    fresh = [ex for ex in grouped if ex.prompt not in seen]
    if not fresh:
        raise UserError(f"the {data.dataset} test split has no prompt outside the train/validation splits")
    chosen = subset(fresh, test_samples, TEST_SEED)
    info = {"split": "test", "prompts_in_split": len(grouped), "prompts_excluded_as_seen": len(grouped) - len(fresh),
            "prompts_used": len(chosen), "references": sum(len(ex.references) for ex in chosen)}
    return chosen, info


def example_losses(model: torch.nn.Module, features: list[dict], batch_size: int, pad_token_id: int) -> list[tuple[float, int]]:
    """(summed NLL over target tokens, target tokens) per feature, in input order (padded batches)."""
    device = next(model.parameters()).device
    batches = validation_batches(features, batch_size, pad_token_id, device)
    sums, counts = per_example_losses(model, batches, len(features))
    return list(zip(sums.tolist(), counts.tolist()))


# ---------------------------------------------------------------------------------------------------------------
# Running


def validate_run(run_dir: str | Path, settings: ValidateSettings, out_dir: str | Path | None = None,
                 overwrite: bool = False) -> ValidationResult:
    settings.check()
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / files.VALIDATION_DIR
    started = time.time()
    max_steps = settings.max_steps or cfg.training.max_steps
    sweep_steps = settings.sweep_steps or max(1, max_steps // 2)
    plan_settings = {**asdict(settings), "max_steps": max_steps, "sweep_steps": sweep_steps}
    arms, budget, test_info, examples = _plan(cfg, run_dir, settings, out, plan_settings, overwrite)
    if settings.generate and get_dataset_spec(cfg.data.dataset, cfg.data).evaluation.needs_meteor:
        ensure_meteor_ready()
    sizes = {k: ModuleSize(k, *v) for k, v in budget["module_sizes"].items()}
    tokenizer = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed).tokenizer
    # Scored whole: the test loss is over every target token of every test prompt, whatever length training cut to.
    features, stats = build_features(examples, tokenizer, TEST_MAX_LENGTH, "test")
    if stats.truncated or stats.dropped:
        raise UserError(f"{stats.truncated + stats.dropped} test prompt(s) are longer than {TEST_MAX_LENGTH} tokens")
    outcome: dict[str, str] = {}
    chosen: dict[str, float] = {}
    sweep: list[Job] = []
    tests: list[Job] = []
    finished = Finished(out, arms, budget, test_info, settings, chosen, sweep, cfg, run_dir, started)
    # The arms with extra seeds (the main comparison) go first, sweep and seeds, so that a long validation has a
    # complete core comparison early; then lorasens' own variants (what to change if the recommendation loses:
    # ranks, value, EVA initialisation); then the controls and the other peers.
    core = {"recommended", *settings.extra_seed_arms}
    variants = {"ranks", "value", "eva_init", "ranks_eva_init"} - core
    stages = ([a for a in arms if a.arm in core], [a for a in arms if a.arm in variants],
              [a for a in arms if a.arm not in core | variants])
    stages = [stage for stage in stages if stage]
    for stage in stages:
        chosen.update(_tune_rates(cfg, stage, settings, sweep_steps, out, outcome, sweep))
        stage_tests = _test_jobs(stage, settings, chosen, max_steps, out)
        tests.extend(stage_tests)
        todo = [job for job in stage_tests if job.status() != "complete"]
        outcome.update({job.run_dir.name: "skipped (complete)" for job in stage_tests if job not in todo})
        # The outputs are rewritten when they change: before a stage with trainings to do (its arms appear, with no
        # units yet) and after each seed that trained something, the last one below. Each write bootstraps every
        # comparison, seconds that a resumed validation would otherwise spend rewriting the same files.
        if todo:
            write_outputs(finished, tests)
        for index, job in enumerate(todo):
            _run_job(cfg, job, out, outcome, f"training {stage_tests.index(job) + 1}/{len(stage_tests)}")
            _score(job, features, examples, cfg, settings, tokenizer)
            outcome[job.run_dir.name] = "trained"
            following = todo[index + 1] if index + 1 < len(todo) else None
            seed_done = following is None or following.seed != job.seed
            if seed_done and not (following is None and stage is stages[-1]):
                write_outputs(finished, tests)
    summary = write_outputs(finished, tests)
    _update_report(run_dir, out)
    return ValidationResult(out, summary, outcome)


def _lr_key(arm: A.Arm) -> str:
    """The sweep's unit: an arm, except that random sets share the rate chosen on the first set."""
    return "random" if arm.arm == "random" else arm.name


# An arm whose best rate is an end of the grid gets up to this many more rates past that end, half a decade apart.
MAX_GRID_EXTENSIONS = 2


def _swept(arms: list[A.Arm]) -> list[A.Arm]:
    return [a for a in arms if a.arm != "random" or a.name == "random_1"]


def _sweep_job(arm: A.Arm, settings: ValidateSettings, lr: float, steps: int, out: Path) -> Job:
    return Job(arm, settings.seeds[0], lr, steps, out / "sweep" / f"{arm.name}_lr{lr:g}", "sweep")


def _tune_rates(cfg: ExperimentConfig, arms: list[A.Arm], settings: ValidateSettings, steps: int, out: Path,
                outcome: dict, sweep: list[Job]) -> dict[str, float]:
    """Each swept arm's rate, by validation loss. A best rate at an end of `lr_grid` is not known to be the best (the
    loss may still fall past it), so that arm's grid grows past that end, half a decade a step, until the best rate
    has a worse one on both sides or MAX_GRID_EXTENSIONS rates were added."""
    jobs = [_sweep_job(a, settings, lr, steps, out) for a in _swept(arms) for lr in settings.lr_grid]
    sweep.extend(jobs)
    for index, job in enumerate(jobs, 1):
        _run_job(cfg, job, out, outcome, f"sweep {index}/{len(jobs)}")
    chosen = {}
    for arm in _swept(arms):
        loss = {lr: _sweep_loss(out, arm, lr) for lr in sorted(settings.lr_grid)}  # each summary read once
        for extension in range(1, MAX_GRID_EXTENSIONS + 1):
            grid, best = sorted(loss), min(loss, key=loss.get)
            if len(grid) < 2 or grid[0] < best < grid[-1] or not math.isfinite(loss[best]):
                break
            lr = half_decade(best, up=best == grid[-1])
            job = _sweep_job(arm, settings, lr, steps, out)
            sweep.append(job)
            _run_job(cfg, job, out, outcome, f"sweep {arm.name}: grid extension {extension} (best rate at its end)")
            loss[lr] = _sweep_loss(out, arm, lr)
        chosen[_lr_key(arm)] = min(loss, key=loss.get)
    return chosen


def half_decade(lr: float, up: bool) -> float:
    """The next rate on the 1-3-10 ladder above (or below) `lr`: 3e-3 -> 1e-2, 3e-4 -> 1e-4 (down)."""
    rungs = sorted(m * 10.0**k for k in range(math.floor(math.log10(lr)) - 2, math.floor(math.log10(lr)) + 3)
                   for m in (1, 3))
    return float(f"{(min(r for r in rungs if r > lr * 1.01) if up else max(r for r in rungs if r < lr / 1.01)):.1g}")


def _test_jobs(arms: list[A.Arm], settings: ValidateSettings, chosen: dict, steps: int, out: Path) -> list[Job]:
    """Seed by seed; random set i trains at the i-th of its seeds (cycling), so each set x seed is one unit."""
    jobs = []
    for seed in (*settings.seeds, *settings.extra_seeds):
        for a in arms:
            seeds = settings.seeds_of(a.arm)
            if seed not in seeds:
                continue
            if a.arm == "random" and seeds[(int(a.name.split("_")[1]) - 1) % len(seeds)] != seed:
                continue
            jobs.append(Job(a, seed, chosen[_lr_key(a)], steps, out / "runs" / f"{a.name}_seed{seed}", "test"))
    return jobs


def _plan(cfg, run_dir: Path, settings: ValidateSettings, out: Path, plan_settings: dict, overwrite: bool):
    """plan.json: the arms and the test prompts. Rerunning with the same settings reuses it (planning EVA and GoRA
    costs forward/backward passes); other settings need --overwrite."""
    plan_path = out / PLAN_FILE
    examples, test_info = held_out_examples(cfg, settings.seeds + settings.extra_seeds, settings.test_samples)
    if out.exists() and any(out.iterdir()):
        if not plan_path.exists():
            raise UserError(f"{out} exists and is not a validation folder (no {PLAN_FILE}); choose another --out")
        saved = read_json(plan_path, "the validation plan")
        if overwrite:
            shutil.rmtree(out)
        elif saved.get("settings") != _jsonable(plan_settings):
            raise UserError(f"{out} holds a validation with other settings; pass --overwrite to replace it, or --out DIR "
                            "to keep both")
        else:
            arms = [A.Arm.from_dict(a) for a in saved["arms"]]
            return arms, saved["budget"], saved["test"], examples
    out.mkdir(parents=True, exist_ok=True)
    arms, budget = plan_arms(cfg, run_dir, settings)
    plan = {"run_dir": str(run_dir.resolve()), "settings": _jsonable(plan_settings), "budget": budget,
            "test": test_info, "arms": [a.as_dict() for a in arms]}
    write_json(plan_path, plan)
    return arms, budget, test_info, examples


def _jsonable(value):
    import json

    return json.loads(json.dumps(value))


def _placement_file(out: Path, arm: A.Arm, cfg: ExperimentConfig, steps: int) -> Path:
    module_map_cfg = _module_map(cfg)
    config = A.arm_config(arm, module_map_cfg, cfg.lora.r, cfg.lora.lora_alpha, steps)
    path = out / "placements" / f"{arm.name}_{steps}steps.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, config)
    return path


_MODULE_MAPS: dict[str, ModuleMap] = {}


def _module_map(cfg: ExperimentConfig) -> ModuleMap:
    """The module map of the run's model (built once per process: it needs the model)."""
    key = f"{cfg.model.model}|{cfg.model.attn_modules}|{cfg.model.mlp_modules}"
    if key not in _MODULE_MAPS:
        loaded = load_model(cfg.model.model, cfg.model.precision, seed=cfg.training.seed)
        _MODULE_MAPS[key] = build_module_map(loaded.model, cfg.model.attn_modules, cfg.model.mlp_modules)
    return _MODULE_MAPS[key]


def eval_every(steps: int) -> int:
    """Validation loss about six times per training, always at the last step (a divisor of `steps`)."""
    return next(d for d in range(max(1, steps // 6), steps + 1) if steps % d == 0)


def training_config(cfg: ExperimentConfig, job: Job, placement_file: Path, rerun: bool) -> ExperimentConfig:
    """The run's config with this arm, rate and seed: static, last-step adapter, no analysis or evaluation."""
    config = read_json(placement_file, "a placement")
    data = cfg.to_dict()
    r = config.get("init_r") if config.get("peft_type") == "ADALORA" else config["r"]
    data["lora"].update(placement=str(placement_file), r=r, lora_alpha=config["lora_alpha"])
    data["training"].update(seed=job.seed, lr=job.lr, max_steps=job.steps, save_steps=max(1, job.steps // 3),
                            report_to="none", eval_steps=eval_every(job.steps), final_adapter="last")
    if config.get("peft_type") == "ADALORA":
        data["training"]["save_steps"] = 0  # AdaLoRA's allocator state is not in a checkpoint: retrain instead
    data["schedule"].update(dynamic_lora=False, phase_strategy=None, phase1_end=None, phase2_end=None,
                            phase_ends=None, reset_optimizer_on_switch=False)
    data["tracking"].update(track_gradients=False, track_importance=False, track_update_magnitude=False,
                            ablation=False)
    data["evaluation"].update(evaluate=False, baseline=False)
    data["output"].update(output_dir=str(job.run_dir.parent), experiment_name=job.run_dir.name, overwrite=rerun,
                          resume=False)
    return check_environment(config_from_dict(data))


def _run_job(cfg: ExperimentConfig, job: Job, out: Path, outcome: dict, label: str) -> None:
    status = job.status()
    if status in ("complete", "trained"):
        outcome.setdefault(job.run_dir.name, "skipped (complete)")
        return
    logger.info("validate %s: %s at lr %g, seed %d, %d steps", label, job.arm.name, job.lr, job.seed, job.steps)
    placement = _placement_file(out, job.arm, cfg, job.steps)
    resume = status == "incomplete" and _has_checkpoint(job.run_dir)
    train_cfg = training_config(cfg, job, placement, rerun=status == "incomplete" and not resume)
    if resume:
        train_cfg = replace(train_cfg, output=replace(train_cfg.output, resume=True, overwrite=False))
    # Trainer.train starts with a full gc.collect (accelerate's free_memory): over the ~600k objects of the imported
    # libraries that is 0.3 s a training. Collected once here, then frozen, the long-lived ones are not scanned again.
    gc.collect()
    gc.freeze()
    run_experiment(train_cfg, after_training=())
    outcome[job.run_dir.name] = "resumed" if resume else "trained"


def _has_checkpoint(run_dir: Path) -> bool:
    from lorasens.training.trainer import latest_checkpoint

    return latest_checkpoint(run_dir) is not None


def _sweep_loss(out: Path, arm: A.Arm, lr: float) -> float:
    summary = read_json(out / "sweep" / f"{arm.name}_lr{lr:g}" / files.SUMMARY_FILE, "a sweep run's summary")
    loss = summary.get("final_eval_loss")
    return float(loss) if loss is not None and math.isfinite(loss) else math.inf


def _score(job: Job, features: list[dict], examples: list[Example], cfg: ExperimentConfig,
           settings: ValidateSettings, tokenizer) -> None:
    """test_scores.json: per-prompt test loss, the trained parameter count, validation loss, per-prompt metrics."""
    summary = read_json(job.run_dir / files.SUMMARY_FILE, "a training's summary")
    loaded = load_run(job.run_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_prompt = example_losses(loaded.model, features, cfg.evaluation.eval_batch_size, pad)
    adapter = summary.get("adapter") or {}
    params = adapter.get("effective_params") or summary["trainable_params"]
    scores = {"arm": job.arm.name, "seed": job.seed, "lr": job.lr, "steps": summary["steps"], "lora_params": params,
              "initial_lora_params": summary["trainable_params"], "num_modules": len(loaded.lora),
              "validation_loss": summary.get("final_eval_loss"), "train_runtime_s": summary.get("train_runtime_s"),
              "test_loss": sum(x for x, _ in per_prompt) / sum(t for _, t in per_prompt),
              "per_prompt_loss": [[round(x, 6), t] for x, t in per_prompt], "metrics": {}, "segments": {}}
    spec = get_dataset_spec(cfg.data.dataset, cfg.data).evaluation
    if settings.generate:
        eval_settings = settings_from_config(cfg, "test", len(examples))
        result = evaluate_model(loaded.model, loaded.tokenizer, cfg, eval_settings, examples=examples,
                                run_dir=job.run_dir)
        scores["metrics"] = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        if spec.segment_rows is not None:
            rows = read_rows(job.run_dir / files.predictions_file(cfg.data.dataset))
            scores["segments"] = {name: seg.stats.tolist() for name, seg in spec.segment_rows(rows).items()}
    write_json(job.run_dir / TEST_SCORES, scores)
    logger.info("validate: %s seed %d test loss %.4f (%d LoRA parameters)", job.arm.name, job.seed,
                scores["test_loss"], params)


def _update_report(run_dir: Path, out: Path) -> None:
    """Redraw the run's report.html so it shows the validation section (only when validating into the run)."""
    from lorasens.presentation.report import write_report

    if out.resolve() != (run_dir / files.VALIDATION_DIR).resolve():
        return
    try:
        write_report(run_dir, redraw=False)
    except UserError as exc:
        logger.warning("report.html not updated: %s", exc)


def segment_arrays(scores: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(stats, dtype=float) for name, stats in scores.get("segments", {}).items()}
