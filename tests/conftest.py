"""Shared test setup: keep every test offline and quiet."""

from __future__ import annotations

import os
from pathlib import Path

# Hubs are unreachable; fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the demo CLIP, trained once per test session (about 2 minutes)."""
    from curate.demo.train_tiny import ensure_demo_model

    cache = tmp_path_factory.mktemp("curate-cache")
    ensure_demo_model(cache, log=lambda _: None)
    return cache
