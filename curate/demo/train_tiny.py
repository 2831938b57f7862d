"""Train the tiny demo CLIP (``curate-demo``) from scratch on synthetic shapes.

The model exists so that demos and tests have a CLIP whose scores mean something without
downloading weights: after ~90 s on 2 CPU cores it tells matching captions from mismatched
ones. ``python -m curate.demo.train_tiny --out PATH`` reproduces the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from curate.demo.synthetic import (
    COLORS,
    GENERIC_CAPTIONS,
    SHAPES,
    sample_described,
    sample_pairs,
)

CONFIG_NAME = "curate-demo"
CONFIG_PATH = Path(__file__).resolve().parent.parent / "models" / "configs" / f"{CONFIG_NAME}.json"
# Bump whenever anything that changes the trained weights changes (data, model, schedule).
RECIPE_VERSION = "curate-demo-v1"

DEFAULT_STEPS = 500
DEFAULT_BATCH_SIZE = 128
IMAGE_SIZE = 64
GENERIC_FRACTION = 0.10  # like web data: some captions carry no information
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.1
POOL_SIZE = 16_384  # distinct training pairs; sampled with replacement across epochs
EVAL_SAMPLES = 500
EVAL_SEED_OFFSET = 1_000_003  # held-out data comes from a different random stream

Log = Callable[[str], Any]


@dataclass
class TrainReport:
    """Outcome of :func:`train_demo_clip`."""

    path: Path
    config: str
    seed: int
    steps: int
    batch_size: int
    final_loss: float
    zero_shot: dict[str, float]
    clipscore_auroc: dict[str, float]
    train_seconds: float
    recipe: str = RECIPE_VERSION
    losses: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d.pop("losses")
        return d


def register_demo_config() -> str:
    """Make the ``curate-demo`` config known to open_clip; returns the model name."""
    import open_clip

    if CONFIG_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)
    return CONFIG_NAME


def build_demo_model() -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], Any]:
    """A randomly initialised demo CLIP with its eval preprocess and tokenizer."""
    import open_clip

    name = register_demo_config()
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model, preprocess, open_clip.get_tokenizer(name)


def load_demo_model(
    path: Path | str,
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], Any]:
    """Load a checkpoint written by :func:`train_demo_clip` (eval mode, float32)."""
    from safetensors.torch import load_file

    model, preprocess, tokenizer = build_demo_model()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    model.eval()
    return model, preprocess, tokenizer


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    images: Sequence[Image.Image],
    batch_size: int = 256,
) -> torch.Tensor:
    """L2-normalised image embeddings."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(im) for im in images[i : i + batch_size]])
        out.append(F.normalize(model.encode_image(batch), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 512
) -> torch.Tensor:
    """L2-normalised text embeddings."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i : i + batch_size]))
        out.append(F.normalize(model.encode_text(tokens), dim=-1))
    return torch.cat(out)


def clip_scores(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Any,
    images: Sequence[Image.Image],
    captions: Sequence[str],
) -> np.ndarray:
    """Cosine similarity of each image with its own caption."""
    img = encode_images(model, preprocess, images)
    txt = encode_texts(model, tokenizer, captions)
    return (img * txt).sum(-1).numpy()


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@torch.no_grad()
def evaluate_demo_model(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Any,
    *,
    seed: int = 0,
    n: int = EVAL_SAMPLES,
) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out zero-shot shape/colour accuracy and clipscore AUROCs.

    Class embeddings average the prompts ``"a {colour} {shape}"`` over the other attribute.
    AUROCs rank clean pairs above mismatched captions (another sample's caption with a
    different shape or colour) and above generic captions.
    """
    model.eval()
    descs, images, captions = sample_described(
        n, image_size=IMAGE_SIZE, seed=seed + EVAL_SEED_OFFSET
    )
    img = encode_images(model, preprocess, images)
    colors = list(COLORS)
    prompts = [f"a {c} {s}" for s in SHAPES for c in colors]
    grid = encode_texts(model, tokenizer, prompts).reshape(len(SHAPES), len(colors), -1)
    shape_cls = F.normalize(grid.mean(1), dim=-1)
    color_cls = F.normalize(grid.mean(0), dim=-1)
    shape_true = torch.tensor([SHAPES.index(d.shape) for d in descs])
    color_true = torch.tensor([colors.index(d.color) for d in descs])
    zero_shot = {
        "shape": float(((img @ shape_cls.T).argmax(1) == shape_true).float().mean()),
        "color": float(((img @ color_cls.T).argmax(1) == color_true).float().mean()),
    }

    rng = np.random.default_rng(seed + EVAL_SEED_OFFSET)
    wrong = []
    for d in descs:
        # Donor caption whose shape or colour differs, as in generate_shards.
        while True:
            j = int(rng.integers(n))
            if (descs[j].shape, descs[j].color) != (d.shape, d.color):
                wrong.append(captions[j])
                break
    generic = [GENERIC_CAPTIONS[int(k)] for k in rng.integers(len(GENERIC_CAPTIONS), size=n)]
    clean_s = (img * encode_texts(model, tokenizer, captions)).sum(-1).numpy()
    wrong_s = (img * encode_texts(model, tokenizer, wrong)).sum(-1).numpy()
    generic_s = (img * encode_texts(model, tokenizer, generic)).sum(-1).numpy()
    aurocs = {
        "mismatch": _auroc(clean_s, wrong_s),
        "generic": _auroc(clean_s, generic_s),
        "clean_mean": float(clean_s.mean()),
        "mismatch_mean": float(wrong_s.mean()),
        "generic_mean": float(generic_s.mean()),
    }
    return zero_shot, aurocs


def _lr_at(step: int, steps: int, base_lr: float) -> float:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_demo_clip(
    out_path: Path | str,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    log: Log = print,
    eval_samples: int = EVAL_SAMPLES,
) -> TrainReport:
    """Train the demo CLIP from scratch and save ``out_path`` (safetensors) + ``<out>.json``.

    Deterministic for a given seed and torch thread count. ``eval_samples`` held-out pairs
    measure zero-shot accuracy and clipscore AUROCs (recorded, they do not affect weights).
    """
    from safetensors.torch import save_file

    out_path = Path(out_path)
    start = time.perf_counter()
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model, preprocess, tokenizer = build_demo_model()
        pool = min(POOL_SIZE, max(steps * batch_size, batch_size))
        images, captions = sample_pairs(
            pool, image_size=IMAGE_SIZE, seed=seed, generic_fraction=GENERIC_FRACTION
        )
        pixels = torch.stack([preprocess(im) for im in images])
        tokens = tokenizer(captions)
        del images
        log(f"demo CLIP: {pool} training pairs ready in {time.perf_counter() - start:.1f}s")

        # The 49408-row token embedding dominates the parameter count but a batch touches
        # only a few dozen rows: sparse gradients + SparseAdam keep each step ~5x cheaper.
        model.token_embedding.sparse = True
        embedding = model.token_embedding.weight
        dense = [p for p in model.parameters() if p is not embedding]
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(
                [
                    {"params": [p for p in dense if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                    {"params": [p for p in dense if p.ndim < 2], "weight_decay": 0.0},
                ],
                lr=LEARNING_RATE,
                betas=(0.9, 0.98),
                eps=1e-6,
                fused=True,
            ),
            torch.optim.SparseAdam([embedding], lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-6),
        ]
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(pool, generator=gen)
        cursor = 0
        labels = torch.arange(batch_size)
        losses: list[float] = []
        model.train()
        for step in range(steps):
            if cursor + batch_size > pool:
                order = torch.randperm(pool, generator=gen)
                cursor = 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            lr = _lr_at(step, steps, LEARNING_RATE)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr

            img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
            txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            n = len(idx)
            loss = 0.5 * (
                F.cross_entropy(logits, labels[:n]) + F.cross_entropy(logits.T, labels[:n])
            )
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            with torch.no_grad():
                # As in CLIP: cap the temperature at 100 for stability.
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            if step % 100 == 0 or step == steps - 1:
                log(
                    f"step {step:4d}/{steps} loss {losses[-1]:.3f} "
                    f"({time.perf_counter() - start:.0f}s)"
                )

        model.token_embedding.sparse = False
        model.eval()
        zero_shot, aurocs = evaluate_demo_model(
            model, preprocess, tokenizer, seed=seed, n=eval_samples
        )
        train_seconds = time.perf_counter() - start
        final_loss = float(np.mean(losses[-20:])) if losses else float("nan")
        report = TrainReport(
            path=out_path,
            config=CONFIG_NAME,
            seed=seed,
            steps=steps,
            batch_size=batch_size,
            final_loss=final_loss,
            zero_shot=zero_shot,
            clipscore_auroc=aurocs,
            train_seconds=train_seconds,
            losses=losses,
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        # One metadata key: safetensors writes a multi-key map in hash order, not byte-stable.
        meta = json.dumps({"config": CONFIG_NAME, "recipe": RECIPE_VERSION}, sort_keys=True)
        save_file(state, str(out_path), metadata={"curate": meta})
        sidecar_path(out_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        log(
            f"demo CLIP trained in {train_seconds:.0f}s: zero-shot shape "
            f"{zero_shot['shape']:.2f} colour {zero_shot['color']:.2f}, clipscore AUROC "
            f"mismatch {aurocs['mismatch']:.3f} generic {aurocs['generic']:.3f}"
        )
        return report
    finally:
        torch.use_deterministic_algorithms(previous_determinism)


def sidecar_path(checkpoint: Path | str) -> Path:
    """``<checkpoint>.json``: the training record next to the weights."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".json")


def default_cache_dir() -> Path:
    """``$CURATE_CACHE`` or ``~/.cache/curate``."""
    env = os.environ.get("CURATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "curate"


def ensure_demo_model(cache_dir: Path | str | None = None, *, log: Log = print) -> Path:
    """Path of the cached demo checkpoint, training it on first use (atomically)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "demo-model" / RECIPE_VERSION
    final = folder / f"{CONFIG_NAME}.safetensors"
    if final.exists() and sidecar_path(final).exists():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    # A unique temp name lets concurrent first uses train side by side without clobbering.
    tmp = folder / f".{CONFIG_NAME}.{os.getpid()}.{time.time_ns()}.safetensors"
    log(f"training the demo CLIP into {folder} (first use, about 2 minutes on 2 CPU cores)")
    try:
        train_demo_clip(tmp, log=log)
        # Sidecar first: the weights file appearing is what marks the cache entry complete.
        os.replace(sidecar_path(tmp), sidecar_path(final))
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, sidecar_path(tmp)):
            leftover.unlink(missing_ok=True)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m curate.demo.train_tiny --out PATH``."""
    parser = argparse.ArgumentParser(description="Train the tiny demo CLIP (curate-demo).")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors path")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = train_demo_clip(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(json.dumps(report.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
