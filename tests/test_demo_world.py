"""The offline demo world: synthetic shards with recorded noise, and the tiny demo CLIP."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.demo import train_tiny
from curate.demo.synthetic import (
    BACKGROUNDS,
    GENERIC_CAPTIONS,
    SHAPES,
    DemoDataset,
    generate_shards,
    noise_counts,
    sample_pairs,
)

N = 130
PER_SHARD = 50
FRACTIONS = {"mismatch": 0.15, "generic": 0.10, "corrupt": 0.05}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    out = tmp_path_factory.mktemp("world")
    return generate_shards(out, num_samples=N, samples_per_shard=PER_SHARD, seed=7, **FRACTIONS)


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _labels(ds: DemoDataset) -> list[dict]:
    return pq.read_table(ds.labels).to_pylist()


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _shape_and_colour(caption: str) -> tuple[str, str]:
    """The shape word of a template caption and the colour word right before it."""
    words = caption.replace(",", " ").replace(":", " ").split()
    i = next(k for k, w in enumerate(words) if w in SHAPES)
    return words[i], words[i - 1]


def test_layout(world: DemoDataset) -> None:
    names = sorted(p.name for p in world.out_dir.iterdir())
    assert names == [
        "00000.parquet", "00000.tar", "00000_stats.json",
        "00001.parquet", "00001.tar", "00001_stats.json",
        "00002.parquet", "00002.tar", "00002_stats.json",
        "labels.parquet",
    ]  # fmt: skip
    assert [p.name for p in world.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    total = 0
    for shard_id, shard in enumerate(world.shards):
        members = _tar_members(shard)
        keys = list(dict.fromkeys(name.split(".")[0] for name in members))
        expected_n = min(PER_SHARD, N - shard_id * PER_SHARD)
        assert keys == [f"{shard_id:05d}{i:04d}" for i in range(expected_n)]
        assert list(members) == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
        sidecar = pq.read_table(shard.with_suffix(".parquet")).to_pylist()
        assert [r["key"] for r in sidecar] == keys
        assert set(sidecar[0]) == {
            "url", "caption", "key", "status", "error_message", "width", "height",
            "original_width", "original_height", "exif", "sha256",
        }  # fmt: skip
        for row in sidecar:
            meta = json.loads(members[f"{row['key']}.json"])
            assert "uid" not in meta
            assert meta == row
            assert meta["status"] == "success"
            assert meta["url"] == f"http://synthetic.invalid/{row['key']}.jpg"
            assert members[f"{row['key']}.txt"].decode("utf-8") == row["caption"]
            image = members[f"{row['key']}.jpg"]
            assert hashlib.sha256(image).hexdigest() == row["sha256"]
        stats = json.loads((world.out_dir / f"{shard_id:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == expected_n
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        total += expected_n
    assert total == N == world.num_samples


def test_deterministic_bytes(world: DemoDataset, tmp_path: Path) -> None:
    again = generate_shards(
        tmp_path / "same", num_samples=N, samples_per_shard=PER_SHARD, seed=7, **FRACTIONS
    )
    other = generate_shards(
        tmp_path / "other", num_samples=N, samples_per_shard=PER_SHARD, seed=8, **FRACTIONS
    )
    for path in sorted(world.out_dir.iterdir()):
        assert (again.out_dir / path.name).read_bytes() == path.read_bytes(), path.name
    for shard in world.shards:
        assert (other.out_dir / shard.name).read_bytes() != shard.read_bytes()
    assert again.counts == world.counts


def test_noise_counts_exact(world: DemoDataset) -> None:
    # Documented rounding: floor(fraction * n + 0.5), i.e. round half up.
    expected = {k: math.floor(f * N + 0.5) for k, f in FRACTIONS.items()}
    expected["clean"] = N - sum(expected.values())
    assert world.counts == expected == {"mismatch": 20, "generic": 13, "corrupt": 7, "clean": 90}
    kinds = [row["noise"] for row in _labels(world)]
    assert {k: kinds.count(k) for k in expected} == expected
    # 2.5 -> 3 and 0.5 -> 1 (half up, unlike Python's banker's round()).
    assert noise_counts(10, mismatch=0.25, generic=0.05, corrupt=0.0) == {
        "clean": 6, "mismatch": 3, "generic": 1, "corrupt": 0,
    }  # fmt: skip
    with pytest.raises(ValueError):
        noise_counts(10, mismatch=0.6, generic=0.5, corrupt=0.0)


def test_corrupt_images_do_not_decode(world: DemoDataset) -> None:
    members: dict[str, bytes] = {}
    for shard in world.shards:
        members.update(_tar_members(shard))
    for row in _labels(world):
        data = members[f"{row['key']}.jpg"]
        if row["noise"] == "corrupt":
            with pytest.raises(OSError):  # UnidentifiedImageError is an OSError too
                _decode(data)
        else:
            assert _decode(data).size == (64, 64)


def test_labels_match_captions(world: DemoDataset) -> None:
    members: dict[str, bytes] = {}
    for shard in world.shards:
        members.update(_tar_members(shard))
    for row in _labels(world):
        caption = members[f"{row['key']}.txt"].decode("utf-8")
        assert caption == row["caption"]
        assert row["shard"] == f"{row['key'][:5]}.tar"
        assert row["description"].count(row["shape"]) == 1
        if row["noise"] == "generic":
            assert caption in GENERIC_CAPTIONS
        elif row["noise"] == "mismatch":
            assert _shape_and_colour(caption) != (row["shape"], row["color"])
        else:
            assert _shape_and_colour(caption) == (row["shape"], row["color"])


def test_clean_image_shows_its_colour(world: DemoDataset) -> None:
    # The described colour is the most common non-background colour in the image.
    members: dict[str, bytes] = {}
    for shard in world.shards:
        members.update(_tar_members(shard))
    for row in _labels(world)[:20]:
        if row["noise"] == "corrupt":
            continue
        pixels = np.asarray(_decode(members[f"{row['key']}.jpg"]), dtype=float).reshape(-1, 3)
        names = list(BACKGROUNDS)
        palette = np.array(list(BACKGROUNDS.values()), dtype=float)
        nearest = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(1)
        counts = np.bincount(nearest, minlength=len(palette))
        counts[names.index(row["background"])] = 0
        assert names[counts.argmax()] == row["color"]


def test_sample_pairs() -> None:
    images, captions = sample_pairs(200, image_size=48, seed=3, generic_fraction=0.2)
    assert len(images) == len(captions) == 200
    assert all(im.size == (48, 48) and im.mode == "RGB" for im in images)
    n_generic = sum(c in GENERIC_CAPTIONS for c in captions)
    assert 20 <= n_generic <= 60
    images2, captions2 = sample_pairs(200, image_size=48, seed=3, generic_fraction=0.2)
    assert captions2 == captions
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, images2, strict=True))
    assert sample_pairs(5, seed=4)[1] != sample_pairs(5, seed=3)[1]


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> train_tiny.TrainReport:
    out = tmp_path_factory.mktemp("smoke") / "demo.safetensors"
    return train_tiny.train_demo_clip(
        out, steps=2, batch_size=8, seed=0, log=lambda _: None, eval_samples=32
    )


def test_training_smoke(smoke_checkpoint: train_tiny.TrainReport) -> None:
    report = smoke_checkpoint
    assert report.path.exists()
    sidecar = json.loads(train_tiny.sidecar_path(report.path).read_text())
    assert sidecar["config"] == "curate-demo"
    assert sidecar["recipe"] == train_tiny.RECIPE_VERSION
    assert sidecar["steps"] == 2 and sidecar["seed"] == 0
    assert set(sidecar["zero_shot"]) == {"shape", "color"}
    assert math.isfinite(sidecar["final_loss"]) and sidecar["train_seconds"] > 0
    model, preprocess, tokenizer = train_tiny.load_demo_model(report.path)
    scores = train_tiny.clip_scores(model, preprocess, tokenizer, *sample_pairs(4, seed=1))
    assert scores.shape == (4,) and np.all(np.abs(scores) <= 1.0 + 1e-5)


def test_ensure_demo_model_trains_once_and_is_deterministic(
    smoke_checkpoint: train_tiny.TrainReport,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real_train = train_tiny.train_demo_clip

    def short_train(out_path: Path, **kwargs: object) -> train_tiny.TrainReport:
        calls.append(out_path)
        return real_train(
            out_path, steps=2, batch_size=8, seed=0, log=lambda _: None, eval_samples=32
        )

    monkeypatch.setattr(train_tiny, "train_demo_clip", short_train)
    path = train_tiny.ensure_demo_model(tmp_path, log=lambda _: None)
    assert path == tmp_path / "demo-model" / train_tiny.RECIPE_VERSION / "curate-demo.safetensors"
    assert train_tiny.sidecar_path(path).exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".json"]
    assert train_tiny.ensure_demo_model(tmp_path, log=lambda _: None) == path
    assert len(calls) == 1
    # Same seed and recipe: byte-identical weights.
    assert path.read_bytes() == smoke_checkpoint.path.read_bytes()


@pytest.mark.slow
def test_full_training_separates_noise(demo_cache: Path, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    path = train_tiny.ensure_demo_model(demo_cache, log=lambda _: None)
    sidecar = json.loads(train_tiny.sidecar_path(path).read_text())
    assert sidecar["zero_shot"]["color"] > 0.6  # chance 1/8
    assert sidecar["zero_shot"]["shape"] > 0.2  # chance 1/5; shapes are learnt slowly

    ds = generate_shards(tmp_path / "eval", num_samples=600, seed=123, corrupt=0.0)
    members: dict[str, bytes] = {}
    for shard in ds.shards:
        members.update(_tar_members(shard))
    rows = [r for r in _labels(ds) if r["noise"] in ("clean", "mismatch", "generic")]
    images = [_decode(members[f"{r['key']}.jpg"]) for r in rows]
    model, preprocess, tokenizer = train_tiny.load_demo_model(path)
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1
        )
        txt = torch.nn.functional.normalize(
            model.encode_text(tokenizer([r["caption"] for r in rows])), dim=-1
        )
    scores = (img * txt).sum(-1).numpy()
    kinds = np.array([r["noise"] for r in rows])
    clean = scores[kinds == "clean"]
    for noise in ("mismatch", "generic"):
        noisy = scores[kinds == noise]
        y = np.r_[np.ones(len(clean)), np.zeros(len(noisy))]
        auroc = roc_auc_score(y, np.r_[clean, noisy])
        assert auroc > 0.8, (noise, auroc)
