"""FSDP2: per-module measures from sharded LoRA gradients equal one process's, and phase freezing holds.

tests/fsdp_worker.py runs `fully_shard` (FSDP2, what accelerate's FSDP2 plugin applies) on the pretrained
stories260K Llama (../shared; the tiny random Llama where it is absent) with LoRA in 2 CPU processes (gloo), each
rank holding half of every LoRA matrix and gradient, and the same steps as one plain process on the same global
batch. lorasens' gradient-tracking callback runs in both through the Trainer's event sequence and writes its CSVs.
accelerate 1.15 enables its FSDP plugin only on accelerators (a CPU run under the Trainer falls back to DDP), so
`lorasens train --fsdp` itself is covered by benchmarks/gpu_check_large.sh."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorasens.rundir import files

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp_worker.py"
STORIES260K = REPO.parent / "shared" / "models" / "stories260K"


def run(out: Path, nproc: int) -> dict:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    model = [str(STORIES260K)] if STORIES260K.is_dir() else []
    command = (launcher if nproc > 1 else [sys.executable]) + [str(WORKER), str(out), *model]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: torch.load(out / f"rank{r}.pt") for r in range(nproc)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / a.abs().clamp_min(1e-30)).max().item()


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_csv(one: Path, two: Path, *values: str) -> None:
    """Same rows in the same order; the `values` columns equal to 1e-5 relative where measured, empty (frozen) in
    both where not."""
    a, b = csv_rows(one), csv_rows(two)
    assert len(a) == len(b) > 0
    for row_a, row_b in zip(a, b):
        assert {k: v for k, v in row_a.items() if k not in values} == {k: v for k, v in row_b.items() if k not in values}
        for value in values:
            if row_a[value] == "":
                assert row_b[value] == ""
            else:
                x, y = float(row_a[value]), float(row_b[value])
                assert x > 0 and abs(x - y) <= 1e-5 * x, (value, row_a, row_b)


@pytest.mark.slow
def test_fsdp_two_processes_measure_like_one(tmp_path):
    single = run(tmp_path / "one", 1)[0]
    sharded = run(tmp_path / "two", 2)
    assert sharded[0]["grad_is_none"] == single["grad_is_none"]
    for measure in ("norms", "importance", "delta_w"):
        for step in range(3):
            a, b = single[measure][step], sharded[0][measure][step]
            assert a.shape == b.shape and (a > 0).all()
            # Exact up to float summation order (seen: 7e-7 at most).
            assert relative(a, b) < 1e-5, (measure, step)
            assert torch.equal(b, sharded[1][measure][step])  # every rank holds the all-reduced result
    # Steps 2-3 freeze the MLP modules (a phase switch through lora.set_trainable): no gradient on any rank, and
    # their weights stay bitwise where step 1 left them although AdamW has weight decay.
    frozen = [i for i, none in enumerate(sharded[0]["grad_is_none"][1]) if none]
    layers = 5 if STORIES260K.is_dir() else 4
    assert len(frozen) == layers * 3 * 2  # layers x 3 MLP modules x (A, B)
    for i in frozen:
        assert torch.equal(sharded[0]["weights"][0][i], sharded[0]["weights"][2][i])
    trained = [i for i, none in enumerate(sharded[0]["grad_is_none"][1]) if not none]
    assert all(not torch.equal(sharded[0]["weights"][0][i], sharded[0]["weights"][2][i]) for i in trained)
    # The callback's files, written by rank 0 from the all-reduced shard measures, equal the one-process run's:
    # every module's gradient norm per step (MLP cells empty once frozen), group and layer norms, importance and
    # ||delta W||; rank 1 writes nothing.
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    modules = csv_rows(two / files.MODULE_NORMS)
    assert len(modules) == 3 * layers * 7 * 2
    assert sum(r["grad_norm"] == "" for r in modules) == 2 * layers * 3 * 2  # steps 2-3, MLP A and B
    assert {r["phase"] for r in modules if r["step"] != "1"} == {"attn_only"}
    assert_same_csv(one / files.MODULE_NORMS, two / files.MODULE_NORMS, "grad_norm")
    assert_same_csv(one / files.IMPORTANCE, two / files.IMPORTANCE, "importance")
    assert_same_csv(one / files.UPDATE_MAGNITUDE, two / files.UPDATE_MAGNITUDE, "delta_w_norm")
    assert_same_csv(one / files.GROUP_NORMS, two / files.GROUP_NORMS, "attn", "mlp", "total")
    assert_same_csv(one / files.LAYER_NORMS, two / files.LAYER_NORMS, "attn", "mlp")
