"""curate: curate and debias image-text pretraining sets for CLIP-style models.

The commands are functions here too (`curate.api`): ``curate.score(shards, run, config)``,
``curate.select(run, subset_dir, spec)``, ... They are imported on first use, so ``import
curate`` stays cheap and imports no torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_ENTRY_POINTS = (
    "Runtime", "audit", "balance", "embed", "rebalance", "rewrite", "score", "select", "write",
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        from curate import api

        return getattr(api, name)
    raise AttributeError(f"module 'curate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_ENTRY_POINTS])
