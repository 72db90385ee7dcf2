"""The scorers moved to `lorasens.metrics` (pure metric functions, below `data/`); this name stays only until
`validate.py`, which imports `ensure_meteor_ready` from here, is rewritten."""

from lorasens.metrics import ensure_meteor_ready  # noqa: F401
