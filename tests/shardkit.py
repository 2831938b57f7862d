"""Helpers that write tiny, real, deterministic shards for tests (plain functions, no fixtures)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def make_image(
    mode: str = "RGB", size: tuple[int, int] = (32, 32), seed: int = 0, *, transparent: bool = False
) -> Image.Image:
    """A seeded noisy gradient image in ``mode``; P images get a transparent index when asked."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(w + h, 1)],
        axis=-1,
    )
    noise = rng.integers(0, 40, size=(h, w, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGB":
        return img
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        out = img.convert("RGBA")
        out.putalpha(Image.fromarray(alpha))
        return out
    if mode == "P":
        pal = img.quantize(colors=16)
        if transparent:
            pal.info["transparency"] = 0
        return pal
    return img.convert(mode)


def make_image_bytes(
    kind: str = "jpg",
    mode: str = "RGB",
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
    *,
    transparent: bool = False,
) -> bytes:
    """Encoded image bytes (``kind`` in jpg/jpeg/png/webp, ``mode`` in RGB/L/CMYK/RGBA/P)."""
    img = make_image(mode, size, seed, transparent=transparent)
    buf = io.BytesIO()
    if kind == "png" and mode == "P" and transparent:
        img.save(buf, format="PNG", transparency=0)
    else:
        img.save(buf, format=_FORMATS[kind])
    return buf.getvalue()


def write_tar(path: str | os.PathLike[str], members: Sequence[tuple[str, bytes]]) -> str:
    """Write ``members`` (name, data) in order into a deterministic, uncompressed tar."""
    path = os.fspath(path)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return path


def sample_members(
    key: str,
    *,
    image: bytes | None = None,
    caption: str | bytes | None = "a photo",
    meta: dict[str, object] | None = None,
    image_ext: str = "jpg",
) -> list[tuple[str, bytes]]:
    """Members of one sample in img2dataset order (image, txt, json); None leaves a part out."""
    out: list[tuple[str, bytes]] = []
    if image is not None:
        out.append((f"{key}.{image_ext}", image))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode("utf-8") if isinstance(caption, str) else caption))
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    return out


def make_shard(
    path: str | os.PathLike[str],
    n: int,
    *,
    start_key: int = 0,
    shard_index: int = 0,
    caption_fn: Callable[[int], str] | None = None,
    with_json: bool = True,
    uid_fn: Callable[[int], str | None] | None = None,
    image_size: tuple[int, int] = (32, 32),
) -> list[str]:
    """Write a clean img2dataset-layout shard of ``n`` samples; returns the keys in order."""
    members: list[tuple[str, bytes]] = []
    keys: list[str] = []
    for i in range(start_key, start_key + n):
        key = f"{shard_index:05d}{i:04d}"
        caption = caption_fn(i) if caption_fn is not None else f"a photo of sample {i}"
        meta: dict[str, object] | None = None
        if with_json:
            meta = {
                "url": f"http://example.com/{key}.jpg",
                "caption": caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": image_size[0],
                "height": image_size[1],
            }
            uid = uid_fn(i) if uid_fn is not None else None
            if uid is not None:
                meta["uid"] = uid
        image = make_image_bytes("jpg", "RGB", image_size, seed=shard_index * 10_000 + i)
        members += sample_members(key, image=image, caption=caption, meta=meta)
        keys.append(key)
    write_tar(path, members)
    return keys


def write_sidecar(
    path: str | os.PathLike[str], keys: Sequence[str], statuses: Sequence[str] | str = "success"
) -> str:
    """Write an img2dataset-style sidecar parquet: one row per input row, failures included."""
    path = os.fspath(path)
    if isinstance(statuses, str):
        statuses = [statuses] * len(keys)
    if len(statuses) != len(keys):
        raise ValueError("keys and statuses differ in length")
    ok = [s == "success" for s in statuses]
    table = pa.table(
        {
            "url": [f"http://example.com/{k}.jpg" for k in keys],
            "caption": [f"caption {k}" for k in keys],
            "key": list(keys),
            "status": list(statuses),
            "error_message": [None if o else "download failed" for o in ok],
            "width": pa.array([32 if o else None for o in ok], type=pa.int64()),
            "height": pa.array([32 if o else None for o in ok], type=pa.int64()),
            "original_width": pa.array([64 if o else None for o in ok], type=pa.int64()),
            "original_height": pa.array([64 if o else None for o in ok], type=pa.int64()),
            "exif": pa.array([None] * len(keys), type=pa.string()),
            "sha256": pa.array([None] * len(keys), type=pa.string()),
        }
    )
    pq.write_table(table, path)
    return path
