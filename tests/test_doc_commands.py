"""Every command in the fenced shell blocks of README.md and docs/GUIDE.md, read from the files when the tests are
collected (a command added to the docs is tested without touching this file):

- shell-safe: pasted into bash as written it runs one command (an unquoted `early->late` is a redirect to a file
  named `late`);
- accepted: the command line parses, and a `train` / `sweep` builds and checks its config(s) the way the command
  does, so a doc cannot promise what the tool refuses;
- executed (slow): in a scratch project folder beside ../shared, with a cheap form where the command would train
  long (the tiny model, a few steps; the overrides are listed in CHEAP); commands that read a run (report,
  compare, analyze, eval) get one made by the documented quickstart command in its cheap form.

A command with a placeholder (`...`, an UPPER_CASE name, `hf:org/name`, files the docs do not create) is checked
for shell safety and parsing only, and says why it is not executed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED

DOCS = (REPO / "README.md", REPO / "docs" / "GUIDE.md")
SHELL_FENCES = ("bash", "sh", "shell", "console")
OPERATORS = set("();<>|&")
# The cheap form of a training command: appended (argparse keeps the last value of a flag).
CHEAP = ["--model", "tiny-random-llama", "--r", "4", "--batch_size", "2", "--max_length", "192", "--max_steps", "4",
         "--eval_steps", "0", "--save_steps", "0", "--train_samples", "16", "--eval_samples", "4",
         "--analysis_samples", "4", "--evaluate", "false", "--ablation", "false", "--max_new_tokens", "4"]
LAUNCHERS = ("torchrun", "accelerate")  # multi-process launches: the lorasens arguments are checked and run in one
# process (the launch itself is tested in test_ddp.py)
LOCAL_DATA = {"e2e": "../shared/data/e2e", "wikisql": "../shared/data/wikisql"}


def doc_commands() -> list[tuple[str, str]]:
    """(id, command) for every command line of every shell block (continuations joined, comments dropped)."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            fence, body = block
            if fence not in SHELL_FENCES:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+", " ", line.split(" #")[0]).strip()
                if command and not command.startswith("#"):
                    found.append((f"{doc.name}:{len(found)}:{command[:60]}", command))
    return found


COMMANDS = doc_commands()


def tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def placeholder(argv: list[str]) -> str | None:
    for arg in argv:
        if arg == "..." or re.search(r"\b[A-Z][A-Z_]{3,}\b", arg) or arg.startswith("hf:org/"):
            return f"placeholder {arg!r}"
    return None


def lorasens_argv(argv: list[str]) -> list[str] | None:
    """The `lorasens` arguments of a documented command line (None for make and helper scripts)."""
    head = Path(argv[0]).name
    if head == "lorasens":
        return argv[1:]
    if head in LAUNCHERS and "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["lorasens"]:
        return argv[argv.index("-m") + 2:]
    if head.startswith("python") and len(argv) > 1 and argv[1].endswith("run_experiment.py"):
        return ["train", *argv[2:]]
    return None


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 10
    assert any("lorasens train" in c for _, c in COMMANDS) and any("sweep" in c for _, c in COMMANDS)


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_doc_command_is_shell_safe(command):
    bad = [t for t in tokens(command) if t and set(t) <= OPERATORS]
    assert not bad, f"bash would read {bad} as shell operators (quote the argument): {command}"


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_doc_command_is_accepted(command, capsys):
    argv = shlex.split(command)
    if Path(argv[0]).name == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert all(t in targets for t in argv[1:]), f"no make target {argv[1:]}"
        return
    args = lorasens_argv(argv)
    if args is None:  # a helper script (checked that it exists), or another tool (pip): shell safety only
        script = next((a for a in argv[1:] if a.endswith(".py")), None)
        assert script is None or (REPO / script).is_file(), script
        return
    # "..." stands for the reader's own value: a model (the tiny one here), or further flags (dropped)
    args = ["tiny-random-llama" if a == "..." and i and args[i - 1] == "--model" else a for i, a in enumerate(args)]
    args = [a for a in args if a != "..."]
    from lorasens.cli import build_parser
    from lorasens.config import build_config, config_overrides
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"the CLI refuses the documented command ({exc.code}): {capsys.readouterr().err.strip()}")
    if parsed.command == "train":
        build_config(parsed.preset, parsed.config, config_overrides(parsed))
    elif parsed.command == "sweep":
        from lorasens.experiment.sweep import plan_sweep, split_list, split_strategies
        plan_sweep(parsed.preset, parsed.config, config_overrides(parsed), split_strategies(parsed.strategies),
                   split_list(parsed.targets, "targets"), split_list(parsed.seeds, "seeds"), parsed.sweep_name)


# ---------------------------------------------------------------------------------------------- executed


# validate's cheap form: one control arm, one rate, one seed beside the recommendation, a few steps and prompts
CHEAP_VALIDATE = ["--arms", "qv", "--seeds", "1", "--extra_seeds", "2:recommended", "--lr_grid", "1e-3",
                  "--max_steps", "5", "--sweep_steps", "5", "--random_sets", "1", "--test_samples", "4",
                  "--generate", "false"]


def cheap(args: list[str]) -> list[str]:
    """The cheap form of a training or sweep command: the tiny model, a few steps, local data for Hub datasets."""
    if args[0] == "validate":
        return [*args, *CHEAP_VALIDATE]
    if args[0] not in ("train", "sweep"):
        return args
    extra = list(CHEAP)
    dataset = args[args.index("--dataset") + 1] if "--dataset" in args else None
    if dataset is None and "--preset" not in args and "--config" not in args:
        from lorasens.config import DataConfig
        dataset = DataConfig().dataset  # the default: with a --model given, lorasens does not pick the quickstart
    if dataset in LOCAL_DATA and "--data_dir" not in args:
        extra += ["--data_dir", LOCAL_DATA[dataset]]
    if "--preset" in args and "--dataset" not in args:
        from lorasens.presets import get_preset
        preset = get_preset(args[args.index("--preset") + 1])
        if preset.get("dataset") in LOCAL_DATA and "data_dir" not in preset:
            extra += ["--data_dir", LOCAL_DATA[preset["dataset"]]]
    if args[0] == "sweep":  # the sweep sets --save_steps itself (its runs must resume)
        at = extra.index("--save_steps")
        extra = [*extra[:at], *extra[at + 2:], "--seeds", "1"]
    elif "--resume" not in args:
        extra.append("--overwrite")  # the scratch folder's run copies (runs/wikisql_both, ...) share their names
    return [*args, *extra]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch project folder beside ../shared, with runs/quickstart (and the other run names the docs read)
    made by the documented `lorasens train --preset quickstart` in its cheap form."""
    root = tmp_path_factory.mktemp("docs")
    (root / "shared").symlink_to(SHARED.resolve()) if SHARED.exists() else None
    work = root / "project"
    work.mkdir()
    assert run(work, ["train", "--preset", "quickstart", "--experiment_name", "quickstart"]).returncode == 0  # make demo
    for name in ("a", "b", "a_seed1", "a_seed2", "b_seed1", "probe", "wikisql_both"):
        shutil.copytree(work / "runs" / "quickstart", work / "runs" / name)
    return work


def run(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The command's cheap form through `lorasens.cli.main` in this process (as the entry point calls it), in `cwd`:
    a new interpreter per command would cost seconds of imports each (test_cli covers the real entry point)."""
    from lorasens.cli import main

    previous, err = Path.cwd(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(cheap(args))
            except SystemExit as exc:  # argparse's own exits
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def needs_shared(args: list[str]) -> bool:
    return any("../shared" in a for a in cheap(args))


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_doc_command_runs(command, project):
    argv = shlex.split(command)
    if Path(argv[0]).name == "make":
        pytest.skip("make targets run in CI itself (make test) and set up .venv")
    why = placeholder(argv)
    if why:
        pytest.skip(f"not executable as written: {why} (checked for shell safety and parsing)")
    args = lorasens_argv(argv)
    if args is None and not any(a.endswith(".py") for a in argv):
        pytest.skip(f"{argv[0]}: not a lorasens command or script (checked for shell safety)")
    if args is None:  # a helper script, run as written
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        done = subprocess.run([sys.executable, str(REPO / argv[script]), *argv[script + 1:]], cwd=project,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return
    if needs_shared(args):
        from conftest import shared_path
        shared_path("data")
    if any(flag in args for flag in ("--fsdp", "--deepspeed")):
        pytest.skip("a sharded multi-GPU launch (refused on a CPU-only machine; benchmarks/gpu_check_large.sh runs it)")
    missing = [a for a in args if a.endswith((".jsonl", ".csv", ".parquet")) and not (project / a).exists()
               and "=" not in a]
    missing += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--data_dir" and "shared" not in args[i + 1]
                and not (project / args[i + 1]).exists()]
    if missing:
        pytest.skip(f"reads {missing[0]}, a file the docs do not create (checked for shell safety and parsing)")
    done = run(project, args)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
