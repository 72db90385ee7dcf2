"""Shared test fixtures: tiny models built in code, the ../shared data folder (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORASENS_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
STORIES260K = SHARED / "models" / "stories260K"

# One thread: the tests use tiny models, where thread start-up costs more than it saves, and CI may share cores.
torch.set_num_threads(1)


def shared_path(*parts: str) -> Path:
    """A path inside ../shared; the test is skipped (not passed) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only beside the project on dev/CI machines)")
    return path


@pytest.fixture
def tiny_llama():
    from lorasens.models import build_tiny_random_llama

    return build_tiny_random_llama(seed=0)


@pytest.fixture
def e2e_dir() -> Path:
    return shared_path("data", "e2e")


@pytest.fixture
def stories260k() -> Path:
    return shared_path("models", "stories260K")
