"""The one exception type for bad user input.

The CLI turns a `UserError` into a single line on stderr and exit code 2, without a traceback. Library code raises
it wherever the user can fix the problem (a bad flag value, a missing file); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input that the user can fix. The message must name the problem and the valid choices."""


def unknown_choice(kind: str, value: object, valid: Iterable[str]) -> UserError:
    """`UserError` for a name outside a closed vocabulary, listing the valid names (and the closest one)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid)}")
