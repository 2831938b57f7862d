"""Synthetic image-caption data: procedural shapes with informative captions.

Two consumers share the same drawing and captioning code:

* :func:`generate_shards` writes WebDataset shards in img2dataset layout (tar + parquet
  sidecar + stats json) with a recorded fraction of injected noise, for the demo and tests;
* :func:`sample_pairs` yields in-memory (image, caption) pairs for training the demo CLIP.

Noise counts are exact: ``count(kind) = floor(fraction * num_samples + 0.5)`` (round half up),
so the recorded labels, not a random draw, decide how many noisy samples there are.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from curate.io.sidecar import IMG2DATASET_SIDECAR_SCHEMA
from curate.io.tar_writer import DeterministicTarWriter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# Backgrounds reuse the palette plus gray; a background never equals the shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**COLORS, "gray": (128, 128, 128)}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
NOISE_KINDS: tuple[str, ...] = ("clean", "mismatch", "generic", "corrupt")

GENERIC_CAPTIONS: tuple[str, ...] = (
    "an image",
    "photo",
    "image.jpg",
    "click here",
    "untitled",
    "IMG_0001.JPG",
    "thumbnail",
    "picture",
    "no description available",
    "download",
)

# Templates pick which attributes a caption mentions; every one names shape and colour so a
# clean caption always pins down the two attributes mismatches differ in.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a_color} {color} {shape}",
    "{a_color} {color} {shape} on {a_bg} {bg} background",
    "photo of {a_size} {size} {color} {shape} in the {pos}",
    "{a_size} {size} {color} {shape} on {a_bg} {bg} background",
    "{color} {shape} on {bg}",
    "an illustration of {a_color} {color} {shape}, {pos}",
    "{a_size} {size} {color} {shape}",
    "a drawing of {a_color} {color} {shape} in the {pos} on {a_bg} {bg} background",
    "{color} {shape}",
    "clipart: {size} {color} {shape}",
)

# Shape centres as fractions of the image side, before jitter.
_POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
_SIZE_RADII: dict[str, float] = {"small": 0.13, "large": 0.26}


@dataclass(frozen=True)
class Description:
    """The true content of one synthetic image."""

    shape: str
    color: str
    background: str
    size: str
    position: str

    def text(self) -> str:
        """Canonical full description, used as ground truth in labels."""
        return (
            f"{_article(self.size)} {self.size} {self.color} {self.shape} in the {self.position}"
            f" on {_article(self.background)} {self.background} background"
        )


@dataclass
class DemoDataset:
    """What :func:`generate_shards` wrote."""

    out_dir: Path
    shards: list[Path]
    labels: Path
    counts: dict[str, int]
    seed: int
    fractions: dict[str, float] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(self.counts.values())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_description(rng: np.random.Generator) -> Description:
    """Draw a random image description."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    backgrounds = [b for b in BACKGROUNDS if b != color]
    background = backgrounds[rng.integers(len(backgrounds))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    return Description(shape, color, background, size, position)


def make_caption(desc: Description, rng: np.random.Generator) -> str:
    """Render a caption for ``desc`` with a randomly chosen template."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(
        shape=desc.shape,
        color=desc.color,
        bg=desc.background,
        size=desc.size,
        pos=desc.position,
        a_color=_article(desc.color),
        a_bg=_article(desc.background),
        a_size=_article(desc.size),
    )


def generic_caption(rng: np.random.Generator) -> str:
    """An uninformative web-style caption."""
    return GENERIC_CAPTIONS[rng.integers(len(GENERIC_CAPTIONS))]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)))
            for a in (-90, 30, 150)
        ]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.42
            angle = math.radians(-90 + 36 * i)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        t = r * 0.33  # half thickness of the arms
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def render(desc: Description, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``desc`` as an RGB image, with small jitter in place, size and colour."""
    s = image_size

    def jitter_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        # Colour jitter keeps images from being pixel-identical per description.
        noise = rng.integers(-12, 13, size=3)
        return tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(rgb, noise, strict=True))  # type: ignore[return-value]

    image = Image.new("RGB", (s, s), jitter_colour(BACKGROUNDS[desc.background]))
    draw = ImageDraw.Draw(image)
    fx, fy = _POSITION_CENTRES[desc.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * s
    cy = (fy + rng.uniform(-0.04, 0.04)) * s
    r = _SIZE_RADII[desc.size] * s * rng.uniform(0.9, 1.1)
    fill = jitter_colour(COLORS[desc.color])
    if desc.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_polygon(desc.shape, cx, cy, r), fill=fill)
    return image


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG-encode deterministically (no EXIF, no timestamps)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def corrupt_bytes(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """Bytes PIL cannot decode: either random bytes or a JPEG cut inside its header tables.

    Cutting inside the header (not just before EOI) makes decoding fail even when
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is on.
    """
    if rng.random() < 0.5:
        return rng.integers(0, 256, size=int(rng.integers(64, 512)), dtype=np.uint8).tobytes()
    return jpeg[: max(8, min(len(jpeg) // 8, 120))]


def _described_pairs(
    n: int, image_size: int, rng: np.random.Generator, generic_fraction: float
) -> list[tuple[Description, Image.Image, str]]:
    out = []
    for _ in range(n):
        desc = random_description(rng)
        image = render(desc, image_size, rng)
        # Draw both captions so the random stream does not depend on the generic branch.
        caption = make_caption(desc, rng)
        generic = generic_caption(rng)
        out.append((desc, image, generic if rng.random() < generic_fraction else caption))
    return out


def sample_pairs(
    n: int, *, image_size: int = 64, seed: int = 0, generic_fraction: float = 0.0
) -> tuple[list[Image.Image], list[str]]:
    """In-memory (image, caption) pairs for training; a fraction get generic captions."""
    pairs = _described_pairs(n, image_size, np.random.default_rng(seed), generic_fraction)
    return [p[1] for p in pairs], [p[2] for p in pairs]


def sample_described(
    n: int, *, image_size: int = 64, seed: int = 0
) -> tuple[list[Description], list[Image.Image], list[str]]:
    """Like :func:`sample_pairs` with clean captions, also returning the true descriptions."""
    pairs = _described_pairs(n, image_size, np.random.default_rng(seed), 0.0)
    return [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]


def noise_counts(
    num_samples: int, *, mismatch: float, generic: float, corrupt: float
) -> dict[str, int]:
    """Exact per-kind counts: ``floor(fraction * num_samples + 0.5)``; the rest are clean."""
    counts = {}
    for kind, frac in (("mismatch", mismatch), ("generic", generic), ("corrupt", corrupt)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{kind} fraction must be in [0, 1], got {frac}")
        counts[kind] = math.floor(frac * num_samples + 0.5)
    noisy = sum(counts.values())
    if noisy > num_samples:
        raise ValueError(f"noise fractions add up to more than all {num_samples} samples")
    return {"clean": num_samples - noisy, **counts}


_LABEL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("noise", pa.string()),
        ("shape", pa.string()),
        ("color", pa.string()),
        ("background", pa.string()),
        ("size", pa.string()),
        ("position", pa.string()),
        ("description", pa.string()),
        ("caption", pa.string()),
    ]
)


def _write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    # Fixed writer options keep the file byte-identical for identical rows.
    pq.write_table(table, path, compression="snappy")


def generate_shards(
    out_dir: Path | str,
    *,
    num_samples: int = 2000,
    samples_per_shard: int = 500,
    image_size: int = 64,
    mismatch: float = 0.15,
    generic: float = 0.10,
    corrupt: float = 0.02,
    seed: int = 0,
) -> DemoDataset:
    """Write synthetic img2dataset-style shards with injected noise into ``out_dir``.

    Noise kinds: ``mismatch`` (caption of another sample whose shape or colour differs),
    ``generic`` (uninformative caption), ``corrupt`` (undecodable image bytes, clean caption).
    Output is byte-identical for the same arguments.
    """
    if num_samples < 1 or not 1 <= samples_per_shard <= 10_000:
        raise ValueError("need num_samples >= 1 and 1 <= samples_per_shard <= 10000")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = noise_counts(num_samples, mismatch=mismatch, generic=generic, corrupt=corrupt)

    kinds = np.array(["clean"] * num_samples, dtype=object)
    order = rng.permutation(num_samples)
    start = 0
    for kind in ("mismatch", "generic", "corrupt"):
        kinds[order[start : start + counts[kind]]] = kind
        start += counts[kind]

    pairs = _described_pairs(num_samples, image_size, rng, 0.0)
    descs = [p[0] for p in pairs]
    clean_captions = [p[2] for p in pairs]
    # Mismatch donors are drawn among samples whose own caption is truthful.
    donors = [i for i in range(num_samples) if kinds[i] in ("clean", "corrupt")]

    captions: list[str] = []
    for i, kind in enumerate(kinds):
        if kind == "mismatch":
            captions.append(clean_captions[_pick_donor(i, descs, donors, rng)])
        elif kind == "generic":
            captions.append(generic_caption(rng))
        else:
            captions.append(clean_captions[i])

    shards: list[Path] = []
    labels: list[dict] = []
    for shard_id, first in enumerate(range(0, num_samples, samples_per_shard)):
        indices = range(first, min(first + samples_per_shard, num_samples))
        shard_name = f"{shard_id:05d}.tar"
        sidecar_rows = []
        with open(out / shard_name, "wb") as fh, DeterministicTarWriter(fh) as tar:
            for local, i in enumerate(indices):
                key = f"{shard_id:05d}{local:04d}"
                image_bytes = encode_jpeg(pairs[i][1])
                if kinds[i] == "corrupt":
                    image_bytes = corrupt_bytes(image_bytes, rng)
                row = {
                    "url": f"http://synthetic.invalid/{key}.jpg",
                    "caption": captions[i],
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": image_size,
                    "height": image_size,
                    "original_width": image_size,
                    "original_height": image_size,
                    "exif": None,
                    "sha256": hashlib.sha256(image_bytes).hexdigest(),
                }
                tar.add(f"{key}.jpg", image_bytes)
                tar.add(f"{key}.txt", captions[i].encode("utf-8"))
                tar.add(f"{key}.json", json.dumps(row, indent=4).encode("utf-8"))
                sidecar_rows.append(row)
                d = descs[i]
                labels.append(
                    {
                        "key": key,
                        "shard": shard_name,
                        "noise": str(kinds[i]),
                        "shape": d.shape,
                        "color": d.color,
                        "background": d.background,
                        "size": d.size,
                        "position": d.position,
                        "description": d.text(),
                        "caption": captions[i],
                    }
                )
        _write_parquet(sidecar_rows, IMG2DATASET_SIDECAR_SCHEMA, out / f"{shard_id:05d}.parquet")
        stats = {
            "count": len(sidecar_rows),
            "successes": len(sidecar_rows),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": 0.0,
            "start_time": 0.0,
            "end_time": 0.0,
            "status_dict": {"success": len(sidecar_rows)},
        }
        (out / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        shards.append(out / shard_name)

    labels_path = out / "labels.parquet"
    _write_parquet(labels, _LABEL_SCHEMA, labels_path)
    return DemoDataset(
        out_dir=out,
        shards=shards,
        labels=labels_path,
        counts=counts,
        seed=seed,
        fractions={"mismatch": mismatch, "generic": generic, "corrupt": corrupt},
    )


def _pick_donor(
    i: int, descs: Sequence[Description], donors: Sequence[int], rng: np.random.Generator
) -> int:
    """A donor sample whose shape or colour differs from sample ``i`` (so the caption is wrong)."""
    me = descs[i]
    for _ in range(1000):
        j = donors[rng.integers(len(donors))] if donors else int(rng.integers(len(descs)))
        if (descs[j].shape, descs[j].color) != (me.shape, me.color):
            return j
    raise RuntimeError("could not find a mismatching caption donor")
