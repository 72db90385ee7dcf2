"""Markdown tables of a placement benchmark, from docs/results/TASK/validation/*.json and sweep.csv, for RESULTS.md.

    python benchmarks/placement/tables.py e2e     # prints the tables; RESULTS.md pastes them between its markers
    python benchmarks/placement/tables.py e2e --write   # replaces the block between <!-- TASK:start/end --> in place
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

from lorasens.rundir.metrics import read_run_metrics

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "RESULTS.md"


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def tables(task: str) -> str:
    folder = ROOT / "docs" / "results" / task / "validation"
    summary_path = folder / "placement_validation.json"
    lines = []
    probe = ROOT / "docs" / "results" / task / "probe" / "summary.json"
    if probe.exists():
        p = json.loads(probe.read_text())
        lines.append(f"Probe: {p['steps']} steps, final validation loss {fmt(p.get('final_eval_loss'))}, "
                     f"wall time {fmt(p.get('wall_time_s'), 0)} s.")
    if not summary_path.exists():
        return "\n".join(lines + sweep_table(folder) + ["", "No test training has finished yet."])
    s = json.loads(summary_path.read_text())
    metrics = sorted({m for e in s["arms"].values() for m in (e.get("metrics") or {}) if m in ("bleu", "rouge_l",
                      "logical_form_accuracy")})
    status = "complete" if s["complete"] else "**partial** (the benchmark is still running; rerun its command to continue)"
    lines += ["", f"Status: {status}. Budget {fmt(s['budget']['lora_params'])} LoRA parameters "
              f"({fmt(100 * s['budget']['lora_params'] / s['budget']['all_modules_lora_params'], 1)}% of every module at "
              f"rank {s['budget']['r']}); test: {fmt(s['test']['prompts_used'])} prompts "
              f"({fmt(s['test'].get('references'))} references).", ""]
    head = ["arm", "family", "LoRA params", "lr", "trainings", "validation loss", "late fall", "test loss", *metrics,
            "recommended − arm (test loss, 95% CI)", "verdict"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in s["arms"].items():
        c = (s.get("comparisons", {}).get(name) or {}).get("test_loss")
        diff = f"{c['difference']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if c else "–"
        verdict = (c["verdict"] + (" (primary)" if name == s.get("primary") else "")) if c else "–"
        row = [name, e["family"], fmt(e.get("lora_params")), fmt(e.get("lr"), 4) if e.get("lr") else "–",
               fmt(e.get("units")), fmt(e.get("validation_loss")), fmt(e.get("late_eval_fall")),
               fmt(e.get("test_loss")),
               *[fmt((e.get("metrics") or {}).get(m), 2) for m in metrics], diff, verdict]
        lines.append("| " + " | ".join(row) + " |")
    falling = s.get("still_falling") or {}
    if falling.get("note"):
        lines += ["", f"Late fall: the validation loss at 3/4 of the steps minus the final one; {falling['note']}."]
    lines += sweep_table(folder)
    lines += length_table(folder, metrics)
    costs = s.get("costs") or {}
    if costs.get("training_s"):
        parts = [f"{k.removesuffix('_fraction_of_training').replace('_', ' ')} {v:.2f}×"
                 for k, v in costs.items() if k.endswith("_fraction_of_training")]
        lines += ["", f"Costs as fractions of one training of the recommendation ({fmt(costs['training_s'], 0)} s): "
                  + ", ".join(parts) + "."]
    return "\n".join(lines)


def sweep_table(folder: Path) -> list[str]:
    """Validation loss per arm and rate, from every finished sweep training's summary.json (so the table grows while
    the sweep runs); the chosen rate in bold once sweep.csv names it."""
    losses: dict[str, dict[float, float | None]] = {}
    for summary in sorted((folder / "sweep").glob("*_lr*/summary.json")):
        arm, lr = summary.parent.name.rsplit("_lr", 1)
        losses.setdefault(arm, {})[float(lr)] = json.loads(summary.read_text()).get("final_eval_loss")
    if not losses:
        return []
    chosen = set()
    if (folder / "sweep.csv").exists():
        chosen = {(r["arm"], float(r["lr"])) for r in csv.DictReader((folder / "sweep.csv").open(newline=""))
                  if r["chosen"] == "True"}
    rates = sorted({lr for by_rate in losses.values() for lr in by_rate})
    lines = ["", "Learning-rate sweep, seed 1 (validation loss at the sweep's last step; the chosen rate in bold):", "",
             "| arm | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for arm, by_rate in losses.items():
        cells = [fmt(by_rate[lr]) if lr in by_rate else "–" for lr in rates]
        cells = [f"**{c}**" if (arm, lr) in chosen else c for c, lr in zip(cells, rates)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def length_table(folder: Path, metrics: list[str]) -> list[str]:
    """The length checks (long/ARM_seedS_Nsteps[_lrX]: one arm and seed, N steps, at its chosen rate or X), each beside
    the same arm and seed at the benchmark's length: validation loss at every evaluation, late fall, test loss and
    metrics."""
    checks = sorted((folder / "long").glob("*/test_scores.json"))
    if not checks:
        return []
    lines = ["", "Length checks (one arm and seed, the schedule stretched to the longer length; each beside the same "
             "arm and seed at the benchmark's length):", "",
             "| arm | seed | lr | steps | validation loss at each evaluation | late fall | test loss | "
             + " | ".join(metrics) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(metrics)]
    shown = set()
    for path in checks:
        long = json.loads(path.read_text())
        for run in (folder / "runs" / f"{long['arm']}_seed{long['seed']}", path.parent):
            scores = run / "test_scores.json"
            if not scores.exists() or run in shown:
                continue
            shown.add(run)
            s = json.loads(scores.read_text())
            evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines() if line.strip()]
            curve = ", ".join(f"{e['step']}: {e['eval_loss']:.4f}" for e in evals if e.get("eval_loss") is not None)
            lines.append(f"| {s['arm']} | {s['seed']} | {s['lr']:g} | {s['steps']} | {curve} | "
                         f"{fmt(read_run_metrics(run).late_eval_fall)} | {fmt(s['test_loss'])} | "
                         + " | ".join(fmt(s['metrics'].get(m), 2) for m in metrics) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("task", choices=("e2e", "wikisql"))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    text = tables(args.task)
    if not args.write:
        print(text)
        return 0
    start, end = f"<!-- {args.task}:start -->", f"<!-- {args.task}:end -->"
    content = RESULTS.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{RESULTS} has no {start} ... {end} block")
    RESULTS.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
