"""The results of a validation: placement_validation.json (arms, comparisons, verdicts, costs), the CSV of every
training, sweep.csv (validation loss per arm and learning rate) and the plot. Written after every finished seed, so a
long validation is readable while it runs."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorasens.experiment.validation import arms as A
from lorasens.experiment.validation import stats
from lorasens.rundir import files
from lorasens.rundir.metrics import STILL_FALLING, read_run_metrics
from lorasens.safeio import read_json, write_csv_rows, write_json

logger = logging.getLogger(__name__)

LOSS = "test_loss"
SEED = 1234  # the bootstrap's draws are the same on every rerun


@dataclass
class Finished:
    """What write_outputs needs besides the finished trainings (see driver.validate_run)."""

    out: Path
    arms: list
    budget: dict
    test_info: dict
    settings: object
    chosen_lr: dict
    sweep: list
    cfg: object
    run_dir: Path
    started: float


def group_of(arm: A.Arm) -> str:
    """Random sets are one arm of the comparison (each set x seed a unit); every other arm is its own."""
    return "random" if arm.arm == "random" else arm.name


def _units(scores: list[dict]) -> dict[str, list[stats.UnitScores]]:
    """metric -> the units' per-prompt statistics (loss: [nll, tokens]; metrics: their segments)."""
    result: dict[str, list[stats.UnitScores]] = {
        LOSS: [stats.UnitScores(np.asarray(s["per_prompt_loss"], dtype=float), s["seed"]) for s in scores]}
    for name in scores[0].get("segments", {}):
        if all(name in s.get("segments", {}) for s in scores):
            result[name] = [stats.UnitScores(np.asarray(s["segments"][name], dtype=float), s["seed"]) for s in scores]
    return result


def _metric_value(name: str):
    if name == LOSS:
        return stats.loss_value
    from lorasens.metrics.segments import _bleu_value, _mean_value

    return _bleu_value if name == "bleu" else _mean_value


def summarise(finished: Finished, scores: dict[str, list[dict]]) -> dict:
    """Per arm: means; per comparison (recommended - other): bootstrap difference, CI, Holm-adjusted p, verdict."""
    arms_by_group: dict[str, list[A.Arm]] = {}
    for arm in finished.arms:
        arms_by_group.setdefault(group_of(arm), []).append(arm)
    table = {}
    for group, members in arms_by_group.items():
        done = scores.get(group, [])
        first = members[0]
        entry = {"family": first.family, "description": A.ARMS[first.arm][1], "lr": finished.chosen_lr.get(group),
                 "units": len(done), "sets": len(members), "note": first.note}
        if done:
            entry.update({
                "lora_params": round(float(np.mean([s["lora_params"] for s in done]))),
                "initial_lora_params": round(float(np.mean([s["initial_lora_params"] for s in done]))),
                "num_modules": round(float(np.mean([s["num_modules"] for s in done])), 1),
                "validation_loss": _mean([s["validation_loss"] for s in done]),
                "test_loss": _mean([s["test_loss"] for s in done]),
                "metrics": {k: _mean([s["metrics"].get(k) for s in done]) for k in done[0]["metrics"]},
                "train_runtime_s": _mean([s["train_runtime_s"] for s in done]),
                "late_eval_fall": _mean([s["late_eval_fall"] for s in done]),
                "still_falling": sum(bool(s["still_falling"]) for s in done),
            })
        entry["within_tolerance"] = (not first.matched or not done or
                                     abs(entry["lora_params"] - finished.budget["lora_params"])
                                     <= A.MATCH_TOLERANCE * finished.budget["lora_params"])
        table[group] = entry
    comparisons, primary = _comparisons(scores, table)
    verdicts = {name: {metric: c["verdict"] for metric, c in by_metric.items()} for name, by_metric in comparisons.items()}
    return {
        "run_dir": str(finished.run_dir),
        "model": finished.cfg.model.model,
        "dataset": finished.cfg.data.dataset,
        "complete": all(len(scores.get(g, [])) == _planned_units(g, arms_by_group, finished.settings)
                        for g in arms_by_group),
        "settings": {"seeds": list(finished.settings.seeds), "extra_seeds": list(finished.settings.extra_seeds),
                     "extra_seed_arms": list(finished.settings.extra_seed_arms), "lr_grid": list(finished.settings.lr_grid),
                     "max_steps": finished.settings.max_steps or finished.cfg.training.max_steps,
                     "batch_size": finished.cfg.training.batch_size},
        "budget": {k: v for k, v in finished.budget.items() if k != "module_sizes"},
        "match_tolerance": A.MATCH_TOLERANCE,
        "test": finished.test_info,
        "loss": "token-weighted mean next-token cross-entropy over the first reference of each test prompt",
        "statistics": ("recommended minus the other arm over the seeds both trained, paired by seed (random: the "
                       "mean of its set x seed units at each seed); 95% Student-t interval and two-sided p from the "
                       "seeds' variance and the test prompts' (a bootstrap of "
                       f"{stats.BOOTSTRAP_DRAWS} prompt draws shared by both arms), Welch-Satterthwaite degrees of "
                       "freedom; Holm-adjusted over every comparison but the primary one; on fewer than "
                       f"{stats.MIN_PAIRED_SEEDS} common seeds the prompts' percentile interval and no verdict "
                       f"('{stats.TOO_FEW_SEEDS}'), out of Holm's family"),
        "primary": primary,
        "arms": table,
        "comparisons": comparisons,
        "verdicts": verdicts,
        "verdict": _verdict_line(primary, comparisons, table),
        "still_falling": _still_falling(table),
        "costs": _costs(finished, table),
        "wall_time_s": round(time.time() - finished.started, 2),
    }


def _still_falling(table: dict) -> dict:
    """The arms whose trainings had not flattened: validation loss still falling by more than STILL_FALLING of its
    final value over the last quarter of the steps. Their comparison is one of adapters still learning, and the
    ranking of arms can change with the length (more --max_steps)."""
    arms = [g for g, e in table.items() if e.get("still_falling")]
    return {"tolerance": STILL_FALLING, "arms": arms,
            "note": (f"validation loss still falling at the end of {len(arms)} of "
                     f"{sum(1 for e in table.values() if e.get('units'))} arms' trainings (by more than "
                     f"{STILL_FALLING:.0%} over the last quarter of the steps): these are adapters still learning, "
                     "and longer trainings (--max_steps) may rank the arms differently") if arms else None}


def _planned_units(group: str, arms_by_group: dict, settings) -> int:
    if group == "random":
        return len(arms_by_group[group])
    return len(settings.seeds_of(arms_by_group[group][0].arm))


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def best_peer(peers: dict[str, list[dict]]) -> str | None:
    """The peer with the lowest mean validation loss over the seeds every peer trained: each seed draws its own
    validation split, whose loss level varies by more than the arms differ, so means over different seeds do not
    compare (a peer with seeds 1-2 only would be judged against another's 1-5). Without a common seed, all of each."""
    if not peers:
        return None
    common = set.intersection(*({s["seed"] for s in done} for done in peers.values()))

    def loss(group: str) -> float:
        done = [s for s in peers[group] if s["seed"] in common] or peers[group]
        return _mean([s["validation_loss"] for s in done]) or math.inf

    return min(peers, key=loss)


def _comparisons(scores: dict[str, list[dict]], table: dict) -> tuple[dict, str | None]:
    rec = scores.get("recommended", [])
    if not rec:
        return {}, None
    peers = [g for g, e in table.items() if e["family"] == "peer" and scores.get(g)]
    primary = best_peer({g: scores[g] for g in peers})
    rng = np.random.default_rng(SEED)
    raw: dict[str, dict[str, dict]] = {}
    rec_units = _units(rec)
    for group, done in scores.items():
        if group == "recommended" or not done:
            continue
        other = _units(done)
        compared = {m: stats.compare(rec_units[m], other[m], _metric_value(m), rng) for m in rec_units if m in other}
        compared = {m: c for m, c in compared.items() if c is not None}  # None: no seed in common
        if compared:
            raw[group] = compared
    for metric in {m for by in raw.values() for m in by}:
        # Comparisons on fewer than MIN_PAIRED_SEEDS seeds draw no verdict and stay out of Holm's family.
        judged = {g for g, by in raw.items() if metric in by and len(by[metric]["seeds"]) >= stats.MIN_PAIRED_SEEDS}
        adjusted = stats.holm({g: raw[g][metric]["p_value"] for g in judged if g != primary})
        for g, by in raw.items():
            if metric in by:
                c = by[metric]
                c["p_adjusted"] = None if g not in judged else c["p_value"] if g == primary else adjusted[g]
                c["verdict"] = stats.verdict(c["difference"], c["p_adjusted"], lower_is_better=metric == LOSS)
    return raw, primary


def _verdict_line(primary: str | None, comparisons: dict, table: dict) -> str:
    """One line: the primary comparison, then the verdict against every peer (test loss; the table has the rest)."""
    if not comparisons:
        return "no finished comparison yet"

    def one(group: str) -> str:
        c = comparisons[group][LOSS]
        return f"{c['verdict']} vs {group} ({c['difference']:+.4f} nats/token, 95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}])"

    peers = [g for g in comparisons if table[g]["family"] == "peer" and g != primary]
    parts = ([f"recommended {one(primary)} [primary]"] if primary else []) + [one(g) for g in peers]
    return "test loss: " + "; ".join(parts) if parts else "test loss: no peer arm finished"


def _costs(finished: Finished, table: dict) -> dict:
    """Planning costs as fractions of one training of the recommendation (its mean train runtime)."""
    base = table.get("recommended", {}).get("train_runtime_s")
    probe = None
    summary_path = finished.run_dir / files.SUMMARY_FILE
    if summary_path.exists():
        probe = read_json(summary_path, "the run's summary").get("wall_time_s")
    result = {"training_s": base, "probe_wall_s": probe}
    for arm in finished.arms:
        seconds = arm.extra.get("plan_seconds")
        if seconds is not None:
            result[f"{arm.name}_plan_s"] = seconds
    if base:
        for key in [k for k in result if k != "training_s" and result[k] is not None]:
            result[key.removesuffix("_s") + "_fraction_of_training"] = round(result[key] / base, 3)
    return result


def write_outputs(finished: Finished, jobs: list) -> dict:
    """The JSON, the CSVs and the plot over `jobs` that have test scores; returns the summary."""
    scores: dict[str, list[dict]] = {}
    rows = []
    for job in jobs:
        path = job.run_dir / files.VALIDATION_TEST_SCORES
        if not path.exists():
            continue
        s = read_json(path, "test scores")
        metrics = read_run_metrics(job.run_dir)  # from the training's eval_log: also for runs scored before
        s["late_eval_fall"], s["still_falling"] = metrics.late_eval_fall, metrics.still_falling()
        scores.setdefault(group_of(job.arm), []).append(s)
        rows.append({"arm": job.arm.name, "family": job.arm.family, "kind": job.arm.arm, "seed": job.seed,
                     "lr": job.lr, "steps": s["steps"], "num_modules": s["num_modules"], "lora_params": s["lora_params"],
                     "initial_lora_params": s["initial_lora_params"], "validation_loss": s["validation_loss"],
                     "test_loss": s["test_loss"], "late_eval_fall": s["late_eval_fall"],
                     "train_runtime_s": s["train_runtime_s"],
                     **{f"metric_{k}": v for k, v in s["metrics"].items()}})
    summary = summarise(finished, scores)
    out = finished.out
    columns = list(dict.fromkeys(k for row in rows for k in row)) or list(files.VALIDATION_COLUMNS)
    write_csv_rows(out / files.VALIDATION_CSV, columns, rows)
    sweep_rows = []
    for job in finished.sweep:
        path = job.run_dir / files.SUMMARY_FILE
        if path.exists():
            s = read_json(path, "a sweep summary")
            sweep_rows.append({"arm": job.arm.name, "lr": job.lr, "steps": s.get("steps"),
                               "validation_loss": s.get("final_eval_loss"),
                               "chosen": finished.chosen_lr.get(group_of(job.arm)) == job.lr})
    write_csv_rows(out / files.VALIDATION_SWEEP_CSV, ["arm", "lr", "steps", "validation_loss", "chosen"], sweep_rows)
    write_json(out / files.VALIDATION_JSON, summary)
    if rows:
        from lorasens.presentation.plots.validation_plots import plot_placement_validation

        plot_placement_validation(out)
    logger.info("validate: %s", summary["verdict"])
    falling = summary["still_falling"]
    if falling["note"]:
        logger.warning("validate: %s (%s)", falling["note"], ", ".join(falling["arms"]))
    return summary
