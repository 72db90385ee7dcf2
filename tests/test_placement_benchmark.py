"""benchmarks/placement/run.py: stopping the benchmark stops the training it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import REPO, alive, wait_for

RUN_PY = REPO / "benchmarks" / "placement" / "run.py"
# A parent that runs one long step through run.py's run_child; the step prints its pid, then waits.
PARENT = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("placement_run", {str(RUN_PY)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.run_child([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"])
"""


def test_sigterm_to_the_benchmark_stops_its_running_step_and_exits_with_the_signal_code():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        wait_for(lambda: not alive(child), timeout=10)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
        parent.kill()
