"""Loading a split from the Hugging Face Hub with a clear error when the Hub cannot be reached."""

from __future__ import annotations

import datasets

from lorasens.errors import UserError


def load_hub_split(hub_id: str, split: str, config: str | None = None, revision: str | None = None):
    try:
        return datasets.load_dataset(hub_id, config, split=split, revision=revision)
    except Exception as exc:  # ConnectionError, DatasetNotFoundError, OfflineModeIsEnabled, ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot load {hub_id} ({split}) from the Hugging Face Hub: {first}; offline, pass --data_dir with the "
            "official files instead"
        ) from None


def load_hub_dataset(hub_id: str, config: str | None = None) -> dict:
    """Every split of a Hub dataset (or of a local dataset folder, which `load_dataset` reads the same way)."""
    try:
        return dict(datasets.load_dataset(hub_id, config))
    except Exception as exc:  # ConnectionError, DatasetNotFoundError, a bad config name, ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load hf:{hub_id}{':' + config if config else ''} with datasets.load_dataset: "
                        f"{first}") from None
