"""--precision on a CPU: auto stays fp32; bf16 trains under the Trainer's bf16 autocast with fp32 weights where the
CPU multiplies bf16 natively, and is refused with the valid choices where it does not."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lorasens.model.loading as loading
from lorasens.config import build_config
from lorasens.errors import UserError
from lorasens.experiment.run import run_experiment
from lorasens.rundir.files import ADAPTER_WEIGHTS, FINAL_MODEL, MODULE_NORMS
from lorasens.training.trainer import training_arguments

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; a GPU takes bf16 weights instead")

BASE = dict(model="tiny-random-llama", dataset="synthetic", r=4, batch_size=4, max_length=128, eval_steps=0,
            evaluate=False, train_samples=16, eval_samples=8, lora_dropout=0.0, lr=1e-2, max_steps=2, ablation=False)


def test_auto_is_fp32_on_a_cpu_and_bf16_autocasts(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert loading.select_dtype("auto") == loading.select_dtype("bf16") == torch.float32  # weights stay fp32
    auto = build_config(cli_overrides={**BASE, "output_dir": str(tmp_path)})
    bf16 = build_config(cli_overrides={**BASE, "precision": "bf16", "output_dir": str(tmp_path)})
    assert training_arguments(auto, tmp_path).bf16 is False
    assert training_arguments(bf16, tmp_path).bf16 is True


def test_bf16_without_native_support_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserError, match=r"--precision bf16 needs .* native bf16 .*; valid here: auto, fp32"):
        loading.load_model("tiny-random-llama", "bf16")


@pytest.mark.slow
def test_bf16_training_computes_in_bf16_and_keeps_fp32_weights(tmp_path, monkeypatch):
    """Same batches and seed: the bf16 run's losses are the fp32 run's to bf16 rounding, not equal to them (the
    autocast is on), and what it saves and tracks is fp32 and finite."""
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)  # the autocast path runs (slower) on any CPU
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = build_config(cli_overrides={**BASE, "precision": precision, "output_dir": str(tmp_path),
                                          "experiment_name": precision})
        runs[precision] = run_experiment(cfg).run_dir
    losses = {p: [json.loads(line)["loss"] for line in (d / "train_log.jsonl").read_text().splitlines()]
              for p, d in runs.items()}
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    adapter = load_file(runs["bf16"] / FINAL_MODEL / ADAPTER_WEIGHTS)
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    with open(runs["bf16"] / MODULE_NORMS) as f:
        norms = [float(row["grad_norm"]) for row in csv.DictReader(f)]
    assert all(math.isfinite(n) for n in norms) and sum(n > 0 for n in norms) >= len(norms) // 2  # A starts at 0 grad
    assert json.loads((runs["bf16"] / "config.json").read_text())["model"]["precision"] == "bf16"
