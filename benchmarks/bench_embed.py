"""Embedding throughput of `curate embed` against a minimal single-process reference loop.

Both sides embed the same shards with the same model in the same run. The reference is what a
researcher writes first: webdataset + PIL decoding + the model's preprocess + forward, one
process, open_clip's encode_image / encode_text on every core. The figure is the throughput
ratio curate / reference (targets on 2 cores: ≥ 1.5 with the decode-bound tiny model, ≥ 1.1
with ViT-B-32, whose weights need not be downloaded: random weights cost the same).

    python benchmarks/bench_embed.py --samples 4000 --model curate-tiny --repeats 3
    python benchmarks/bench_embed.py --samples 1024 --model ViT-B-32 --repeats 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
import webdataset as wds

from curate.demo.synthetic import generate_shards
from curate.embedding.stage import ModelSpec, embed_shards
from curate.embedding.store import RunFolder

WEBDATASET_OPTIONS = inspect.signature(wds.WebDataset.__init__).parameters


@torch.inference_mode()
def encode_reference(model, images: list[torch.Tensor], captions: list[str]) -> None:
    """open_clip's own towers on the batch, as a researcher calls them."""
    net = model.model
    torch.nn.functional.normalize(net.encode_image(torch.stack(images)), dim=-1)
    torch.nn.functional.normalize(net.encode_text(model.tokenizer(captions)), dim=-1)


def reference_loop(urls: list[str], model, batch_size: int) -> int:
    """Single process: read, decode, preprocess, tokenize, embed (every core for the model)."""
    # empty_check exists from webdataset 0.2.87 on; the train extra pins <= 0.2.86.
    options = {"empty_check": False} if "empty_check" in WEBDATASET_OPTIONS else {}
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, **options)
        .decode("pil")
        .to_tuple("jpg", "txt", handler=wds.warn_and_continue)
    )
    done = 0
    images: list[torch.Tensor] = []
    captions: list[str] = []
    for image, caption in dataset:
        images.append(model.preprocess(image.convert("RGB")))
        captions.append(caption)
        if len(images) == batch_size:
            encode_reference(model, images, captions)
            done += len(images)
            images, captions = [], []
    if images:
        encode_reference(model, images, captions)
        done += len(images)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=256, help="stored JPEG side")
    parser.add_argument("--model", default="curate-demo")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--full-text", action="store_true", help="curate's text tower on the full context too"
    )
    args = parser.parse_args()

    spec = ModelSpec(args.model, None, "auto", "auto")
    model = spec.load()
    if args.full_text:
        model.short_text = False
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_shards(
            Path(tmp) / "shards",
            num_samples=args.samples,
            samples_per_shard=args.per_shard,
            image_size=args.image_size,
            mismatch=0.0,
            generic=0.0,
            corrupt=0.0,
        )
        urls = [str(p) for p in data.shards]
        reference_loop(urls[:1], model, args.batch_size)  # warm-up (page cache, kernels)
        ref_times, cur_times = [], []
        for repeat in range(args.repeats):
            t0 = time.perf_counter()
            n_ref = reference_loop(urls, model, args.batch_size)
            ref_times.append(time.perf_counter() - t0)
            run = RunFolder(Path(tmp) / f"run{repeat}")
            t0 = time.perf_counter()
            report = embed_shards(
                urls,
                run,
                spec,
                batch_size=args.batch_size,
                num_workers=args.workers,
                progress=False,
                loaded=model,
            )
            cur_times.append(time.perf_counter() - t0)
            assert report.samples_ok == n_ref == args.samples, (report.samples_ok, n_ref)
    ref, cur = min(ref_times), min(cur_times)
    print(
        json.dumps(
            {
                "benchmark": "embed_throughput",
                "samples": args.samples,
                "image_size": args.image_size,
                "model": args.model,
                "short_text": model.short_text,
                "cpu_count": os.cpu_count(),
                "device": str(model.device),
                "reference_samples_per_s": round(args.samples / ref, 1),
                "curate_samples_per_s": round(args.samples / cur, 1),
                "ratio": round(ref / cur, 3),
                "target": 1.1 if args.model.startswith("ViT-B") else 1.5,
            }
        )
    )


if __name__ == "__main__":
    main()
