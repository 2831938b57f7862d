"""The README's main job: `curate demo` separates injected noise, and AUROC is right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clikit import run_cli
from sklearn.metrics import roc_auc_score

from curate.demo.evaluate import auroc


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 6, size=40).astype(float)  # small integer range: many ties
    noisy = rng.integers(0, 5, size=25).astype(float)
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(25)], np.r_[clean, noisy])
    assert auroc(clean, noisy) == pytest.approx(want, abs=1e-12)


def test_auroc_extremes() -> None:
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert np.isnan(auroc(np.array([]), np.array([1.0])))


@pytest.mark.slow
def test_demo_separates_injected_noise(
    demo_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CURATE_CACHE", str(demo_cache))
    code, out, _ = run_cli(
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--samples",
            "600",
            "--samples-per-shard",
            "200",
            "--json",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0
    result = json.loads(out)
    score = result["score"]
    assert score["read"] == 600 and score["scored"] + score["failed"] == 600
    assert result["failed_by_kind"]["corrupt"] == result["counts"]["corrupt"] == 12
    assert score["failed"] == 12
    for metric in ("clipscore", "negclip"):
        assert result["auroc"][metric]["mismatch"] > 0.9, result["auroc"]
        assert result["auroc"][metric]["generic"] > 0.9, result["auroc"]
