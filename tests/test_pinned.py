"""Pinned values: a tiny deterministic CPU run's numbers, compared with values stored in tests/fixtures/pinned_run.json.

Every other training test compares two runs of the same code path; this one compares the code with the numbers it
produced when they were recorded: per-step training and validation losses, gradient norms (group, layer, module),
importance, the update magnitude ||dW||, the ablation's losses and deltas, the sensitivity rankings and the
recommended modules. A refactoring that changes any of them fails here.

The run uses the built-in tiny random Llama and the synthetic dataset (both made in code, so the test needs no
download and no ../shared). Tolerance: rtol 1e-4 (float32 on CPU is deterministic for a fixed seed and thread count,
but summation order may differ between library versions).

To record new values after a change that is meant to change the numbers (say so in the commit message):
    LORASENS_PIN=record python -m pytest tests/test_pinned.py
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "pinned_run.json"
RTOL = 1e-4
ATOL = 1e-9
# An ablation delta is the difference of two losses of 1-3 nats. Float32 sums over a few hundred tokens carry
# about 1e-8 of that, which depends on the CPU's kernels and is most of RTOL on a 4.5e-5 delta: deltas are held to
# an absolute 1e-6 nats instead (still far below any delta the analysis reports as a difference).
DELTA_ATOL = 1e-6
DELTA_FIELDS = ("delta_loss", "delta_ci_low", "delta_ci_high")
SETTINGS = {
    "model": "tiny-random-llama", "dataset": "synthetic", "seed": 3, "max_steps": 4, "max_length": 160,
    "batch_size": 4, "train_samples": 24, "eval_samples": 4, "eval_steps": 2, "eval_batch_size": 4,
    "evaluate": False, "ablation_max_single": 2, "analysis_samples": 12, "logging_steps": 1,
}
CSV_FILES = {
    "group_norms": "gradient_analysis.group_norms.csv",
    "layer_norms": "gradient_analysis.layer_norms.csv",
    "module_norms": "gradient_analysis.module_norms.csv",
    "importance": "importance.csv",
    "update_magnitude": "update_magnitude.csv",
}
ABLATION_COLUMNS = ("kind", "name", "num_modules", "loss", "delta_loss", "delta_ci_low", "delta_ci_high", "rank")


def _cell(value: str):
    """A CSV cell as a number where it is one (so it is compared with a tolerance), else the string."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _csv(path: Path, columns=None) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _cell(v) for k, v in row.items() if columns is None or k in columns} for row in csv.DictReader(f)]


def _jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: row[k] for k in keys if k in row} for row in rows]


def digest(run_dir: Path) -> dict:
    """The numbers of a finished run that the pin holds (no timings, no paths)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    sensitivity = json.loads((run_dir / "sensitivity.json").read_text())
    recommendation = summary["recommendation"]
    return {
        "train_log": _jsonl(run_dir / "train_log.jsonl", ("step", "loss", "grad_norm", "lr", "phase", "tokens")),
        "eval_log": _jsonl(run_dir / "eval_log.jsonl", ("step", "eval_loss")),
        **{name: _csv(run_dir / file) for name, file in CSV_FILES.items()},
        "ablation": _csv(run_dir / "sensitivity_ablation.csv", ABLATION_COLUMNS),
        "measures": sensitivity["measures"],
        "rankings": sensitivity["rankings"],
        "agreement": sensitivity["agreement"],
        "budget": {k: sensitivity["budget"][k] for k in ("params_used", "params_budget", "selected", "ranks")},
        "recommendation": {k: recommendation[k] for k in ("modules", "params_used", "num_selected",
                                                          "target_modules")},
        "summary": {k: summary[k] for k in ("steps", "trainable_params", "lora_modules", "final_train_loss",
                                            "final_eval_loss", "best_eval_loss", "final_model_from", "train_data",
                                            "validation_data", "sensitivity_top")},
    }


def assert_close(actual, expected, where: str = "") -> None:
    """Structural equality; floats within RTOL/ATOL (ints and strings exact)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not a dict"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), \
            f"{where}: length {len(actual) if isinstance(actual, list) else actual!r} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, (int, float)), f"{where}: {actual!r} is not a number (pinned {expected!r})"
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} != nan"
        else:
            atol = DELTA_ATOL if where.endswith(DELTA_FIELDS) else ATOL
            assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=atol), f"{where}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.fixture(scope="module")
def pinned_digest(tmp_path_factory) -> dict:
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    out = tmp_path_factory.mktemp("pinned")
    cfg = build_config(None, None, {**SETTINGS, "output_dir": str(out), "experiment_name": "pinned"})
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the pinned values were recorded with one thread (summation order)
    try:
        run_dir = run_experiment(cfg).run_dir
    finally:
        torch.set_num_threads(before)
    return digest(Path(run_dir))


@pytest.fixture(scope="module")
def pinned(pinned_digest) -> dict:
    if os.environ.get("LORASENS_PIN") == "record":
        FIXTURE.write_text(json.dumps(pinned_digest, indent=1) + "\n")
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("part", ["train_log", "eval_log", "group_norms", "layer_norms", "module_norms",
                                  "importance", "update_magnitude", "ablation", "measures", "rankings", "agreement",
                                  "budget", "recommendation", "summary"])
def test_run_reproduces_the_pinned_values(pinned_digest, pinned, part):
    assert_close(pinned_digest[part], pinned[part], part)


def test_pin_covers_every_part(pinned):
    """The fixture holds real content: four steps, every module, a non-empty ablation and recommendation."""
    assert [row["step"] for row in pinned["train_log"]] == [1, 2, 3, 4]
    assert len(pinned["measures"]["grad_norm"]) == 28
    assert {row["kind"] for row in pinned["ablation"]} >= {"all", "group", "layer"}
    assert 0 < pinned["recommendation"]["num_selected"] < 28
