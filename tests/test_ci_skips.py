"""Under CI=true a skipped official-scorer (Java), browser (Chromium), WordNet or ../shared test is a failure, so a
failed install cannot leave CI green with those checks unrun; without CI such tests skip as before."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = '''
import pytest
from conftest import ci_requires, shared_path

@pytest.mark.skipif(True, reason="chromium not installed (run `make chromium`)")
def test_browser(): pass

@pytest.mark.skipif(True, reason="Java not found: METEOR 1.5 and the PTB tokenizer")
def test_official(): pass

def test_shared(): shared_path("no-such-folder")

def test_degrades_to_bleu_only(): assert ci_requires(False, "Java (official METEOR)") is False

def test_unrelated_skip(): pytest.skip("wandb is installed here")
'''


def run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["LORASENS_SHARED"] = str(tmp_path / "absent")
    return subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def outcomes(out: str) -> dict[str, str]:
    """{test: outcome} from `pytest -v` lines "test_probe.py::test_browser ERROR" (a setup skip turned failure is
    an ERROR; the worst outcome of a test wins)."""
    found: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("test_probe.py::test_") and " " in line:
            name, word = line.split("::test_")[1].split()[:2]
            key = name.split("_")[0] if name.split("_")[0] != "degrades" else "degrades"
            if found.get(key) not in ("FAILED", "ERROR"):
                found[key] = word
    return found


@pytest.mark.slow
def test_ci_turns_required_skips_into_failures(tmp_path):
    done = run_probe(tmp_path, "true")
    assert done.returncode == 1, done.stdout[-3000:]
    got = outcomes(done.stdout)
    assert got["browser"] in ("FAILED", "ERROR") and got["official"] in ("FAILED", "ERROR")
    assert got["shared"] == "FAILED" and got["degrades"] == "FAILED"
    assert got["unrelated"] == "SKIPPED"
    assert "CI=true: this test must run, not skip" in done.stdout


@pytest.mark.slow
def test_without_ci_the_same_tests_skip(tmp_path):
    done = run_probe(tmp_path, None)
    assert done.returncode == 0, done.stdout[-3000:]
    got = outcomes(done.stdout)
    assert got == {"browser": "SKIPPED", "official": "SKIPPED", "shared": "SKIPPED", "degrades": "PASSED",
                   "unrelated": "SKIPPED"}
