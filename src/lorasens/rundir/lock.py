"""One writer per run directory: a lock file held for the life of `train`, `--resume`, `eval`, `analyze`, `validate`.

The lock is `RUN_DIR/.lorasens.lock`, created exclusively (`O_CREAT | O_EXCL`, atomic on local file systems and
NFSv3+), holding the holder's pid, host, command and start time. It is removed when the holder leaves the `with`
block, whatever the exit (return, exception, Ctrl-C, SIGTERM turned into an exception). A process killed with -9
cannot remove it: a lock whose pid is no longer alive on this host is stale and is taken over (with a warning). A
lock from another host cannot be checked, so it is reported and the user decides.

Creating the lock is also the first write into the output folder, so a read-only or full disk fails here, before
the model is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lorasens.errors import UserError
from lorasens.rundir.files import LOCK_FILE
from lorasens.safeio import dumps

logger = logging.getLogger(__name__)

_held: set[Path] = set()  # run directories this process holds (re-entrant: `train` runs the evaluation itself)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written right now, or torn by a kill: treated as held, unless it stays unreadable


def _describe(holder: dict) -> str:
    command = f" ({holder['command']})" if holder.get("command") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{command}, since {since}"


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(dumps(record) + "\n")
    return True


def live_holder(run_dir: Path) -> str | None:
    """Who holds the run directory's lock, when a live process on this host does (else None)."""
    holder = _read(Path(run_dir) / LOCK_FILE) if (Path(run_dir) / LOCK_FILE).exists() else None
    if not holder or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    return _describe(holder) if _alive(holder["pid"]) else None


def acquire(run_dir: Path, command: str | None = None) -> Path:
    """Create the lock (and the run directory); `UserError` naming the holder when a live process holds it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": command or " ".join(["lorasens", *sys.argv[1:2]])}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if _try_create(path, record):
                return path
            holder = _read(path)
            if not holder:
                time.sleep(0.2)  # another process is writing its record right now
                holder = _read(path)
            stale = holder.get("host") == record["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])
            if holder and not stale:
                raise UserError(f"{run_dir} is in use by {_describe(holder)}; wait for it to finish, or delete "
                                f"{path} if that process is gone")
            logger.warning("%s: removing a stale lock (%s is no longer running)", run_dir, _describe(holder))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {run_dir}: {exc.strerror or exc} (a read-only or full disk?)") from None
    raise UserError(f"{run_dir}: could not take the run lock {path}; delete it if no lorasens process uses the run")


def release(path: Path) -> None:
    """Remove the lock if it is still ours (never one another process took over)."""
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path, create: bool = False, command: str | None = None) -> Iterator[None]:
    """Hold the run directory's lock for the `with` block (re-entrant within one process).

    `create`: make the directory (`train`); otherwise a directory that does not exist is not locked (the command's
    own check then says it is not a run). A directory this call created and left empty is removed again."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or (not create and not run_dir.is_dir()):
        yield
        return
    # The folders this call creates (the run directory, and --output_dir if it is new), innermost first.
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    path = acquire(run_dir, command)
    _held.add(run_dir)
    try:
        yield
    finally:
        _held.discard(run_dir)
        with contextlib.suppress(OSError):
            release(path)
            for folder in created:
                folder.rmdir()  # only when empty: a run that failed before writing anything leaves no folder
