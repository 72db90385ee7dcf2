"""End-to-end CLI runs on the tiny model, and every bad input of the foundation issue (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasens.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-random-llama", "--r", "4", "--batch_size", "4", "--max_length", "192",
        "--evaluate", "false", "--ablation", "false"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads cost more than they give
    return subprocess.run([sys.executable, str(REPO / "run_experiment.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env=env)


def run_entry_point_in_process(*args: str, monkeypatch) -> int:
    """`python run_experiment.py ARGS`, run in this process (a new interpreter costs seconds of imports)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(REPO / "run_experiment.py"), *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "run_experiment.py"), run_name="__main__")
    return exited.value.code


@pytest.mark.slow
def test_acceptance_command_on_real_e2e_writes_every_file(e2e_dir, tmp_path, monkeypatch):
    """The issue's command (plus the output folder, and 24 examples instead of 200 for validation, evaluation and
    the analysis: this test checks the files, not the scores): files written and the adapter loads."""
    code = run_entry_point_in_process(
        "--dataset", "e2e", "--data_dir", str(e2e_dir), "--model", "tiny-random-llama", "--target", "both", "--r",
        "4", "--batch_size", "4", "--max_steps", "10", "--output_dir", str(tmp_path), "--experiment_name", "a",
        "--eval_samples", "24", "--analysis_samples", "24", monkeypatch=monkeypatch)
    assert code == 0
    run = tmp_path / "a"
    for name in ("config.json", "train_log.jsonl", "training_loss.png", "final_model/adapter_model.safetensors",
                 "final_model/adapter_config.json", "summary.json"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["lora"]["r"] == 4 and config["data"]["data_dir"] == str(e2e_dir)
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 11))
    assert all(s["phase"] == "both" and s["tokens"] > 0 and s["grad_norm"] > 0 for s in steps)
    assert (run / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from peft import PeftModel

    from lorasens.model.loading import build_tiny_random_llama

    base = build_tiny_random_llama(seed=42).model
    model = PeftModel.from_pretrained(base, run / "final_model")
    saved = load_file(run / "final_model" / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(loaded) == 28  # 4 layers x 7 modules
    some = next(k for k in saved if "lora_B" in k)
    assert torch.count_nonzero(saved[some]) > 0  # B moved away from its zero init


def _train(tmp_path: Path, name: str, *extra: str) -> Path:
    code = main(["train", *FAST, "--dataset", "synthetic", "--max_steps", "4", "--eval_steps", "2",
                 "--output_dir", str(tmp_path), "--experiment_name", name, *extra])
    assert code == 0
    return tmp_path / name


@pytest.fixture(scope="module")
def trained_cli_run(tmp_path_factory) -> Path:
    """One `_train` run with the default seed, shared by the tests that only read it (or copy it)."""
    return _train(tmp_path_factory.mktemp("cli"), "x")


@pytest.mark.slow
def test_same_seed_gives_identical_losses_and_adapter(trained_cli_run, tmp_path):
    # The shared run (default seed 42) is the first of the pair: one training fewer, the same checks.
    a, b = trained_cli_run, _train(tmp_path, "b", "--seed", "42")
    losses = [[json.loads(line)["loss"] for line in (r / "train_log.jsonl").read_text().splitlines()] for r in (a, b)]
    assert losses[0] == losses[1]
    wa = load_file(a / "final_model" / "adapter_model.safetensors")
    wb = load_file(b / "final_model" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = _train(tmp_path, "c", "--seed", "4")
    wc = load_file(c / "final_model" / "adapter_model.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.slow
def test_best_adapter_by_validation_loss_is_the_final_model(trained_cli_run):
    run = trained_cli_run
    summary = json.loads((run / "summary.json").read_text())
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["final_model_from"] == f"best validation loss (step {best['step']})"
    assert summary["best_eval_loss"] == pytest.approx(best["eval_loss"])


@pytest.mark.slow
def test_existing_run_is_refused_then_overwritten_only_when_asked(trained_cli_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "x"
    shutil.copytree(trained_cli_run, run)
    marker = (run / "summary.json").read_text()
    capsys.readouterr()
    code = main(["train", *FAST, "--dataset", "synthetic", "--max_steps", "2", "--output_dir", str(tmp_path),
                 "--experiment_name", "x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already holds a run; pass --overwrite" in err and len(err.splitlines()) == 1
    assert (run / "summary.json").read_text() == marker  # untouched
    # A bad flag value with --overwrite must not delete the old run either.
    code = main(["train", *FAST, "--dataset", "synthetic", "--max_steps", "2", "--output_dir", str(tmp_path),
                 "--experiment_name", "x", "--overwrite", "--data_dir", str(tmp_path / "missing")])
    assert code == 2 and (run / "summary.json").read_text() == marker


def test_folder_that_is_not_a_run_is_never_deleted(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep")
    code = main(["train", *FAST, "--dataset", "synthetic", "--max_steps", "2", "--output_dir", str(tmp_path),
                 "--experiment_name", "x", "--overwrite"])
    assert code == 2 and "not a lorasens run directory" in capsys.readouterr().err
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--model", "nope"], "unknown model alias 'nope'"),
        (["--model", "/no/such/dir"], "model path '/no/such/dir' does not exist"),
        (["--target", "ffn"], "unknown target 'ffn'"),
        (["--lr_rate", "1"], "unknown flag --lr_rate"),
        (["--r", "0"], "--r must be > 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--max_steps", "-1"], "--max_steps must be > 0"),
        (["--batch_size", "0"], "--batch_size must be > 0"),
        (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_data_dir_missing_or_incomplete(tmp_path, capsys):
    assert main(["train", *FAST, "--dataset", "e2e", "--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "e2e").mkdir()
    assert main(["train", *FAST, "--dataset", "e2e", "--data_dir", str(tmp_path / "e2e"), "--output_dir", str(tmp_path)]) == 2
    assert "lacks trainset.csv" in capsys.readouterr().err
    (tmp_path / "e2e" / "trainset.csv").write_text("meaning,text\na,b\n")
    (tmp_path / "e2e" / "devset.csv").write_text("mr,ref\na,b\n")
    assert main(["train", *FAST, "--dataset", "e2e", "--data_dir", str(tmp_path / "e2e"), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "trainset.csv:1: missing column(s) mr, ref" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e2e_both").exists()  # nothing written for a run that never started


@pytest.mark.slow
def test_bad_input_through_the_real_entry_point_has_no_traceback():
    result = run_cli("--target", "ffn")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown target 'ffn'; valid: attn, both, mlp"]


def test_original_commands_parse_and_validate():
    from lorasens.config import build_config

    cfg = build_config("e2e_attention")
    assert (cfg.model.model, cfg.data.dataset, cfg.lora.target) == ("tinyllama", "e2e", "attn")
    from lorasens.cli import build_parser
    from lorasens.config import config_overrides

    args = build_parser().parse_args(["train", "--dataset", "wikisql", "--target", "both", "--r", "8", "--batch_size",
                                      "32", "--max_steps", "1000", "--lr", "2e-4"])
    cfg = build_config(args.preset, args.config, config_overrides(args))
    assert (cfg.data.dataset, cfg.lora.r, cfg.training.batch_size, cfg.training.lr) == ("wikisql", 8, 32, 2e-4)


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out]
    assert names[0] == "quickstart" and "e2e_attention" in names and "mnli_both" in names and len(names) == 13


def test_no_validation_example_fits_is_one_line(tmp_path, capsys):
    data = tmp_path / "e2e"
    data.mkdir()
    (data / "trainset.csv").write_text("mr,ref\nname[A],A is nice.\nname[B],B is nice.\n")
    (data / "devset.csv").write_text("mr,ref\nname[C]," + "very long reference " * 20 + "\n")
    (data / "testset_w_refs.csv").write_text("mr,ref\nname[D],D is nice.\n")  # with test references, dev validates
    # One training example goes to the analysis split (by default 200 are held out of train for the ablation).
    code = main(["train", *FAST, "--max_length", "64", "--dataset", "e2e", "--data_dir", str(data),
                 "--analysis_samples", "1", "--output_dir", str(tmp_path), "--experiment_name", "v"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (
        "error: no validation example fits --max_length 64; raise it, or use --eval_steps 0 --ablation false")
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_missing_wordnet_fails_before_training_without_java(tmp_path, monkeypatch, capsys):
    # Without Java, METEOR falls back to nltk's (meteor_nltk), which needs WordNet.
    from lorasens.metrics import coco

    monkeypatch.setattr(coco, "java_available", lambda: False)
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "no_wordnet"))
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_wordnet")])
    code = main(["train", "--model", "tiny-random-llama", "--dataset", "synthetic", "--max_steps", "2",
                 "--max_length", "192", "--output_dir", str(tmp_path), "--experiment_name", "w"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "METEOR needs WordNet" in err[-1]
    assert not (tmp_path / "w").exists()


def test_cli_names_checked_before_heavy_imports(capsys):
    import subprocess
    import sys

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "lorasens", *argv], capture_output=True, text=True)

    typo = run("trian")
    assert typo.returncode == 2 and "did you mean train?" in typo.stderr
    assert run("train", "--max_step", "3").returncode == 2  # no argparse abbreviation
    preset = run("train", "--preset", "quickstrat")
    assert preset.returncode == 2 and "did you mean 'quickstart'?" in preset.stderr
    # rejected before torch/transformers are imported (they cost seconds)
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom lorasens.cli import main\n"
                            "code = main(['train', '--preset', 'quickstrat'])\n"
                            "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.split() == ["2", "False", "False"]
    from lorasens import __version__

    assert run("--version").stdout.strip() == f"lorasens {__version__}"
    assert main(["presets"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("quickstart")


def test_train_without_model_or_data_runs_the_offline_quickstart(monkeypatch, capsys):
    import lorasens.experiment.run

    seen = {}

    class Result:
        summary = None

    def fake_run(cfg):
        seen["cfg"] = cfg
        return Result()

    monkeypatch.setattr(lorasens.experiment.run, "run_experiment", fake_run)
    assert main(["train", "--max_steps", "3"]) == 0
    assert (seen["cfg"].model.model, seen["cfg"].data.dataset, seen["cfg"].training.max_steps) == (
        "smollm2-135m", "synthetic", 3)
    assert "offline quickstart" in capsys.readouterr().out
    assert main(["train", "--model", "tiny-random-llama", "--max_steps", "3"]) == 0
    assert seen["cfg"].model.model == "tiny-random-llama"  # a named model keeps the usual defaults
