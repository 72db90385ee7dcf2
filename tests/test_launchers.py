"""Every `lorasens train` flag passes through torchrun's and accelerate's own argument parsers untouched.

Both launchers classify every command-line argument with argparse's prefix matching, the script's arguments too,
so a script flag that is an ambiguous prefix of launcher flags (`--r`: --rdzv-*, --role, --run_path, --redirects)
kills the launch before the script starts. The parsers are the launchers' own (imported, nothing launched); one
real 2-process torchrun launch sets the rank with `--lora_r`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser
from torch.distributed.run import get_args_parser

from lorasens.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
# Kept for single-process use; under launchers its spelling is --lora_r (GUIDE, "Multi-GPU").
LAUNCHER_AMBIGUOUS = {"--r"}


def train_flags() -> list[str]:
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return sorted({o for a in train._actions for o in a.option_strings if o.startswith("--")} - {"--help"})


def script_args(launcher: str, args: list[str]) -> list[str]:
    if launcher == "torchrun":
        ns = get_args_parser().parse_args(["--standalone", "--nproc_per_node", "2", "-m", "lorasens", "train", *args])
    else:
        ns = launch_command_parser().parse_args(["--num_processes", "2", "-m", "lorasens", "train", *args])
    return ns.training_script_args


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_every_train_flag_passes_through_the_launcher(launcher):
    flags = train_flags()
    assert "--lora_r" in flags and len(flags) > 40
    for flag in sorted(set(flags) - LAUNCHER_AMBIGUOUS):
        got = script_args(launcher, [flag, "4"])
        assert got[-2:] == [flag, "4"], (launcher, flag, got)


def test_bare_r_is_what_torchrun_rejects():
    with pytest.raises(SystemExit):
        script_args("torchrun", ["--r", "4"])


def test_lora_r_sets_the_rank():
    args = build_parser().parse_args(["train", "--lora_r", "4"])
    assert args.r == "4"


@pytest.mark.slow
def test_torchrun_two_processes_with_lora_r(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorasens",
               "train", "--model", "tiny-random-llama", "--dataset", "synthetic", "--max_steps", "2", "--batch_size",
               "1", "--train_samples", "8", "--eval_samples", "4", "--eval_steps", "0", "--max_length", "256",
               "--evaluate", "false", "--ablation", "false", "--lora_r", "4", "--output_dir", str(tmp_path),
               "--experiment_name", "launched"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "launched" / "config.json").read_text())
    assert config["lora"]["r"] == 4
    adapter = json.loads((tmp_path / "launched" / "final_model" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
