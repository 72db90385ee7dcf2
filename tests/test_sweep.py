"""`lorasens sweep`: the grid, flag checks, and a killed sweep that resumes without redoing finished runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorasens.cli import main
from lorasens.errors import UserError
from lorasens.experiment.sweep import plan_sweep, split_strategies, train_command

# Two optimizer steps of the tiny model, no generation, tracking or ablation: the sweep machinery is what is tested.
TINY = ["--model", "tiny-random-llama", "--dataset", "synthetic", "--max_steps", "2", "--max_length", "160",
        "--batch_size", "2", "--train_samples", "8", "--eval_samples", "4", "--eval_steps", "0",
        "--evaluate", "false", "--ablation", "false", "--track_gradients", "false", "--track_importance", "false",
        "--track_update_magnitude", "false"]


def overrides(out: Path) -> dict:
    flags = dict(zip(TINY[::2], TINY[1::2]))
    return {k[2:]: v for k, v in flags.items()} | {"output_dir": str(out)}


def test_grid_names_and_commands(tmp_path):
    flags = overrides(tmp_path) | {"max_steps": "6"}  # three phases need at least three steps
    runs = plan_sweep(None, None, flags, ["static", "both->mlp->attn"], ["attn", "mlp"], ["1", "2"])
    assert len(runs) == 8
    assert runs[0].name == "synthetic_static_attn_seed1" and runs[-1].name == "synthetic_both-mlp-attn_mlp_seed2"
    assert all(r.run_dir == tmp_path / r.name and r.status() == "new" for r in runs)
    command = train_command(runs[-1], None, None, flags, rerun=False)
    assert command[1:4] == ["-m", "lorasens", "train"]
    pairs = dict(zip(command[4::2], command[5::2]))
    assert pairs["--phase_strategy"] == "both->mlp->attn" and pairs["--target"] == "mlp" and pairs["--seed"] == "2"
    assert pairs["--experiment_name"] == runs[-1].name and "--overwrite" not in command
    static = train_command(runs[0], None, None, flags, rerun=True)
    assert dict(zip(static[4::2], static[5::2]))["--phase_strategy"] == "" and static[-2:] == ["--overwrite", "true"]


def test_static_points_drop_schedule_flags(tmp_path):
    flags = overrides(tmp_path) | {"max_steps": "30", "phase_ends": "10,20"}
    static, phased = plan_sweep(None, None, flags, ["static", "both->mlp->attn"], None, None)
    assert "--phase_ends" not in train_command(static, None, None, flags, rerun=False)
    command = train_command(phased, None, None, flags, rerun=False)
    assert command[command.index("--phase_ends") + 1] == "10,20"


def test_strategy_lists_keep_lisa_parameters():
    assert split_strategies("static,lisa:layers=2,interval=5,both->mlp->attn") == [
        "static", "lisa:layers=2,interval=5", "both->mlp->attn"]


def test_bad_sweep_flags(tmp_path):
    with pytest.raises(UserError, match="--seeds or --seed"):
        plan_sweep(None, None, overrides(tmp_path) | {"seed": "3"}, None, None, ["1", "2"])
    with pytest.raises(UserError, match="--experiment_name cannot be given"):
        plan_sweep(None, None, overrides(tmp_path) | {"experiment_name": "x"}, None, None, ["1"])
    with pytest.raises(UserError, match="bad layer range"):  # validated before any run starts
        plan_sweep(None, None, overrides(tmp_path), ["static", "attn@x-y"], None, None)
    with pytest.raises(UserError, match="--seeds must be integers"):
        plan_sweep(None, None, overrides(tmp_path), None, None, ["one"])
    assert main(["sweep", *TINY, "--output_dir", str(tmp_path), "--seeds", "1", "--jobs", "0"]) == 2


def _sweep_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "lorasens", "sweep", *TINY, "--output_dir", str(out), "--seeds", "1,2",
            "--sweep_name", "t", "--jobs", "1"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"sweep exited early ({proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "runs"
    first, second = out / "t_seed1", out / "t_seed2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_sweep_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # own process group: the kill reaches the train child too
    try:
        _wait_for(first / "summary.json", proc, 240)
        _wait_for(second / "config.json", proc, 240)  # the second run has started: kill the sweep mid-run
        os.kill(proc.pid, signal.SIGTERM)  # the sweep only; it must stop its running child itself
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # no process of the sweep's group is left (no orphaned train run)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (second / "summary.json").exists()  # interrupted: config.json but no summary.json
    summary_bytes = (first / "summary.json").read_bytes()
    summary_mtime = (first / "summary.json").stat().st_mtime_ns

    # The resume runs in this process (the kill above needed a real one; a new interpreter costs seconds).
    assert main(_sweep_command(out)[3:]) == 0
    assert (first / "summary.json").read_bytes() == summary_bytes
    assert (first / "summary.json").stat().st_mtime_ns == summary_mtime  # not rerun
    assert json.loads((second / "summary.json").read_text())["steps"] == 2
    manifest = json.loads((out / "t_sweep.json").read_text())
    assert {r["name"]: r["outcome"] for r in manifest["runs"]} == {"t_seed1": "skipped (complete)", "t_seed2": "done"}
    # The log is appended to: the killed run's command line first, then the rerun's, which replaces its folder.
    commands = [line for line in (out / "t_sweep_logs" / "t_seed2.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--overwrite true" not in commands[0] and "--overwrite true" in commands[1]
    rows = (out / "t_comparison" / "comparison.csv").read_text().splitlines()
    assert len(rows) == 2 and ",2,1 2," in rows[1]  # one configuration, two seeds
