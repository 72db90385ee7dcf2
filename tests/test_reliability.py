"""Issue 12: nothing lost, nothing mixed, no traceback — locks, divergence, resume edge cases, broken files, signals.

Each test reproduces one failure of the issue and asserts the exit code, the one-line message and that the files
written before are intact. Real processes (subprocess) for the concurrency, signal and kill cases.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_for
from safetensors.torch import load_file

from lorasens.cli import main
from lorasens.rundir.files import LOCK_FILE
from lorasens.rundir.lock import hold_run_lock

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-random-llama", "--r", "4", "--batch_size", "4", "--max_length", "192",
        "--evaluate", "false", "--ablation", "false", "--dataset", "synthetic"]


def train(tmp_path: Path, name: str, *extra: str) -> int:
    return main(["train", *FAST, "--output_dir", str(tmp_path), "--experiment_name", name, *extra])


def message(err: str) -> str:
    """The last line of stderr, from the message on (the progress bar may share the line: it ends without one)."""
    line = err.strip().splitlines()[-1] if err.strip() else ""
    for start in ("error: ", "interrupted ("):
        if start in line:
            return line[line.index(start):]
    return line


def last_line(capsys) -> str:
    return message(capsys.readouterr().err)


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (what other tools' strict parsers do)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def same_adapter(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def spawn_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "lorasens", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, **kwargs)


def lines(path: Path) -> list[dict]:
    return [strict_json(line) for line in path.read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------------------------------
# 1. One writer per run directory


@pytest.fixture
def live_holder(tmp_path):
    """A live process (not this one) recorded as the holder of a run lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(run_dir: Path, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": time.time(),
                                                 "command": "lorasens train"}))


@pytest.mark.parametrize("command", ["train", "resume", "eval", "analyze"])
def test_run_held_by_a_live_process_is_refused_naming_the_holder(tmp_path, live_holder, capsys, command):
    run = tmp_path / "x"
    write_lock(run, live_holder)
    (run / "config.json").write_text("{}")
    args = {"train": ["train", *FAST, "--output_dir", str(tmp_path), "--experiment_name", "x", "--overwrite"],
            "resume": ["train", *FAST, "--output_dir", str(tmp_path), "--experiment_name", "x", "--resume"],
            "eval": ["eval", str(run)], "analyze": ["analyze", str(run)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"is in use by pid {live_holder} on {socket.gethostname()} (lorasens train)" in err
    assert (run / LOCK_FILE).exists() and (run / "config.json").read_text() == "{}"  # nothing touched


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "x"
    write_lock(run, dead.pid)
    # eval takes the lock over (warning), then finds no run there; the lock is gone afterwards either way.
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "removing a stale lock" in err and f"pid {dead.pid}" in err
    assert "is not a lorasens run directory" in err.strip().splitlines()[-1]
    assert not (run / LOCK_FILE).exists()


def test_hold_run_lock_is_released_on_any_exit_and_reentrant(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(RuntimeError):
        with hold_run_lock(run, create=True):
            lock = json.loads((run / LOCK_FILE).read_text())
            assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
            with hold_run_lock(run):  # the same process again: no deadlock
                pass
            assert (run / LOCK_FILE).exists()
            raise RuntimeError("boom")
    assert not run.exists()  # created by the lock, left empty: removed
    (run / "keep").parent.mkdir()
    (run / "keep").write_text("k")
    with hold_run_lock(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["keep"]


def test_unwritable_output_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import lorasens.experiment.run
    import lorasens.rundir.lock

    def read_only(path, record):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(lorasens.rundir.lock, "_try_create", read_only)
    monkeypatch.setattr(lorasens.experiment.run, "load_model",
                        lambda *a, **k: pytest.fail("model loaded before the write check"))
    assert train(tmp_path, "ro", "--max_steps", "2") == 2
    line = last_line(capsys)
    assert line.startswith("error: cannot write to") and "Read-only file system" in line


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder(tmp_path):
    """The issue's case: the second run exits 2 naming the first, which finishes with clean, unmixed logs."""
    common = ["train", *FAST, "--max_steps", "30", "--eval_steps", "0", "--output_dir", str(tmp_path),
              "--experiment_name", "x"]
    first = spawn_cli(*common, "--seed", "1")
    wait_for(lambda: (tmp_path / "x" / LOCK_FILE).exists())
    second = spawn_cli(*common, "--seed", "2")
    _, err2 = second.communicate(timeout=300)
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 2 and f"is in use by pid {first.pid}" in message(err2)
    run = tmp_path / "x"
    assert [r["step"] for r in lines(run / "train_log.jsonl")] == list(range(1, 31))
    assert json.loads((run / "config.json").read_text())["training"]["seed"] == 1
    assert not (run / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. Divergence (NaN/inf)


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lora_alpha", "nan"),
                                         ("--lora_dropout", "nan"), ("--importance_ema", "-inf"),
                                         ("--budget", "nan")])
def test_non_finite_numbers_are_bad_input(flag, value, capsys):
    assert main(["train", f"{flag}={value}"]) == 2
    assert last_line(capsys) == f"error: {flag[2:]} must be a finite number, got {value!r}"


@pytest.mark.slow
def test_diverged_training_stops_with_exit_3_and_keeps_the_good_files(tmp_path, capsys):
    code = train(tmp_path, "nan", "--lr", "1e30", "--max_grad_norm", "0", "--max_steps", "6", "--eval_steps", "1",
                 "--save_steps", "1", "--eval_samples", "8")
    line = last_line(capsys)
    assert code == 3, line
    assert line.startswith("error: training diverged at step 2: loss is nan")
    run = tmp_path / "nan"
    log = lines(run / "train_log.jsonl")  # standard JSON: the NaN loss is null
    assert [r["step"] for r in log] == [1, 2] and log[0]["loss"] > 0 and log[1]["loss"] is None
    evals = lines(run / "eval_log.jsonl")
    assert [e["step"] for e in evals] == [1]  # no evaluation of the diverged weights
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1"]  # the last good one
    ckpt = adapter(run / "checkpoints" / "checkpoint-1")
    assert all(torch.isfinite(t).all() for t in ckpt.values())
    for name in ("final_model", "summary.json", "sensitivity.json", "recommended_lora_config.json", "report.html"):
        assert not (run / name).exists(), name
    # The diverged step's gradient cells say nan, never empty (= frozen); step 1 holds numbers.
    rows = (run / "gradient_analysis.module_norms.csv").read_text().splitlines()[1:]
    step2 = [r.rsplit(",", 1)[1] for r in rows if r.startswith("2,")]
    assert step2 and set(step2) == {"nan"}
    assert all(float(r.rsplit(",", 1)[1]) >= 0 for r in rows if r.startswith("1,"))
    assert not (run / LOCK_FILE).exists()


def test_json_outputs_are_standard_json(tmp_path):
    from lorasens.safeio import dumps, read_json, write_json

    value = {"a": float("nan"), "b": [float("inf"), 1.5], "c": torch.tensor(float("-inf")), "d": None}
    write_json(tmp_path / "x.json", value)
    assert strict_json((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": None, "d": None}
    assert read_json(tmp_path / "x.json") == {"a": None, "b": [None, 1.5], "c": None, "d": None}
    assert dumps(float("nan")) == "null"


def test_best_adapter_ignores_a_non_finite_validation_loss():
    from lorasens.training.trainer import BestAdapterCallback

    best = BestAdapterCallback(lambda: {"w": torch.ones(1)})
    state = type("S", (), {"global_step": 1})()
    best.on_evaluate(None, state, None, metrics={"eval_loss": float("nan")})
    assert best.best_loss is None and best.best_state is None
    state.global_step = 2
    best.on_evaluate(None, state, None, metrics={"eval_loss": 3.0})
    assert best.best_loss == 3.0 and best.best_step == 2


# ---------------------------------------------------------------------------------------------------------------
# 3, 4, 6. Resume: nothing left to train, incomplete checkpoints, a full disk


@pytest.mark.slow
def test_resume_with_nothing_left_to_train_redoes_only_the_end(tmp_path, capsys):
    assert train(tmp_path, "done", "--max_steps", "4", "--eval_steps", "0", "--save_steps", "2") == 0
    run = tmp_path / "done"
    final = adapter(run / "final_model")
    log = (run / "train_log.jsonl").read_text()
    # Killed during the analysis/report: no summary, no recommendation, no report.
    for name in ("summary.json", "sensitivity.json", "recommended_lora_config.json", "report.html"):
        (run / name).unlink()
    capsys.readouterr()
    assert train(tmp_path, "done", "--max_steps", "2", "--eval_steps", "0", "--save_steps", "2", "--resume") == 2
    assert "--max_steps 2 is below the checkpoint's step (checkpoint-4)" in last_line(capsys)
    assert train(tmp_path, "done", "--max_steps", "4", "--eval_steps", "0", "--save_steps", "2", "--resume") == 0
    err = capsys.readouterr().err
    assert "nothing left to train" in err
    assert (run / "train_log.jsonl").read_text() == log  # no step 5
    assert same_adapter(adapter(run / "final_model"), final)
    summary = strict_json((run / "summary.json").read_text())
    assert summary["steps"] == 4 and "resumed after training had finished" in summary["final_model_from"]
    for name in ("sensitivity.json", "recommended_lora_config.json", "report.html"):
        assert (run / name).exists(), name


@pytest.mark.slow
def test_disk_full_while_checkpointing_then_resume_skips_the_incomplete_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of writing checkpoint-4: exit 2, one line; --resume uses checkpoint-2, says it skipped
    checkpoint-4, and ends with the same adapter as an uninterrupted run."""
    from transformers import Trainer

    assert train(tmp_path, "ref", "--max_steps", "6", "--eval_steps", "0", "--save_steps", "2", "--lr_scheduler",
                 "constant") == 0
    original = Trainer._save_rng_state

    def disk_full(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "rng_state.pth").write_bytes(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir, "rng_state.pth")))
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full)
    capsys.readouterr()
    args = ("--max_steps", "6", "--eval_steps", "0", "--save_steps", "2", "--lr_scheduler", "constant")
    assert train(tmp_path, "full", *args) == 2
    line = last_line(capsys)
    assert line.startswith("error: No space left on device writing ") and "--resume" in line
    run = tmp_path / "full"
    assert not (run / "final_model").exists() and not (run / LOCK_FILE).exists()
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    assert train(tmp_path, "full", *args, "--resume") == 0
    assert "skipping incomplete checkpoint checkpoint-4 (missing trainer_state.json)" in capsys.readouterr().err
    assert same_adapter(adapter(run / "final_model"), adapter(tmp_path / "ref" / "final_model"))
    assert [r["step"] for r in lines(run / "train_log.jsonl")] == list(range(1, 7))


@pytest.mark.slow
def test_kill_9_leaves_a_stale_lock_and_a_torn_checkpoint_then_resume_works(tmp_path, capsys):
    """kill -9 (no cleanup): the next --resume takes the dead process's lock over, skips the newest checkpoint
    (torn as a kill while writing it would leave it) and finishes from the one before."""
    proc = spawn_cli("train", *FAST, "--max_steps", "500", "--eval_steps", "0", "--save_steps", "2",
                     "--output_dir", str(tmp_path), "--experiment_name", "k")
    run = tmp_path / "k"
    wait_for(lambda: (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists(), timeout=300)
    proc.kill()
    proc.communicate(timeout=60)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the kill
    newest = max((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    state = newest / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    # The resume in this process (the kill needed a real one; a second interpreter costs seconds of imports).
    capsys.readouterr()
    code = train(tmp_path, "k", "--max_steps", str(int(newest.name.split("-")[1]) + 1), "--eval_steps", "0",
                 "--save_steps", "2", "--resume")
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert f"removing a stale lock (pid {proc.pid}" in err
    assert f"skipping incomplete checkpoint {newest.name} (trainer state is corrupt" in err
    steps = [r["step"] for r in lines(run / "train_log.jsonl")]
    assert steps == list(range(1, int(newest.name.split("-")[1]) + 2))
    assert (run / "final_model" / "adapter_model.safetensors").exists() and not (run / LOCK_FILE).exists()


def test_checkpoint_validation(tmp_path):
    from safetensors.torch import save_file

    from lorasens.training.trainer import checkpoint_problem, latest_checkpoint

    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        ckpt = folder / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save_file({"w": torch.ones(3)}, ckpt / "adapter_model.safetensors")
        for name in ("adapter_config.json",):
            (ckpt / name).write_text("{}")
        for name in ("optimizer.pt", "scheduler.pt"):
            (ckpt / name).write_bytes(b"x")
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    (folder / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    data = (folder / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    (folder / "checkpoint-4" / "adapter_model.safetensors").write_bytes(data[:-4])  # truncated
    assert "corrupt" in checkpoint_problem(folder / "checkpoint-6")
    assert "truncated or unreadable" in checkpoint_problem(folder / "checkpoint-4")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


# ---------------------------------------------------------------------------------------------------------------
# 5. Malformed files


E2E_BAD = {
    "non-UTF-8": (b"mr,ref\nname[a],ok\nname[\xff],bad\n", "devset.csv:3: not UTF-8 text (byte 0xff)"),
    "short row": (b"mr,ref\nname[a],ok\nonlyone\n", "devset.csv:3: wrong number of comma-separated fields (1; the header has 2)"),
    "unbalanced quote": (b'mr,ref\nname[a],ok\n"name[b],x\nname[c],y\n', "devset.csv:3: malformed comma-separated row (unexpected end of data"),
}


@pytest.mark.parametrize("case", list(E2E_BAD))
def test_malformed_e2e_csv_names_file_and_line(tmp_path, case):
    from lorasens.data.e2e import load
    from lorasens.errors import UserError

    data, message = E2E_BAD[case]
    (tmp_path / "devset.csv").write_bytes(data)
    with pytest.raises(UserError, match=None) as info:
        load("test", tmp_path, 0)  # without testset_w_refs.csv, devset.csv is the test split
    assert message in str(info.value)


def test_e2e_bom_long_fields_and_empty_rows(tmp_path, caplog):
    from lorasens.data.e2e import load

    long_ref = "x" * 200_000  # over the csv module's default 131,072-character field limit
    text = f"\ufeffmr,ref\nname[a],first\nname[b],{long_ref}\n,no mr\nname[c],\nname[d],last\n"
    (tmp_path / "devset.csv").write_text(text, encoding="utf-8")
    examples = load("test", tmp_path, 0)
    assert [e.meta["mr"] for e in examples] == ["name[a]", "name[b]", "name[d]"]
    assert examples[1].target == long_ref
    assert "dropped 2 of 5 row(s) with an empty mr or ref" in caplog.text


@pytest.mark.parametrize("name, data, message", [
    ("train.jsonl", b'{"dialogue": "a", "summary": "b"}\n{"dialogue": "\xe9t\xe9", "summary": "b"}\n', "train.jsonl:2: not UTF-8 text"),
    ("train.jsonl", b'{"dialogue": "a", "summary": "b"}\n{"dialogue": "a"\n', "train.jsonl:2: not valid JSON"),
])
def test_malformed_samsum_file(tmp_path, name, data, message):
    from lorasens.data.files import read_records
    from lorasens.errors import UserError

    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError) as info:
        read_records(tmp_path / name, ("dialogue", "summary"))
    assert message in str(info.value)


def test_malformed_mnli_tsv(tmp_path):
    from lorasens.data.mnli import read_file
    from lorasens.errors import UserError

    (tmp_path / "train.tsv").write_bytes(b"sentence1\tsentence2\tgold_label\na\tb\tentailment\nc\xffd\te\tneutral\n")
    with pytest.raises(UserError, match=r"train.tsv:3: not UTF-8 text"):
        read_file(tmp_path / "train.tsv", "train")


def test_torn_last_line_of_train_log_is_dropped_on_resume(tmp_path, caplog):
    from lorasens.training.trainer import JsonlWriter

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    JsonlWriter(log).truncate_after(2)
    assert lines(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert "dropped a torn last line" in caplog.text
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # a bad line in the middle is not a kill
    from lorasens.errors import UserError

    with pytest.raises(UserError, match="train_log.jsonl:2: corrupt line"):
        JsonlWriter(log).truncate_after(3)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run (config, logs, gradient CSVs, final_model, summary), without the evaluation, analysis
    and report steps, which these tests do not need."""
    from lorasens.config import build_config
    from lorasens.experiment.run import run_experiment

    out = tmp_path_factory.mktemp("runs")
    flags = dict(zip(FAST[::2], FAST[1::2]))
    cfg = build_config(None, None, {**{k[2:]: v for k, v in flags.items()}, "max_steps": "2", "eval_steps": "0",
                                    "eval_samples": "8", "output_dir": str(out), "experiment_name": "done"})
    run_experiment(cfg, after_training=())
    return out / "done"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.mark.parametrize("command", ["eval", "analyze"])
@pytest.mark.parametrize("damage, message", [
    ("config", "config.json:{line}: the run's config is corrupt"),  # cut in the middle: {line} = where
    ("adapter missing", "final_model: missing adapter_model.safetensors"),
    ("adapter truncated", "final_model: adapter_model.safetensors is truncated or unreadable"),
])
@pytest.mark.slow
def test_damaged_run_files_are_one_line(run_copy, capsys, command, damage, message):
    if damage == "config":
        text = (run_copy / "config.json").read_text()
        (run_copy / "config.json").write_text(text[: len(text) // 2])
        # The JSON error points at the line after the cut (the cut line holds an unterminated key or value).
        message = message.format(line=text[: len(text) // 2].count("\n") + 1)
    elif damage == "adapter missing":
        (run_copy / "final_model" / "adapter_model.safetensors").unlink()
    else:
        path = run_copy / "final_model" / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    assert main([command, str(run_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (run_copy / LOCK_FILE).exists()


@pytest.mark.slow
def test_non_numeric_gradient_cell_and_no_gradient_csvs(run_copy, capsys):
    path = run_copy / "gradient_analysis.module_norms.csv"
    rows = path.read_text().splitlines()
    rows[3] = rows[3].rsplit(",", 1)[0] + ",abc"
    path.write_text("\n".join(rows) + "\n")
    assert main(["analyze", str(run_copy)]) == 2
    assert last_line(capsys).endswith("gradient_analysis.module_norms.csv:4: grad_norm is not a number ('abc'); the file is corrupt")
    for name in ("gradient_analysis.module_norms.csv", "importance.csv"):
        (run_copy / name).unlink()
    assert main(["analyze", str(run_copy)]) == 0
    assert "has no gradient CSVs" in capsys.readouterr().err


@pytest.mark.slow
def test_corrupt_summary_is_called_corrupt_by_compare_and_report(run_copy, tmp_path):
    from lorasens.experiment.compare import load_run_record
    from lorasens.presentation.report import write_report

    (run_copy / "summary.json").write_text('{"steps": 2, "fin')
    assert "summary.json is corrupt" in load_run_record(run_copy).missing
    assert "summary.json is corrupt" in write_report(run_copy, redraw=False).missing


@pytest.mark.parametrize("table, message", [
    ("[1, 2]", "table must be an object"),
    ('{"header": "a", "rows": []}', "table.header must be a non-empty list"),
    ('{"header": ["a"], "rows": [["1"], ["2", "3"]]}', "table.rows[1] must be a list of 1 cells"),
    ('{"header": ["a", "b"], "types": ["text"], "rows": []}', "table.types must be a list with one type per column"),
])
def test_score_wikisql_malformed_table(tmp_path, capsys, table, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "1", "prompt": "q", "prediction": "SELECT a FROM table", '
                    f'"references": ["SELECT a FROM table"], "table": {table}}}\n')
    assert main(["score", "wikisql", str(path)]) == 2
    assert last_line(capsys) == f"error: {path}:1: {message}" + last_line_tail(message)


def last_line_tail(message: str) -> str:
    return {"table must be an object": " {id, header, types, rows}, got list",
            "table.header must be a non-empty list": " of column names",
            "table.rows[1] must be a list of 1 cells": " (one per column)",
            "table.types must be a list with one type per column": " (2)"}[message]


def test_score_wikisql_repeated_columns_and_huge_table(tmp_path, capsys, monkeypatch):
    import lorasens.evaluation.predictions as predictions

    monkeypatch.setattr(predictions, "MAX_TABLE_ROWS", 1000)
    rows = [{"id": "1", "prompt": "q", "prediction": "SELECT a FROM table WHERE b = x",
             "references": ["SELECT a FROM table WHERE b = x"],
             "table": {"header": ["a", "a", "b"], "types": ["text"] * 3, "rows": [["1", "2", "x"]]}},
            {"id": "2", "prompt": "q2", "prediction": "SELECT a FROM table WHERE b = y",
             "references": ["SELECT a FROM table WHERE b = y"],
             "table": {"header": ["a", "b"], "types": ["text"] * 2, "rows": [[str(i), "y"] for i in range(2500)]}}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "wikisql", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}:2: table has 2500 rows; execution uses the first 1000" in err
    assert json.loads(out)["num_rows"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 7. Signals


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_like_ctrl_c_and_flushes_gradient_rows(tmp_path, sig, code):
    proc = spawn_cli("train", *FAST, "--max_steps", "500", "--eval_steps", "0", "--save_steps", "0",
                     "--output_dir", str(tmp_path), "--experiment_name", "s")
    log = tmp_path / "s" / "train_log.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, timeout=300)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert message(err) == (
        f"interrupted ({sig.name}); files already written are kept; no checkpoint was written (--save_steps 0); "
        "start again with --overwrite")
    steps = [r["step"] for r in lines(log)]
    module_rows = (tmp_path / "s" / "gradient_analysis.module_norms.csv").read_text().splitlines()[1:]
    assert module_rows and {int(r.split(",")[0]) for r in module_rows} >= set(steps[:3])  # buffered rows flushed
    assert not (tmp_path / "s" / LOCK_FILE).exists()


@pytest.mark.slow
def test_sigterm_with_checkpoints_says_how_to_resume(tmp_path):
    proc = spawn_cli("train", *FAST, "--max_steps", "500", "--eval_steps", "0", "--save_steps", "2",
                     "--output_dir", str(tmp_path), "--experiment_name", "s")
    wait_for(lambda: (tmp_path / "s" / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists(), timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert message(err).endswith(
        f"continue with: lorasens train --config {tmp_path / 's' / 'config.json'} --resume")


@pytest.mark.slow
def test_interrupted_sweep_starts_no_new_run_and_says_interrupted(tmp_path):
    proc = spawn_cli("sweep", *FAST, "--max_steps", "500", "--eval_steps", "0", "--seeds", "1,2",
                     "--output_dir", str(tmp_path), "--sweep_name", "sw")
    manifest = tmp_path / "sw_sweep.json"
    wait_for(lambda: any(p.name.endswith("train_log.jsonl") for p in tmp_path.rglob("train_log.jsonl")), timeout=300)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    runs = json.loads(manifest.read_text())["runs"]
    assert [r["outcome"] for r in runs] == ["interrupted", None]
    assert not Path(runs[1]["run_dir"]).exists()  # the second run never started


# ---------------------------------------------------------------------------------------------------------------
# 8. Paths


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "..", "a/b"])
def test_run_name_is_one_folder(name, tmp_path, capsys):
    assert main(["train", "--output_dir", str(tmp_path / "out"), "--experiment_name", name]) == 2
    assert "--experiment_name must be one folder name" in last_line(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_moved_run_folder_can_be_resumed(tmp_path):
    assert train(tmp_path / "a", "r", "--max_steps", "2", "--eval_steps", "0", "--save_steps", "2") == 0
    shutil.move(tmp_path / "a" / "r", tmp_path / "b")  # moved and renamed
    code = main(["train", *FAST, "--max_steps", "4", "--eval_steps", "0", "--save_steps", "2", "--resume",
                 "--output_dir", str(tmp_path), "--experiment_name", "b"])
    assert code == 0
    assert [r["step"] for r in lines(tmp_path / "b" / "train_log.jsonl")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["output"]["experiment_name"] == "b"


# ---------------------------------------------------------------------------------------------------------------
# 9. Smaller


@pytest.mark.parametrize("text, suffix, message", [
    ("training: 5\n", ".yaml", "section 'training' of config file"),
    ("training:\n  lr: 1e-3\n  lr: 2e-3\n", ".yaml", "duplicate key 'lr' (line 3)"),
    ('{"training": {"lr": 1, "lr": 2}}', ".json", "duplicate key(s) 'lr'"),
    ("training:\n  lr: .nan\n", ".yaml", "lr must be a finite number"),
])
def test_bad_config_files(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    line = last_line(capsys)
    assert message in line, line
    if "section" in message:
        assert line.endswith("must be a mapping of settings (e.g. training: {...}), got 5")


@pytest.mark.slow
def test_comparison_md_escapes_html_from_configs(run_copy, tmp_path):
    from lorasens.experiment.compare import compare_runs

    config = json.loads((run_copy / "config.json").read_text())
    config["schedule"]["phase_strategy"] = "<img src=x onerror=alert(1)>"
    (run_copy / "config.json").write_text(json.dumps(config))
    out = compare_runs([run_copy], tmp_path / "cmp").out_dir
    markdown = (out / "comparison.md").read_text()
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown
