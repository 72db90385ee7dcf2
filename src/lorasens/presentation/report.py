"""`report.html`: one self-contained page per run, drawn from the run directory's files only.

Sections: config summary, phases, evaluation metrics (and baseline), sensitivity ranking, recommended LoRA config,
plots. Images are embedded as base64 data URIs and the CSS is inline, so the file can be mailed or opened offline.
A missing input never stops the report: its section says which file is missing and the rest is drawn.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorasens.analysis.budget import starts_with_eva
from lorasens.config import key_settings
from lorasens.errors import UserError
from lorasens.presentation.plots import RUN_PLOTS, plot_run
from lorasens.rundir.files import (
    CONFIG_FILE,
    EVALUATION_SUFFIX,
    PHASES,
    SENSITIVITY,
    TRAIN_LOG,
    PREDICTIONS_SUFFIX,
    RECOMMENDED_CONFIG,
    RECORDED_BY,
    REPORT_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    VALIDATION_DIR,
    VALIDATION_JSON,
    VALIDATION_PNG,
    evaluation_files,
    unknown_fields,
)
from lorasens.safeio import read_json, read_jsonl
from lorasens.safeio import write_text_atomic
from lorasens.training.context import RunContext

logger = logging.getLogger(__name__)

# The answer first; the configuration tables last.
SECTIONS = (("answer", "Answer"), ("evaluation", "Evaluation"), ("sensitivity", "Sensitivity ranking"),
            ("recommendation", "Recommended LoRA config"), ("validation", "Placement validation"),
            ("plots", "Plots"), ("phases", "Phases"), ("config", "Configuration"))
# (label, config section, field) shown in the config summary table.
KEY_SETTINGS = key_settings()
SUMMARY_KEYS = ("steps", "final_train_loss", "final_eval_loss", "best_eval_loss", "late_eval_fall",
                "final_model_from", "trainable_params", "lora_modules", "num_layers", "train_runtime_s", "wall_time_s")
RANKING_TOP = 10
# A setting a user's training script did not tell SensitivityCallback (config.json "recorded_by").
UNKNOWN_SETTING = "unknown (not recorded)"

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d1d1d;background:#fafafa}
header{background:#0b3d63;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85;font-size:13px}nav{padding:8px 28px;background:#e8eef3;font-size:14px}
nav a{margin-right:16px;color:#0b3d63;text-decoration:none}main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:14px 20px;margin:16px 0}
h2{font-size:18px;margin:0 0 10px;color:#0b3d63}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #d5d5d5;padding:4px 9px;text-align:left}
th{background:#f0f3f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.missing{background:#fff4e5;border-left:4px solid #E69F00;padding:8px 12px;margin:8px 0;font-size:13px}
.note{color:#555;font-size:13px}pre{background:#f4f4f4;padding:10px;overflow-x:auto;font-size:12px}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #e3e3e3}figcaption{font-size:13px;color:#444}
.scroll{overflow-x:auto}#answer{border:2px solid #0b3d63}#answer li{margin:4px 0}
table.grid td{width:34px;height:20px;text-align:center;padding:0}table.grid td.sel{outline:2px solid #E69F00}.cols{display:flex;flex-wrap:wrap;gap:10px 40px;align-items:flex-start}
"""


@dataclass
class ReportResult:
    path: Path
    plots: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # what could not be shown, one line each


def report_after_training(ctx: RunContext) -> dict:
    """Step after training in run_experiment: draws all plots and writes report.html.

    summary.json is written after the report (the report's outcome is part of it), so the summary so far stands in.
    """
    try:
        result = write_report(ctx.run_dir, summary=ctx.summary)
    except Exception as exc:  # noqa: BLE001 - the trained run and its summary matter more than its report
        logger.error("report.html not written (%s: %s); redraw it with `lorasens report %s`", type(exc).__name__, exc,
                     ctx.run_dir, exc_info=True)
        return {"report": None, "report_error": f"{type(exc).__name__}: {exc}"}
    return {"report": str(result.path), "plots": sorted(result.plots), "report_missing": result.missing}


def write_report(run_dir: str | Path, redraw: bool = True, summary: dict | None = None) -> ReportResult:
    """Redraw every plot of a run directory and write its report.html; names what is missing.

    `redraw=False` embeds the PNGs already there and draws only the absent ones. `summary` stands in for
    summary.json when the run is finishing (the report is written before summary.json).
    """

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give a run directory (one that holds {CONFIG_FILE})")
    if not any((run_dir / name).exists() for name in RUN_FILES) and not evaluation_files(run_dir):
        raise UserError(f"{run_dir} is not a lorasens run directory: none of {', '.join(RUN_FILES)} is there")
    missing: list[str] = []
    outcome = plot_run(run_dir, redraw=redraw)
    plots = {name: value for name, value in outcome.items() if isinstance(value, Path)}
    missing += [f"{name}: {value}" for name, value in outcome.items() if not isinstance(value, Path)]
    config = read_json(run_dir / CONFIG_FILE, tolerant=True)
    summary = summary if summary is not None else read_json(run_dir / SUMMARY_FILE, tolerant=True)
    if config is None:
        state = "corrupt" if (run_dir / CONFIG_FILE).exists() else "missing"
        missing.insert(0, f"{CONFIG_FILE} is {state}: settings unknown")
    body = [
        _section("answer", (SENSITIVITY,), _answer_section, run_dir),
        _section("evaluation", (f"*{EVALUATION_SUFFIX}",), _evaluation_section, run_dir, config),
        _section("sensitivity", (SENSITIVITY,), _sensitivity_section, run_dir),
        _section("recommendation", (RECOMMENDED_CONFIG,), _recommendation_section, run_dir),
        _section("validation", (f"{VALIDATION_DIR}/{VALIDATION_JSON}",), _validation_section, run_dir),
        _plots_section(run_dir, plots, outcome, RUN_PLOTS),
        _section("phases", (PHASES,), _phases_section, run_dir),
        _section("configuration", (CONFIG_FILE, SUMMARY_FILE), _config_section, config, summary, run_dir),
    ]
    missing += [line for _, lines in body for line in lines]
    status = "complete" if summary is not None else "incomplete (no summary.json: the run did not finish)"
    diverged = (summary or {}).get("diverged")
    if isinstance(diverged, dict):
        status = f"DIVERGED at step {diverged.get('step')}"
        note = (f"training diverged at step {diverged.get('step')} ({diverged.get('reason')}): the measures are not "
                "finite, so no sensitivity analysis or recommendation was made")
        missing.insert(0, note)
        text, lines = body[0]
        body[0] = (f'<p class="missing"><b>{esc(note)}</b></p>' + text, lines)  # on top, above the answer
    page = render_page(
        title=f"lorasens report — {run_dir.name}",
        subtitle=f"{run_dir.resolve()} · {status} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}",
        sections=[(key, title, text) for (key, title), (text, _) in zip(SECTIONS, body)],
        missing=missing,
    )
    path = run_dir / REPORT_FILE
    write_text_atomic(path, page)  # a full disk leaves no 0-byte report.html
    logger.info("report: %s (%d plots%s)", path, len(plots), f", {len(missing)} item(s) missing" if missing else "")
    return ReportResult(path, plots, missing)


# ---------------------------------------------------------------------------------------------------------------
# HTML building blocks (shared with lorasens.experiment.compare)


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def table(headers: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    lines = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            css = ' class="num"' if i >= numeric_from and isinstance(cell, (int, float)) else ""
            cells.append(f"<td{css}>{esc(fmt(cell))}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table></div>'


def missing_box(lines: list[str]) -> str:
    if not lines:
        return ""
    return '<div class="missing"><b>Not available:</b><ul>' + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul></div>"


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def render_page(title: str, subtitle: str, sections: list[tuple[str, str, str]], missing: list[str]) -> str:
    nav = "".join(f'<a href="#{key}">{esc(name)}</a>' for key, name, _ in sections)
    blocks = "".join(f'<section id="{key}"><h2>{esc(name)}</h2>{text}</section>' for key, name, text in sections)
    overview = ""
    if missing:
        overview = f'<section id="missing"><h2>Missing inputs</h2>{missing_box(missing)}</section>'
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{blocks}{overview}</main></body></html>\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Sections: each returns (html, [missing lines])


def _section(name: str, files: tuple[str, ...], build, *args) -> tuple[str, list[str]]:
    """One section; a file of an unexpected shape costs this section only, and is named."""
    try:
        return build(*args)
    except Exception as exc:  # noqa: BLE001 - malformed input: report it, keep the rest of the page
        logger.warning("report section %s not shown: %s: %s", name, type(exc).__name__, exc, exc_info=True)
        line = f"{name}: {' / '.join(files)} has an unexpected format ({type(exc).__name__}: {exc})"
        return missing_box([line]), [line]


def _answer_section(run_dir: Path) -> tuple[str, list[str]]:
    """Where the LoRA goes, in words, with the evidence and the verdict; the layer × module grid beside it."""
    from lorasens.presentation.answer import build_answer, grid_html

    answer = build_answer(run_dir)
    lines = answer.lines()
    if not lines:
        line = f"answer: {absent(run_dir, SENSITIVITY)}"
        return missing_box([line]), [line]
    if not answer.verdict:
        lines.append(f"Not validated: `lorasens validate {run_dir}` trains it against matched random placements.")
    items = "".join(f"<li>{esc(x)}</li>" for x in lines)
    return f'<div class="cols"><ul>{items}</ul><div>{grid_html(answer.grid, esc)}</div></div>', []


def _config_section(config: dict | None, summary: dict | None, run_dir: Path) -> tuple[str, list[str]]:
    missing = []
    columns = []  # settings and run summary side by side
    details = ""
    if config is not None:
        unknown = unknown_fields(config)
        rows = [[label, UNKNOWN_SETTING if f"{section}.{name}" in unknown else config.get(section, {}).get(name)]
                for label, section, name in KEY_SETTINGS]
        rows.append(["preset", config.get("preset")])
        recorded = config.get(RECORDED_BY)
        if isinstance(recorded, dict):
            details += (f'<p class="note">Recorded by {esc(recorded.get("recorder"))} in a '
                        f'{esc(recorded.get("trainer"))} script; settings the script did not tell lorasens: '
                        f'{esc(", ".join(sorted(unknown)) or "none")}.</p>')
        columns.append("<div><h3>Settings</h3>" + table(["setting", "value"], rows) + "</div>")
        details += ("<details><summary>Full config.json</summary><pre>" + esc(json.dumps(config, indent=2))
                   + "</pre></details>")
    else:
        missing.append(f"{CONFIG_FILE} is {'corrupt' if (run_dir / CONFIG_FILE).exists() else 'missing'}")
    if summary is not None:
        rows = [[key, summary[key]] for key in SUMMARY_KEYS if key in summary]
        columns.append("<div><h3>Run summary</h3>" + table(["quantity", "value"], rows) + "</div>")
    else:
        train = read_jsonl(run_dir / TRAIN_LOG, tolerant=True)
        missing.append(f"{SUMMARY_FILE} is corrupt" if (run_dir / SUMMARY_FILE).exists()
                       else f"{SUMMARY_FILE} is missing (run unfinished?)")
        if train:
            columns.append("<div><h3>Run so far (from train_log.jsonl)</h3>" + table(
                ["quantity", "value"], [["last logged step", train[-1].get("step")],
                                        ["last train loss", train[-1].get("loss")]]) + "</div>")
    return missing_box(missing) + f'<div class="cols">{"".join(columns)}</div>' + details, missing


def _phases_section(run_dir: Path) -> tuple[str, list[str]]:
    phases = read_json(run_dir / PHASES, tolerant=True)
    if phases is None:
        return ('<p class="note">Static run: one phase, all LoRA modules trainable throughout '
                f"(no {PHASES}).</p>", [])
    transitions = phases.get("transitions", [])
    ends = phases.get("ends", [])
    rows = []
    for i, t in enumerate(transitions):
        next_step = transitions[i + 1]["step"] if i + 1 < len(transitions) else None
        index = int(t.get("phase", i + 1))
        end = next_step if next_step is not None else (ends[index - 1] if 0 < index <= len(ends) else None)
        rows.append([t.get("phase"), t.get("label"), t["step"] + 1, end, len(t.get("trainable_modules", [])),
                     t.get("trainable_params")])
    text = f"<p>Strategy <b>{esc(phases.get('strategy'))}</b>; phase end steps {esc(ends)}.</p>"
    text += table(["phase", "trains", "first step", "last step", "trainable modules", "trainable parameters"], rows)
    return text, []


def _evaluation_section(run_dir: Path, config: dict | None) -> tuple[str, list[str]]:
    files = evaluation_files(run_dir)
    if not files:
        if "data.dataset" in unknown_fields(config):
            line = ("no evaluation: the run was recorded in a training script on data lorasens does not know; score "
                    "final_model/ with lorasens.evaluation.api.evaluate_dataset(NAME, model_path=RUN_DIR)")
            return missing_box([line]), [line]
        dataset = (config or {}).get("data", {}).get("dataset", "{dataset}")
        line = f"{dataset}{EVALUATION_SUFFIX} is missing (evaluation off or not run)"
        return missing_box([line]), [line]
    parts = []
    for path in files:
        data = read_json(path, tolerant=True)
        if data is None:
            return missing_box([f"{path.name} is unreadable"]), [f"{path.name} is unreadable"]
        metrics = data.get("metrics") or {}
        baseline = ((data.get("baseline") or {}).get("metrics")) or {}
        headers = ["metric", "fine-tuned"] + (["base model", "Δ (fine-tuned − base)"] if baseline else [])
        rows = []
        for name, value in metrics.items():
            if name == "metrics_note":  # e.g. no Java: stand-in metrics under other names; shown below the table
                continue
            row = [name, value]
            if baseline:
                base = baseline.get(name)
                delta = value - base if isinstance(value, (int, float)) and isinstance(base, (int, float)) else None
                row += [base, delta]
            rows.append(row)
        parts.append(f"<h3>{esc(data.get('dataset', path.name))} · split {esc(data.get('split'))} · "
                     f"{esc(data.get('num_examples'))} examples</h3>" + table(headers, rows))
        if metrics.get("metrics_note"):
            parts.append(f'<p class="note"><b>Note:</b> {esc(metrics["metrics_note"])}</p>')
        if not baseline:
            parts.append('<p class="note">No baseline (run with --baseline true to score the base model too).</p>')
        if data.get("settings"):
            parts.append(f'<p class="note">Settings: {esc(json.dumps(data["settings"]))}</p>')
        predictions = read_jsonl(run_dir / path.name.replace(EVALUATION_SUFFIX, PREDICTIONS_SUFFIX), tolerant=True)[:3]
        if predictions:
            parts.append("<details><summary>First predictions</summary>" + table(
                ["prompt", "prediction", "first reference"],
                [[p.get("prompt", ""), p.get("prediction", ""), (p.get("references") or [""])[0]] for p in predictions],
                numeric_from=99) + "</details>")
    return "".join(parts), []


def absent(run_dir: Path, name: str) -> str:
    """Why an analysis file is not shown: missing (analysis not run), or there but unreadable."""
    if (run_dir / name).exists():
        return (f"{name} is corrupt (not valid JSON; the analysis was probably killed while writing it): rerun "
                f"lorasens analyze {run_dir}")
    return f"{name} is missing (analysis not run)"


def _sensitivity_section(run_dir: Path) -> tuple[str, list[str]]:
    data = read_json(run_dir / SENSITIVITY, tolerant=True)
    if data is None:
        line = absent(run_dir, SENSITIVITY)
        return missing_box([line]), [line]
    rankings = data.get("rankings") or {}
    measures = data.get("measures") or {}
    if not rankings:
        line = f"{SENSITIVITY} has no rankings"
        return missing_box([line]), [line]
    names = list(rankings)
    depth = min(RANKING_TOP, max(len(r) for r in rankings.values()))
    rows = []
    for rank in range(depth):
        row = [rank + 1]
        for name in names:
            keys = rankings[name]
            if rank < len(keys):
                score = (measures.get(name) or {}).get(keys[rank])
                row.append(f"{keys[rank]} ({fmt(score)})" if score is not None else keys[rank])
            else:
                row.append("")
        rows.append(row)
    text = (f'<p class="note">Most sensitive modules first (score in brackets), top {depth} of '
            f"{len(data.get('modules') or [])}, per measure.</p>" + table(["rank"] + names, rows, numeric_from=99))
    measured = data.get("measured_under") or {}
    if measured.get("note") or measured.get("probe"):
        text += f'<p class="note">Measured under: {esc(measured.get("note") or "probe run " + str(measured["source"]))}</p>'
    size = data.get("size_correlation") or {}
    if size:
        raw, per = size.get("raw") or {}, size.get("per_param") or {}
        text += ("<h3>Size confound: Spearman ρ of each measure with the module's LoRA parameter count</h3>"
                 '<p class="note">Near 1 = the measure mostly follows module size; the per-parameter version divides '
                 "by r·(in+out).</p>" + table(["measure", "raw", "per parameter"],
                                              [[k, raw.get(k), per.get(k)] for k in raw]))
    first_order = data.get("first_order_agreement")
    if first_order:
        text += (f'<p class="note">First-order estimate −⟨B, ∂L/∂B⟩ vs measured ablation over '
                 f'{first_order.get("modules")} modules: Spearman {fmt(first_order.get("spearman"))}, '
                 f'Pearson {fmt(first_order.get("pearson"))}.</p>')
    ablation = data.get("ablation") or {}
    if ablation.get("delta_ci"):
        deltas = measures.get("ablation") or {}
        order = sorted(ablation["delta_ci"], key=lambda k: -(deltas.get(k) or 0))[:RANKING_TOP]
        wide = set(ablation.get("wide_rank_interval") or [])
        rows = [[k, deltas.get(k), f"[{fmt(ablation['delta_ci'][k][0])}, {fmt(ablation['delta_ci'][k][1])}]",
                 "{}–{}{}".format(*ablation["rank_interval"][k], " (wide)" if k in wide else "")] for k in order]
        text += (f"<h3>Ablation with uncertainty ({ablation.get('examples')} analysis examples, "
                 f"{ablation.get('target_tokens')} target tokens)</h3>"
                 f'<p class="note">Bootstrap {int(100 * ablation.get("confidence", 0.95))}% intervals, paired over '
                 "examples; rank interval over the bootstrap replicates.</p>"
                 + table(["module", "Δ loss", "95% CI", "rank interval"], rows, numeric_from=1))
    agreement = data.get("agreement") or {}
    if agreement:
        text += "<h3>Agreement between measures (Spearman ρ)</h3>" + table(
            ["measures", "ρ"], [[k, v] for k, v in agreement.items()])
    budget = data.get("budget")
    if isinstance(budget, dict):
        def cell_of(v):
            if isinstance(v, dict):
                return ", ".join(f"{k}: {x}" for k, x in v.items())
            return ", ".join(map(str, v)) if isinstance(v, list) else v

        rows = [[k, cell_of(v)] for k, v in budget.items()]
        text += "<h3>Budget</h3>" + table(["quantity", "value"], rows, numeric_from=99)
    elif budget is not None:
        text += f'<p class="note">Budget: {esc(json.dumps(budget))}</p>'
    return text, []


def _recommendation_section(run_dir: Path) -> tuple[str, list[str]]:
    data = read_json(run_dir / RECOMMENDED_CONFIG, tolerant=True)
    if data is None:
        line = absent(run_dir, RECOMMENDED_CONFIG)
        return missing_box([line]), [line]
    eva = starts_with_eva(data)  # EVA's start needs a pass over training batches before training
    usage = ("import json\nfrom peft import LoraConfig, get_peft_model\n"
             f"config = LoraConfig(**json.load(open({RECOMMENDED_CONFIG!r})))\n"
             f"model = get_peft_model(model, config{', low_cpu_mem_usage=True' if eva else ''})")
    if eva:
        usage += ("\nfrom lorasens import initialize_eva\n"
                  "initialize_eva(model, train_dataloader)  # every module keeps its recommended rank")
    return (f"<p>{esc(RECOMMENDED_CONFIG)} — keyword arguments for <code>peft.LoraConfig</code>:</p>"
            f"<pre>{esc(json.dumps(data, indent=2))}</pre><p class=\"note\">Use it:</p><pre>{esc(usage)}</pre>", [])


def _validation_section(run_dir: Path) -> tuple[str, list[str]]:
    """`lorasens validate` results, when the run has been validated (not validating is no missing input)."""
    folder = run_dir / VALIDATION_DIR
    data = read_json(folder / VALIDATION_JSON, tolerant=True)
    if data is None:
        return (f'<p class="note">Not validated. <code>lorasens validate {esc(run_dir)}</code> trains the '
                "recommendation against PEFT's EVA and AdaLoRA and parameter-matched placements and writes this "
                "section.</p>"), []
    metrics = sorted({m for e in data["arms"].values() for m in (e.get("metrics") or {})})[:2]
    rows = []
    for name, e in data["arms"].items():
        if e.get("test_loss") is None:
            continue
        verdict = data.get("verdicts", {}).get(name, {}).get("test_loss", "–" if name != "recommended" else "")
        rows.append([name, e["family"], e["lora_params"], e.get("lr"), e["units"], e.get("validation_loss"),
                     e["test_loss"], *[(e.get("metrics") or {}).get(m) for m in metrics], verdict])
    headers = ["arm", "family", "LoRA params", "lr", "trainings", "validation loss", "test loss", *metrics,
               "recommended vs it (loss)"]
    partial = "" if data.get("complete", True) else (
        "<p><b>Partial:</b> not every training is finished; rerun the same <code>lorasens validate</code> command "
        "to continue.</p>")
    settings = data["settings"]
    text = partial + (f"<p><b>{esc(data['verdict'])}</b></p><p class=\"note\">{settings['max_steps']} steps at batch "
                      f"{settings['batch_size']} per training; each arm at its best learning rate of "
                      f"{esc(', '.join(f'{x:g}' for x in settings['lr_grid']))} by validation loss; budget "
                      f"{fmt(data['budget']['lora_params'])} LoRA parameters (±5%); test: "
                      f"{fmt(data['test']['prompts_used'])} unseen prompts. {esc(data['statistics'])}.</p>"
                      + table(headers, rows, numeric_from=2))
    falling = data.get("still_falling") or {}
    if falling.get("note"):
        text += f'<p class="missing">{esc(falling["note"])}: {esc(", ".join(falling["arms"]))}.</p>'
    comparisons = [[name, metric, c["difference"], f"[{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]", c["p_adjusted"],
                    c["verdict"]] for name, by in data.get("comparisons", {}).items() for metric, c in by.items()]
    if comparisons:
        text += ("<h3>Recommended − other arm</h3>" +
                 table(["versus", "measure", "difference", "95% CI", "p (Holm)", "verdict"], comparisons))
    if (folder / VALIDATION_PNG).exists():
        text += (f"<figure>{image_tag(folder / VALIDATION_PNG, VALIDATION_PNG)}<figcaption>Test loss (and the first "
                 "metric) per arm: large marker the mean, dots single trainings.</figcaption></figure>")
    return text, []


def _plots_section(run_dir: Path, plots: dict, outcome: dict, registry: dict) -> tuple[str, list[str]]:
    parts = []
    for name, (_, caption) in registry.items():
        if name in plots:
            parts.append(f"<figure>{image_tag(plots[name], name)}<figcaption><b>{esc(name)}</b> — {esc(caption)}"
                         "</figcaption></figure>")
        else:
            parts.append(missing_box([f"{name}: {outcome.get(name)}"]))
    return "".join(parts), []
