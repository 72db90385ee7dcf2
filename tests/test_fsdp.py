"""FSDP2: per-module measures from sharded LoRA gradients equal one process's, and phase freezing holds.

tests/fsdp_worker.py runs `fully_shard` (FSDP2, what accelerate's FSDP2 plugin applies) on the tiny Llama with
LoRA in 2 CPU processes (gloo), each rank holding half of every LoRA matrix and gradient, and the same steps as one
plain process on the same global batch. accelerate 1.15 enables its FSDP plugin only on accelerators (a CPU run
under the Trainer falls back to DDP), so the Trainer path is covered by benchmarks/gpu_check.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp_worker.py"


def run(out: Path, nproc: int) -> dict:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = (launcher if nproc > 1 else [sys.executable]) + [str(WORKER), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: torch.load(out / f"rank{r}.pt") for r in range(nproc)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / a.abs().clamp_min(1e-30)).max().item()


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
    assert len(frozen) == 4 * 3 * 2  # 4 layers x 3 MLP modules x (A, B)
    for i in frozen:
        assert torch.equal(sharded[0]["weights"][0][i], sharded[0]["weights"][2][i])
    trained = [i for i, none in enumerate(sharded[0]["grad_is_none"][1]) if not none]
    assert all(not torch.equal(sharded[0]["weights"][0][i], sharded[0]["weights"][2][i]) for i in trained)
