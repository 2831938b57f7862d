"""Synthetic pools with a known, injected concept–group association (plain functions).

`people_pool` draws captions about people with occupations; the share of women per occupation is
set by the caller, so the ground truth of every count is known without running curate.
`colour_pool` draws demo shapes whose colour depends on the shape, for the image path.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shardkit import make_image_bytes, sample_members, write_tar

FEMALE_WORDS = ("woman", "lady", "young woman")
MALE_WORDS = ("man", "gentleman", "young man")
OCCUPATIONS = ("nurse", "engineer", "teacher", "chef", "pilot", "librarian")


def uid_of(i: int, salt: str = "") -> str:
    return hashlib.md5(f"{salt}{i}".encode()).hexdigest()


@dataclass
class Row:
    uid: str
    caption: str
    gender: str | None  # the group the caption names (None: none, "mixed": both)
    occupation: str | None


def people_rows(
    n: int, female_share: dict[str, float], seed: int = 0, *, salt: str = ""
) -> list[Row]:
    """Captions: 65% a person with an occupation, 12% a person without, 8% an occupation with
    no person word, 10% no person, 5% a man and a woman together."""
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for i in range(n):
        kind = rng.random()
        occupation = OCCUPATIONS[int(rng.integers(len(OCCUPATIONS)))]
        if kind < 0.65:
            female = rng.random() < female_share.get(occupation, 0.5)
            words = FEMALE_WORDS if female else MALE_WORDS
            word = words[int(rng.integers(len(words)))]
            template = (
                "a photo of a {w} working as a {o}",
                "{w} who is a {o}, at work",
                "portrait of a {o}: a smiling {w}",
            )[int(rng.integers(3))]
            caption = template.format(w=word, o=occupation)
            rows.append(Row(uid_of(i, salt), caption, "female" if female else "male", occupation))
        elif kind < 0.77:
            female = rng.random() < 0.5
            word = (FEMALE_WORDS if female else MALE_WORDS)[0]
            rows.append(
                Row(
                    uid_of(i, salt),
                    f"a {word} walking in the park",
                    "female" if female else "male",
                    None,
                )
            )
        elif kind < 0.85:
            rows.append(Row(uid_of(i, salt), f"the desk of a {occupation}", None, occupation))
        elif kind < 0.95:
            rows.append(Row(uid_of(i, salt), "a red car parked on the street", None, None))
        else:
            rows.append(Row(uid_of(i, salt), "a man and a woman in a kitchen", "mixed", None))
    return rows


def write_people_shards(folder: Path, rows: list[Row], per_shard: int = 200) -> list[Path]:
    """img2dataset-layout shards (tiny images) holding `rows`; uids in the json members."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(rows), per_shard)):
        members: list[tuple[str, bytes]] = []
        for j, row in enumerate(rows[start : start + per_shard]):
            key = f"{s:05d}{j:04d}"
            image = make_image_bytes("jpg", "RGB", (16, 16), seed=start + j)
            members += sample_members(
                key, image=image, caption=row.caption, meta={"uid": row.uid, "key": key}
            )
        paths.append(Path(write_tar(folder / f"{s:05d}.tar", members)))
    return paths


SHAPE_RED_SHARE = {"circle": 0.85, "square": 0.15, "triangle": 0.5}


def colour_rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(uid, shape, colour) with colour red or blue, red with the shape's share."""
    rng = np.random.default_rng(seed)
    shapes = list(SHAPE_RED_SHARE)
    out = []
    for i in range(n):
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = "red" if rng.random() < SHAPE_RED_SHARE[shape] else "blue"
        out.append((uid_of(i, "colour"), shape, colour))
    return out


def write_colour_shards(folder: Path, rows: list[tuple[str, str, str]], seed: int = 0) -> None:
    """Demo-style renders of each (shape, colour) with the caption 'a photo of a {shape}'."""
    from curate.demo.synthetic import Description, render

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    members: list[tuple[str, bytes]] = []
    for j, (uid, shape, colour) in enumerate(rows):
        desc = Description(
            shape=shape, color=colour, background="gray", size="large", position="center"
        )
        buf = io.BytesIO()
        render(desc, 64, rng).save(buf, format="JPEG", quality=90)
        key = f"00000{j:04d}"
        members += sample_members(
            key, image=buf.getvalue(), caption=f"a photo of a {shape}", meta={"uid": uid}
        )
    write_tar(folder / "00000.tar", members)
