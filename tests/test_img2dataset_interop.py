"""Real interop: img2dataset downloads from a local HTTP server, `curate score` reads its shards."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from shardkit import make_image_bytes

from curate.cli.app import main

pytestmark = pytest.mark.slow


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def image_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Serve a folder of images on 127.0.0.1 for the duration of one test."""
    root = tmp_path / "www"
    root.mkdir()
    for i in range(12):
        (root / f"img{i}.jpg").write_bytes(make_image_bytes("jpg", size=(48, 40), seed=i))
    (root / "broken.jpg").write_bytes(b"\x00not a jpeg")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_score_reads_what_img2dataset_wrote(
    image_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url_list = tmp_path / "urls.csv"
    with open(url_list, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for i in range(12):
            writer.writerow([f"{image_server}/img{i}.jpg", f"a test picture number {i}"])
        writer.writerow([f"{image_server}/missing.jpg", "this one 404s"])
        writer.writerow([f"{image_server}/broken.jpg", "this one is not an image"])
    out = tmp_path / "i2d"
    script = (
        "from img2dataset import download\n"
        f"download(url_list={str(url_list)!r}, input_format='csv', url_col='url',"
        f" caption_col='caption', output_folder={str(out)!r}, output_format='webdataset',"
        " image_size=32, resize_mode='border', processes_count=1, thread_count=2,"
        " number_sample_per_shard=8, distributor='multiprocessing', retries=0, timeout=5,"
        " enable_wandb=False)\n"
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tars = sorted(out.glob("*.tar"))
    assert tars, f"img2dataset wrote no shards: {done.stderr[-2000:]}"
    successes = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    assert successes == 12

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "score",
                str(out),
                "--out",
                str(run),
                "-m",
                "negclip",
                "-m",
                "clipscore",
                "--model",
                "curate-tiny",
                "--pretrained",
                "none",
                "--no-progress",
                "--json",
            ]
        )
    stdout, _ = capsys.readouterr()
    assert exc.value.code in (0, None)
    summary = json.loads(stdout)
    assert summary["read"] == 12 and summary["scored"] == 12
    table = pl.read_parquet(run / "scores.parquet")
    assert sorted(table["caption"].to_list()) == sorted(
        f"a test picture number {i}" for i in range(12)
    )
    assert table["negclip"].null_count() == 0
