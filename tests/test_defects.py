"""Bad input and faults that used to finish with exit 0 and something wrong, or with a traceback or a message that
points the wrong way: each case reproduced as a user meets it, with the fixed behaviour asserted (exit code, the
one line on stderr, the files on disk)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import alive, wait_for

from lorasens.cli import main

TINY = ["--model", "tiny-random-llama", "--r", "4", "--batch_size", "4", "--max_length", "128", "--evaluate", "false",
        "--ablation", "false"]


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def write_jsonl(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question {i}?", "completion": f"answer {i}"}) + "\n"
                            for i in range(start, start + n)))
    return path


# ---------------------------------------------------------------------------------------------- data files


def test_data_files_with_the_training_split_twice_is_refused_before_a_run_exists(tmp_path, capsys):
    a, b = write_jsonl(tmp_path / "A.jsonl", 40), write_jsonl(tmp_path / "B.jsonl", 40, start=40)
    code = main(["train", *TINY, "--dataset", "custom", "--data_files", f"train={a},train={b}",
                 "--output_dir", str(tmp_path / "runs"), "--experiment_name", "two", "--max_steps", "1"])
    assert code == 2
    assert "names train= twice" in last_line(capsys)
    assert not (tmp_path / "runs" / "two" / "config.json").exists()  # no config.json listing files never read


def test_config_file_bool_for_an_int_is_refused_like_the_flag(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lora:\n  r: true\n")
    args = ["--dataset", "synthetic", "--output_dir", str(tmp_path), "--experiment_name", "b", "--max_steps", "1"]
    assert main(["train", "--config", str(config), *args]) == 2
    assert last_line(capsys) == "error: r must be of type int, got True"
    assert main(["train", "--r", "true", *args]) == 2
    assert "r must be of type int" in last_line(capsys)
    assert not (tmp_path / "b").exists()


def read(path: Path):
    from lorasens.data.custom import read_table
    return read_table(path)


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt,completion\nwhat is 2+2?,4\nNA,yes\n".encode("utf-8"))
    assert read(path) == [{"prompt": "what is 2+2?", "completion": "4"}, {"prompt": "NA", "completion": "yes"}]


def test_header_only_csv_says_the_file_has_no_rows(tmp_path):
    from lorasens.errors import UserError
    path = tmp_path / "empty.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(UserError, match=r"empty\.csv: file has no rows"):
        read(path)


def test_malformed_jsonl_line_is_named_by_its_line_number(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", 30)
    with path.open("a") as fh:
        fh.write('{"prompt": "x", "completion": oops}\n')
    code = main(["train", *TINY, "--dataset", "custom", "--data_files", str(path), "--output_dir", str(tmp_path),
                 "--experiment_name", "bad", "--max_steps", "1"])
    assert code == 2
    line = last_line(capsys)
    assert "line 31 is not valid JSON" in line and "position" not in line


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_applies_a_changed_eval_interval(tmp_path):
    """Saved with --eval_steps 5, resumed with --eval_steps 3: evaluation runs every 3 steps, as config.json says."""
    common = [*TINY, "--dataset", "synthetic", "--train_samples", "48", "--eval_samples", "8", "--save_steps", "2",
              "--output_dir", str(tmp_path), "--experiment_name", "r"]
    assert main(["train", *common, "--max_steps", "2", "--eval_steps", "5"]) == 0
    assert main(["train", *common, "--max_steps", "7", "--eval_steps", "3", "--resume"]) == 0
    run = tmp_path / "r"
    steps = [json.loads(line)["step"] for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert 3 in steps and 6 in steps and 5 not in steps  # every 3, not every 5 as the checkpoint had
    assert json.loads((run / "config.json").read_text())["training"]["eval_steps"] == 3


# ---------------------------------------------------------------------------------------------- sweep


def spawn(*args: str):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-m", "lorasens", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


SWEEP = [*TINY, "--dataset", "synthetic", "--train_samples", "48", "--eval_samples", "8", "--eval_steps", "0",
         "--sweep_name", "sw"]


@pytest.mark.slow
def test_kill_9_of_a_sweep_stops_its_child_and_a_rerun_appends_to_the_log(tmp_path):
    import signal
    args = ["sweep", *SWEEP, "--max_steps", "400", "--seeds", "1", "--output_dir", str(tmp_path)]
    sweep = spawn(*args)
    lock = tmp_path / "sw_seed1" / ".lorasens.lock"
    wait_for(lambda: (tmp_path / "sw_seed1" / "train_log.jsonl").exists() and lock.exists(), timeout=300)
    child = json.loads(lock.read_text())["pid"]
    sweep.send_signal(signal.SIGKILL)
    sweep.communicate(timeout=60)
    wait_for(lambda: not alive(child), timeout=60)  # the child died with the sweep (it used to train on)
    # The rerun at once, in this process (its training child is a real process anyway); fewer steps keep it short.
    assert main([a if a != "400" else "3" for a in args]) == 0
    log = (tmp_path / "sw_sweep_logs" / "sw_seed1.log").read_bytes()
    assert b"\x00" not in log
    assert log.count(b"$ ") == 2  # the first run's output kept, the rerun's appended after it
    assert json.loads((tmp_path / "sw_sweep.json").read_text())["runs"][0]["outcome"] == "done"


@pytest.mark.slow
def test_sigterm_of_a_sweep_starts_nothing_more_and_says_how_to_continue(tmp_path):
    import signal
    sweep = spawn("sweep", *SWEEP, "--max_steps", "400", "--seeds", "1,2,3,4", "--output_dir", str(tmp_path))
    wait_for(lambda: (tmp_path / "sw_seed1" / "train_log.jsonl").exists(), timeout=300)
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143
    starts = [line for line in err.splitlines() if "sweep: start" in line]
    assert len(starts) == 1 and "sw_seed1" in starts[0]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM)") and "continue with: the same command (lorasens sweep" in last
    assert not (tmp_path / "sw_seed2").exists()


# ---------------------------------------------------------------------------------------------- small data


def test_default_analysis_split_scales_with_a_small_dataset(tmp_path, caplog):
    from lorasens.data.registry import training_splits
    from lorasens.config import DataConfig
    write_jsonl(tmp_path / "train.jsonl", 200)
    options = DataConfig(dataset="custom", data_dir=str(tmp_path))
    with caplog.at_level("INFO", logger="lorasens"):
        train, analysis = training_splits("custom", str(tmp_path), 0, None, None, options=options)
    assert len(analysis) == 20 and len(train) + len(analysis) <= 200 and train
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in analysis}
    assert "analysis split: 20 of the" in caplog.text


def test_identical_rows_name_the_cause_not_the_flag(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "same?", "completion": "same"}) + "\n" * 1 * 1
                                          + "".join(json.dumps({"prompt": "same?", "completion": "same"}) + "\n"
                                                    for _ in range(49)))
    code = main(["train", *TINY, "--dataset", "custom", "--data_dir", str(tmp_path), "--analysis_samples", "1",
                 "--output_dir", str(tmp_path / "runs"), "--experiment_name", "same", "--max_steps", "1"])
    assert code == 2
    line = last_line(capsys)
    assert "same prompt (one distinct row)" in line and "lower" not in line


def wikisql_200(tmp_path: Path) -> Path:
    """A WikiSQL folder in the official schema with a 200-question training file: rows of ../shared's dev set
    (CI=true fails rather than skips without it)."""
    from conftest import shared_path
    source = shared_path("data", "wikisql")
    rows = (source / "dev.jsonl").read_text().splitlines()
    folder = tmp_path / "wikisql"
    folder.mkdir()
    for name, part in (("train", rows[:200]), ("dev", rows[200:230]), ("test", rows[230:246])):
        (folder / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        shutil.copy(source / "dev.tables.jsonl", folder / f"{name}.tables.jsonl")
    return folder


@pytest.mark.slow
@pytest.mark.shared
def test_wikisql_with_200_training_questions_runs_with_default_analysis_settings(tmp_path, capsys):
    folder = wikisql_200(tmp_path)
    code = main(["train", "--model", "tiny-random-llama", "--r", "4", "--batch_size", "4", "--dataset", "wikisql",
                 "--data_dir", str(folder), "--max_steps", "2", "--eval_steps", "0", "--output_dir", str(tmp_path),
                 "--experiment_name", "w"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["train_data"]["examples"] == 180 and summary["steps"] == 2  # 20 of 200 held out for analysis
    assert "analysis split: 20 of the 200 training examples" in err
    assert (tmp_path / "w" / "recommended_lora_config.json").is_file()


# ---------------------------------------------------------------------------------------------- messages, writes


def read_only(monkeypatch, target: Path) -> None:
    """Writes under `target` fail as on a read-only disk (the tests run as root, where chmod does not stop writes)."""
    import errno
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if str(self).startswith(str(target.parent)) and target.name in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_read_only_score_output_names_the_scores_own_flag(tmp_path, capsys, monkeypatch):
    rows = [{"id": "1", "prompt": "p", "prediction": "yes", "references": ["yes"]}]
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "ro" / "metrics.json"
    out.parent.mkdir()
    read_only(monkeypatch, out)
    assert main(["score", "custom", str(path), "--metrics", "exact_match", "--output", str(out)]) == 2
    line = last_line(capsys)
    assert line.startswith("error: Read-only file system writing ") and "--output file" in line
    assert "--output_dir" not in line and "--resume" not in line
    assert not out.exists() and not any(out.parent.iterdir())  # no partial file, no temporary left behind


def make_analysed_run(tmp_path: Path) -> Path:
    """A run folder as `lorasens analyze` leaves it, small enough to build by hand."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"model": "tiny-random-llama"}}) + "\n")
    (run / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (run / "sensitivity.json").write_text('{"modules": ["L0.q_proj"], "measures": {"comb')  # killed mid-write
    return run


def test_corrupt_sensitivity_json_is_reported_corrupt_not_missing(tmp_path, capsys):
    run = make_analysed_run(tmp_path)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "sensitivity.json is corrupt" in page
    assert "sensitivity.json is missing (analysis not run)" not in page


def test_validate_budget_on_a_truncated_sensitivity_json_is_one_line(tmp_path, capsys):
    from lorasens.experiment.validation.driver import _sensitivity
    from lorasens.errors import UserError
    run = make_analysed_run(tmp_path)
    with pytest.raises(UserError, match=r"sensitivity\.json:1: the run's sensitivity is corrupt"):
        _sensitivity(run)


def test_report_html_is_written_atomically(tmp_path, monkeypatch):
    """A full disk while report.html is written leaves no 0-byte report.html (and no temporary file)."""
    import errno
    from lorasens import safeio
    run = make_analysed_run(tmp_path)
    original = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.endswith("report.html.tmp"):
            original(self, "")  # what a full disk leaves: the file created, nothing in it
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["report", str(run)]) == 2
    assert not (run / "report.html").exists() and not (run / ".report.html.tmp").exists()
    assert safeio.write_text_atomic is not None


@pytest.mark.slow
def test_disk_full_inside_torch_save_while_checkpointing_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """torch.save / safetensors report a full disk as RuntimeError("basic_ios::clear ...") or a SafetensorError,
    not an OSError: still exit 2 with one line, no traceback, and --resume continues from checkpoint-2."""
    from transformers import Trainer
    original = Trainer._save_rng_state

    def disk_full(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "rng_state.pth").write_bytes(b"")
            raise RuntimeError("basic_ios::clear: iostream error")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full)
    args = ["train", *TINY, "--dataset", "synthetic", "--train_samples", "48", "--eval_samples", "8", "--max_steps",
            "6", "--eval_steps", "0", "--save_steps", "2", "--output_dir", str(tmp_path), "--experiment_name", "full"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the disk is full or read-only (basic_ios::clear") and "--resume" in line
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    assert main([*args, "--resume"]) == 0
    assert "skipping incomplete checkpoint checkpoint-4" in capsys.readouterr().err


def test_report_on_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """Every plot failing to save used to log a traceback each before the exit-2 line."""
    import errno
    import matplotlib.figure
    run = make_analysed_run(tmp_path)

    def read_only_savefig(self, fname, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only_savefig)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: Read-only file system writing ")
