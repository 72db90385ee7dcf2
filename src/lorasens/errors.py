"""The one exception type for bad user input.

The CLI turns a `UserError` into a single line on stderr and exit code 2, without a traceback. Library code raises
it wherever the user can fix the problem (a bad flag value, a missing file); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input that the user can fix. The message must name the problem and the valid choices."""


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss, the gradient norm or the weights became NaN/inf (exit code 3)."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM; `signum` gives the exit code 128 + signum (130 or 143)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.message = message


# How a full disk shows when the writer is not Python's own file I/O: safetensors' Rust error, torch.save's C++ stream.
DISK_FULL_TEXTS = ("No space left on device", "StorageFull", "code: 28,", "basic_ios::clear",
                   "PytorchStreamWriter failed writing", "Disk quota exceeded", "Read-only file system")


def is_disk_error(exc: BaseException) -> bool:
    """An error the user fixes by freeing space or choosing a writable folder (reported as exit 2): an OSError with
    one of those errnos, or a safetensors / torch.save error whose text says the disk was full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
    return isinstance(exc, Exception) and any(t in str(exc) for t in DISK_FULL_TEXTS)


def unknown_choice(kind: str, value: object, valid: Iterable[str]) -> UserError:
    """`UserError` for a name outside a closed vocabulary, listing the valid names (and the closest one)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid)}")
