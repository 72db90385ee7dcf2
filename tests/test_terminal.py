"""The terminal of the quickstart's CLI path when stderr is not a terminal: no library noise, no escape codes, and
a closing summary that states the answer whole."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_cli_terminal_is_quiet_and_summary_whole(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings shown unless lorasens filters them at the source
    result = subprocess.run(
        [sys.executable, "-m", "lorasens", "train", "--preset", "quickstart", "--model", "tiny-random-llama",
         "--max_steps", "4", "--train_samples", "16", "--eval_samples", "4", "--analysis_samples", "8",
         "--ablation_max_single", "2", "--max_new_tokens", "8", "--eval_steps", "2", "--max_length", "256",
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900)  # pipes: neither stdout nor stderr is a TTY
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "FutureWarning" not in err and "PTBLexer" not in err and "Untokenizable" not in err
    assert "\x1b" not in err and "\r" not in err  # no ANSI escapes, no redrawn progress bars
    assert "Failed to load CPU gemm_4bit_forward" not in err
    assert re.search(r"step 4/4, loss \d", err)  # plain progress lines instead
    out = result.stdout
    assert "None" not in out and not re.search(r"\d\.\d{6,}", out)  # numbers rounded for people
    line = next(x for x in out.splitlines() if x.strip().startswith("recommendation"))
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    recommendation = summary["recommendation"]
    assert recommendation["allocate"] == "ranks" and recommendation["min_rank"] == 0  # the default
    listed = ", ".join(f"{m} r{recommendation['ranks'][m]}" for m in recommendation["modules"])
    assert line.rstrip().endswith(listed)  # the whole list with each module's rank, not cut
    assert re.search(r"\d+% of them on attention .*\d+% on MLP", out) and "Top layers:" in out
