"""SIGTERM (what schedulers, `docker stop` and `kill` send) stops a command the way Ctrl-C does.

Python turns SIGINT into `KeyboardInterrupt`; by default SIGTERM kills the process on the spot (exit -15), with
buffered rows unwritten and no word on how to continue. `sigterm_as_interrupt()` makes SIGTERM raise `Interrupted`
(a `KeyboardInterrupt`) in the main thread instead, so the same cleanup runs for both: gradient CSV buffers are
flushed, the run lock is released, and the CLI exits 143 (SIGTERM) or 130 (SIGINT) with one line.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from lorasens.errors import Interrupted

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Interrupted(SIGTERM)` (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def describe(exc: KeyboardInterrupt) -> str:
    """The one line for an interruption: which signal, what is kept, how to continue (when known)."""
    name = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
    hint = getattr(exc, "message", "")
    return f"interrupted ({name}); files already written are kept" + (f"; {hint}" if hint else "")
