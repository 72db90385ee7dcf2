"""`lorasens compare RUN_DIR...`: settings and metrics of several runs side by side, seeds aggregated.

Runs whose configs differ only by seed (and output location) form one configuration; its metrics are reported as
mean ± sample standard deviation (ddof=1, the unbiased estimator of the variance across seeds) with the count n.
With n = 1 the std is empty, not 0. Everything is read from the run directories' files:
config.json, summary.json, train_log.jsonl, eval_log.jsonl, {dataset}_evaluation.json, gradient CSVs.

Seed stability of the sensitivity analysis: for a configuration with several seeds whose runs wrote
sensitivity.json, comparison_stability.csv gives per measure the mean across-seed Spearman correlation of the module
scores (over all pairs of seeds) and the mean Jaccard overlap of the sets each measure would recommend (its top k
modules, k = the run's recommended count; the row "recommended" is the actual recommendation), beside the Jaccard
overlap two uniformly random sets of the same sizes have in expectation.

Outputs in --out (default: `comparison/` beside the runs): comparison.csv (one row per configuration),
comparison_runs.csv (one row per run), comparison_stability.csv, comparison.md, comparison_losses.png,
comparison_grad_norms.png and a self-contained comparison.html.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorasens.analysis.stats import jaccard, random_jaccard, spearman
from lorasens.config import SECTIONS, fields_with, key_settings
from lorasens.errors import UserError
from lorasens.presentation.plots.common import MissingInput
from lorasens.presentation.plots.compare_plots import COMPARE_PLOTS
from lorasens.presentation.report import esc, image_tag, missing_box, render_page, table
from lorasens.rundir.files import (
    CONFIG_FILE,
    EVALUATION_SUFFIX,
    SENSITIVITY,
    SUMMARY_FILE,
    TRAIN_LOG,
    evaluation_files,
    unknown_fields,
)
from lorasens.rundir.metrics import read_run_metrics
from lorasens.safeio import read_json

logger = logging.getLogger(__name__)

# Fields that do not change what is learnt: runs differing only here are repeats of one configuration.
NOT_A_SETTING = set(fields_with("not_a_setting"))
# The run's key settings (as in the report), without the ones that only tell repeats apart (the seed).
KEY_SETTINGS = tuple(name for _, _, name in key_settings() if name not in NOT_A_SETTING)
LOSS_METRICS = ("final_train_loss", "final_eval_loss", "best_eval_loss", "late_eval_fall")
SUMMARY_METRICS = ("trainable_params", "train_runtime_s")


@dataclass
class RunRecord:
    run_dir: Path
    name: str
    settings: dict  # flat config (field -> value); empty when config.json is missing
    seed: int | None
    metrics: dict[str, float]
    complete: bool
    missing: list[str] = field(default_factory=list)
    group: str = ""

    @property
    def dataset(self) -> str | None:
        return self.settings.get("dataset")


@dataclass
class CompareResult:
    out_dir: Path
    files: list[Path]
    runs: list[RunRecord]
    groups: list[dict]
    skipped: list[str]
    mixed_datasets: list[str]
    stability: list[dict] = field(default_factory=list)


def load_run_record(run_dir: Path) -> RunRecord:
    """Settings and metrics of one run from its files; raises UserError if the folder is not a run at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    config = read_json(run_dir / CONFIG_FILE, tolerant=True)
    summary = read_json(run_dir / SUMMARY_FILE, tolerant=True)
    run_metrics = read_run_metrics(run_dir)
    evaluations = evaluation_files(run_dir)
    if config is None and summary is None and run_metrics.steps is None and not evaluations:
        raise UserError(f"{run_dir} is not a lorasens run directory (no {CONFIG_FILE}, {SUMMARY_FILE}, {TRAIN_LOG} "
                        f"or *{EVALUATION_SUFFIX})")
    missing = [f"{name} is {'corrupt' if (run_dir / name).exists() else 'missing'}"
               for name, data in ((CONFIG_FILE, config), (SUMMARY_FILE, summary)) if data is None]
    unknown = unknown_fields(config)  # a run recorded in a user's script: what it did not tell is unknown (None)
    settings = {k: (None if f"{name}.{k}" in unknown else v) for name, section in (config or {}).items()
                if name in SECTIONS and isinstance(section, dict) for k, v in section.items()}
    metrics: dict[str, float] = {}
    if run_metrics.final_train_loss is not None:
        metrics["final_train_loss"] = run_metrics.final_train_loss
        metrics["steps"] = float(run_metrics.steps)
    if run_metrics.final_eval_loss is not None:
        metrics["final_eval_loss"] = run_metrics.final_eval_loss
        metrics["best_eval_loss"] = run_metrics.best_eval_loss
    if run_metrics.late_eval_fall is not None:  # > 1% of the final loss: the run was still learning
        metrics["late_eval_fall"] = run_metrics.late_eval_fall
    for key in SUMMARY_METRICS:
        if isinstance((summary or {}).get(key), (int, float)):
            metrics[key] = float(summary[key])
    if not evaluations:
        missing.append(f"{settings.get('dataset', '{dataset}')}{EVALUATION_SUFFIX} is missing")
    for path in evaluations:
        data = read_json(path, tolerant=True)
        if data is None:
            missing.append(f"{path.name} is unreadable")
            continue
        prefix = "" if len(evaluations) == 1 else f"{data.get('dataset', path.name[: -len(EVALUATION_SUFFIX)])}."
        for name, value in (data.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"{prefix}{name}"] = float(value)
        for name, value in (((data.get("baseline") or {}).get("metrics")) or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"{prefix}baseline.{name}"] = float(value)
    return RunRecord(run_dir, run_dir.name, settings, settings.get("seed"), metrics, summary is not None, missing)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _config_key(record: RunRecord) -> tuple:
    if not record.settings:
        return ("run", str(record.run_dir))  # unknown settings: never pooled with anything
    return tuple(sorted((k, json.dumps(v)) for k, v in record.settings.items() if k not in NOT_A_SETTING))


# Implied by another setting (dynamic_lora follows phase_strategy): part of the configuration, not of its label.
NOT_IN_LABEL = {"dynamic_lora"}


def _varying(records: list[RunRecord]) -> list[str]:
    keys = sorted({k for r in records for k in r.settings} - NOT_A_SETTING - NOT_IN_LABEL)
    return [k for k in keys if len({json.dumps(r.settings.get(k)) for r in records if r.settings}) > 1]


def group_runs(records: list[RunRecord]) -> list[dict]:
    """Configurations (runs equal up to seed), each with its runs and the mean ± std of every metric."""
    varying = _varying(records)
    by_key: dict[tuple, list[RunRecord]] = {}
    for record in records:
        by_key.setdefault(_config_key(record), []).append(record)
    groups = []
    for runs in by_key.values():
        first = runs[0]
        if not first.settings:
            label = f"{first.name} (settings unknown)"
        elif varying:
            label = ", ".join(f"{k}={_short(first.settings.get(k))}" for k in varying)
        else:  # every run has the same settings: name them by what they are
            label = " ".join(_short(first.settings.get(k)) for k in ("dataset", "target", "phase_strategy"))
        for run in runs:
            run.group = label
        metric_names = list(dict.fromkeys(m for r in runs for m in r.metrics))
        stats = {}
        for name in metric_names:
            values = [r.metrics[name] for r in runs if name in r.metrics and not math.isnan(r.metrics[name])]
            if values:
                mean, std = mean_std(values)
                stats[name] = {"mean": mean, "std": std, "n": len(values)}
        groups.append({"label": label, "runs": runs, "n": len(runs), "settings": first.settings, "stats": stats,
                       "seeds": [r.seed for r in runs]})
    return groups


STABILITY_COLUMNS = ("configuration", "measure", "seeds", "pairs", "spearman_mean", "spearman_min", "jaccard_mean",
                     "jaccard_random")
RECOMMENDED_ROW = "recommended"


def seed_stability(groups: list[dict]) -> list[dict]:
    """Per configuration with >= 2 analysed seeds and per measure: across-seed Spearman and top-k Jaccard."""
    rows = []
    for g in groups:
        analyses = [a for a in (read_json(r.run_dir / SENSITIVITY, tolerant=True) for r in g["runs"]) if a and a.get("measures")]
        if len(analyses) < 2:
            continue
        pairs = [(a, b) for i, a in enumerate(analyses) for b in analyses[i + 1 :]]
        names = [n for n in analyses[0]["measures"] if all(n in a["measures"] for a in analyses)]
        for name in [*names, RECOMMENDED_ROW]:
            rhos, overlaps, baselines = [], [], []
            for a, b in pairs:
                sa, sb = _chosen(a, name), _chosen(b, name)
                total = len(a.get("modules") or [])
                overlaps.append(jaccard(sa, sb))
                baselines.append(random_jaccard(total, len(sa), len(sb)))
                if name != RECOMMENDED_ROW:
                    rho = spearman(_scores(a["measures"][name]), _scores(b["measures"][name]))
                    if rho is not None:
                        rhos.append(rho)
            rows.append({"configuration": g["label"], "measure": name, "seeds": len(analyses), "pairs": len(pairs),
                         "spearman_mean": statistics.fmean(rhos) if rhos else None,
                         "spearman_min": min(rhos) if rhos else None,
                         "jaccard_mean": statistics.fmean(overlaps), "jaccard_random": statistics.fmean(baselines)})
    return rows


def _scores(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None}


def _chosen(analysis: dict, measure: str) -> list[str]:
    """The recommended modules, or the top k by `measure` (k = the number recommended)."""
    selected = list((analysis.get("budget") or {}).get("selected") or [])
    if measure == RECOMMENDED_ROW:
        return selected
    scores = _scores(analysis["measures"][measure])
    return sorted(scores, key=lambda k: -scores[k])[: len(selected)]


def _write_stability_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(STABILITY_COLUMNS)
        for row in rows:
            writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                             for c in STABILITY_COLUMNS])
    return path


def _stability_cells(row: dict) -> list:
    return [row["configuration"], row["measure"], row["seeds"], row["spearman_mean"], row["spearman_min"],
            row["jaccard_mean"], row["jaccard_random"]]


STABILITY_HEADERS = ["configuration", "measure", "seeds", "Spearman (mean)", "Spearman (min)", "Jaccard top-k (mean)",
                     "Jaccard of random sets"]


def _short(value) -> str:
    return "static" if value is None or value == "" else str(value)


def default_out_dir(run_dirs: list[Path]) -> Path:
    parents = {Path(p).resolve().parent for p in run_dirs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / "comparison"


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> CompareResult:
    """Compare runs; folders that are not runs are skipped and named. UserError only when no run is left."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise UserError("compare needs at least one run directory")
    records, skipped = [], []
    for run_dir in dict.fromkeys(run_dirs):
        try:
            records.append(load_run_record(run_dir))
        except UserError as exc:
            logger.warning("skipped: %s", exc)
            skipped.append(str(exc))
    if not records:
        raise UserError("nothing to compare: " + "; ".join(skipped))
    out = Path(out_dir) if out_dir else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(records)
    datasets = sorted({r.dataset for r in records if r.dataset})
    mixed = datasets if len(datasets) > 1 else []
    if mixed:
        logger.warning("runs use different datasets (%s): their metrics are not comparable", ", ".join(mixed))
    metric_names = _metric_order(records)
    stability = seed_stability(groups)
    files = [_write_group_csv(out / "comparison.csv", groups, metric_names),
             _write_runs_csv(out / "comparison_runs.csv", records, metric_names),
             _write_stability_csv(out / "comparison_stability.csv", stability)]
    plots, plot_missing = _draw(records, out)
    files += list(plots.values())
    markdown = _markdown(groups, records, metric_names, mixed, skipped, stability)
    (out / "comparison.md").write_text(markdown)
    files.append(out / "comparison.md")
    files.append(_write_html(out / "comparison.html", groups, records, metric_names, mixed, skipped, plots,
                             plot_missing, stability))
    logger.info("comparison of %d run(s) in %d configuration(s): %s", len(records), len(groups), out)
    return CompareResult(out, files, records, groups, skipped, mixed, stability)


def _metric_order(records: list[RunRecord]) -> list[str]:
    names = list(dict.fromkeys(m for r in records for m in r.metrics))
    first = [m for m in ("steps",) + LOSS_METRICS if m in names]
    evaluation = [m for m in names if m not in first and m not in SUMMARY_METRICS and ".baseline." not in m
                  and not m.startswith("baseline.")]
    baseline = [m for m in names if m.startswith("baseline.") or ".baseline." in m]
    return first + evaluation + baseline + [m for m in SUMMARY_METRICS if m in names]


def _key_settings(settings: dict) -> list:
    return [settings.get(k) for k in KEY_SETTINGS]


def _write_group_csv(path: Path, groups: list[dict], metrics: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["configuration", "n", "seeds", *KEY_SETTINGS,
                         *[f"{m}_{s}" for m in metrics for s in ("mean", "std")]])
        for g in groups:
            row = [g["label"], g["n"], " ".join(str(s) for s in g["seeds"]), *_key_settings(g["settings"])]
            for m in metrics:
                stat = g["stats"].get(m)
                row += ["", ""] if stat is None else [repr(stat["mean"]), "" if stat["std"] is None else repr(stat["std"])]
            writer.writerow(row)
    return path


def _write_runs_csv(path: Path, records: list[RunRecord], metrics: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", "run_dir", "configuration", "seed", "complete", *KEY_SETTINGS, *metrics])
        for r in records:
            writer.writerow([r.name, str(r.run_dir), r.group, r.seed, r.complete, *_key_settings(r.settings),
                             *["" if m not in r.metrics else repr(r.metrics[m]) for m in metrics]])
    return path


def format_stat(stat: dict | None) -> str:
    if stat is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.4g} (n=1)"
    return f"{stat['mean']:.4g} ± {stat['std']:.2g} (n={stat['n']})"


def _md(text: str) -> str:
    """Text for a Markdown cell: HTML escaped (Markdown renderers pass raw HTML through, and the text comes from
    run configs), `|` escaped, on one line."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _markdown(groups, records, metrics, mixed, skipped, stability=()) -> str:
    lines = ["# Run comparison", "",
             "Runs that differ only by seed are one configuration: mean ± sample std (ddof=1) over seeds, n = count.",
             ""]
    if mixed:
        lines += [f"> **Different datasets: {_md(', '.join(mixed))}.** Metrics are not comparable across datasets.", ""]
    if skipped:
        lines += ["Skipped: " + "; ".join(_md(s) for s in skipped), ""]
    headers = ["configuration", "n", "dataset", *metrics]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for g in groups:
        cells = [g["label"], str(g["n"]), str(g["settings"].get("dataset", "?")), *[format_stat(g["stats"].get(m)) for m in metrics]]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    lines += ["", "## Runs", ""]
    headers = ["run", "configuration", "seed", "complete", *KEY_SETTINGS, *metrics]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in records:
        cells = [r.name, r.group, str(r.seed), "yes" if r.complete else "no", *[_short(v) for v in _key_settings(r.settings)],
                 *[f"{r.metrics[m]:.4g}" if m in r.metrics else "–" for m in metrics]]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    if stability:
        lines += ["", "## Seed stability of the sensitivity analysis", "",
                  "| " + " | ".join(STABILITY_HEADERS) + " |", "|" + "---|" * len(STABILITY_HEADERS)]
        for row in stability:
            lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else "–" if c is None else _md(c)
                                           for c in _stability_cells(row)) + " |")
    notes = [f"- {_md(r.name)}: {_md(', '.join(r.missing))}" for r in records if r.missing]
    if notes:
        lines += ["", "Missing files:", *notes]
    return "\n".join(lines) + "\n"


def _draw(records, out: Path) -> tuple[dict, list[str]]:

    plots, missing = {}, []
    for name, (function, _) in COMPARE_PLOTS.items():
        try:
            plots[name] = function(records, out)
        except MissingInput as exc:
            logger.warning("%s not drawn: %s", name, exc)
            missing.append(f"{name}: {exc}")
    return plots, missing


def _write_html(path, groups, records, metrics, mixed, skipped, plots, plot_missing, stability=()) -> Path:

    intro = ('<p class="note">Runs that differ only by seed form one configuration: mean ± sample standard deviation '
             "(ddof=1) over its seeds, n = number of runs.</p>")
    if mixed:
        intro += (f'<div class="missing"><b>Different datasets: {esc(", ".join(mixed))}.</b> Metrics are not '
                  "comparable across datasets; the dataset column tells them apart.</div>")
    summary = intro + table(["configuration", "n", "dataset", *metrics],
                            [[g["label"], g["n"], g["settings"].get("dataset", "?"),
                              *[format_stat(g["stats"].get(m)) for m in metrics]] for g in groups], numeric_from=99)
    runs = table(["run", "configuration", "seed", "complete", *KEY_SETTINGS, *metrics],
                 [[r.name, r.group, r.seed, "yes" if r.complete else "no", *[_short(v) for v in _key_settings(r.settings)],
                   *[r.metrics.get(m) for m in metrics]] for r in records], numeric_from=4)
    figures = "".join(f"<figure>{image_tag(p, name)}<figcaption><b>{esc(name)}</b> — {esc(COMPARE_PLOTS[name][1])}"
                      "</figcaption></figure>" for name, p in plots.items())
    missing = plot_missing + [f"{r.name}: {m}" for r in records for m in r.missing] + skipped
    page = render_page(
        title=f"lorasens comparison — {len(records)} run(s)",
        subtitle=f"{len(groups)} configuration(s) · generated {time.strftime('%Y-%m-%d %H:%M:%S')}",
        sections=[("summary", "Configurations (mean ± std over seeds)", summary), ("runs", "Runs", runs),
                  *([("stability", "Seed stability of the sensitivity analysis",
                      '<p class="note">Across-seed Spearman of the module scores and Jaccard overlap of each '
                      "measure's top-k modules (k = the number recommended), against two random sets of those "
                      "sizes.</p>" + table(STABILITY_HEADERS, [_stability_cells(r) for r in stability],
                                           numeric_from=2))] if stability else []),
                  ("plots", "Plots", figures + missing_box(plot_missing))],
        missing=missing,
    )
    path.write_text(page, encoding="utf-8")
    return path
