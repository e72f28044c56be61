"""Shared fixtures: a tiny random model with the real tokenizer, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# $GRAIT_SHARED_DATA lets a copy of the data stand in (e.g. on a GPU machine without ../shared).
SHARED_DATA = Path(
    os.environ.get("GRAIT_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data folder missing: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grait.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
