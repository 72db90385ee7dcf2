"""Shared test fixtures: tiny models built in code, the ../shared data folder (skip when absent)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORASENS_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
STORIES260K = SHARED / "models" / "stories260K"
DDP_WORKER = REPO / "tests" / "ddp_worker.py"

# One thread: the tests use tiny models, where thread start-up costs more than it saves, and CI may share cores.
torch.set_num_threads(1)


def wait_for(predicate, timeout: float = 120.0) -> None:
    """Poll until predicate() holds (tests that drive real processes: a kill waits for a file, a death for a pid)."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def shared_path(*parts: str) -> Path:
    """A path inside ../shared; the test is skipped (not passed) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only beside the project on dev/CI machines)")
    return path


@pytest.fixture
def tiny_llama():
    from lorasens.model.loading import build_tiny_random_llama

    return build_tiny_random_llama(seed=0)


@pytest.fixture
def e2e_dir() -> Path:
    return shared_path("data", "e2e")


@pytest.fixture
def stories260k() -> Path:
    return shared_path("models", "stories260K")


def run_ddp(settings: dict, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`tests/ddp_worker.py SETTINGS` under torchrun on CPU (gloo): the one way the DDP tests launch processes.

    `--standalone` picks a free rendezvous port, so parallel test runs on one machine do not collide."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(DDP_WORKER), json.dumps(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# Fixtures that train a run first (seconds each, once per module or session): every test using one is `slow`, so
# `make test-fast` (-m "not slow") stays under a minute. `make test` runs them all.
TRAINED_RUN_FIXTURES = {"run_dir", "schedule_run", "accumulation_runs", "finished_run", "run_copy", "tiny_run",
                        "trained_cli_run"}


# Under CI=true a test that needs the official scorers (Java), the browser (Chromium), WordNet or ../shared must run:
# its skip is turned into a failure, so CI cannot be green with them unchecked (a failed Java or Chromium install only
# prints a line). Matched on the skip reason (the helpers above and the skipif reasons name what is missing) and on
# the `shared` marker.
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CI_REQUIRED_SKIPS = ("java", "chromium", "shared", "wordnet", "meteor")


def required_in_ci(item, reason: str) -> bool:
    return item.get_closest_marker("shared") is not None or any(w in reason.lower() for w in CI_REQUIRED_SKIPS)


def ci_requires(available: bool, what: str) -> bool:
    """`available`, for a test that otherwise checks less (e.g. BLEU/NIST only without Java): under CI=true a missing
    `what` fails the test instead."""
    if not available and CI:
        pytest.fail(f"CI=true: {what} is not available, so this test would check less than it should")
    return available


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if required_in_ci(item, reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: this test must run, not skip ({reason})"


# `make test` runs the files on two workers (pytest-xdist, --dist loadfile: a file's tests share one worker and its
# module fixtures). The longest files go first, so that neither worker is left finishing one of them alone.
LONGEST_FILES = ("test_validate.py", "test_reliability.py", "test_doc_commands.py", "test_defects.py", "test_cli.py",
                 "test_sweep.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


def pytest_collection_finish(session):
    """Every Trainer.train() starts with a full gc.collect (accelerate's free_memory); over the objects of the
    imported libraries and test modules that is ~0.3 s a training. Frozen once here, they are not scanned again."""
    gc.collect()
    gc.freeze()
