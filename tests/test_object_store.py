"""Shards on S3-compatible object storage: a moto server on 127.0.0.1 stands in for S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import run_cli
from shardkit import make_shard, write_sidecar

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    try:
        yield endpoint
    finally:
        server.stop()


def test_score_shards_on_s3(
    s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="pool")
    local = tmp_path / "local"
    local.mkdir()
    for i in range(2):
        keys = make_shard(local / f"{i:05d}.tar", 10, shard_index=i)
        write_sidecar(
            local / f"{i:05d}.parquet",
            [*keys, f"{i:05d}9999"],
            ["success"] * len(keys) + ["failed_to_download"],
        )
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), "pool", f"shards/{path.name}")

    run = tmp_path / "run"
    for spec in ("s3://pool/shards/", "s3://pool/shards/{00000..00001}.tar"):
        code, out, err = run_cli(
            [
                "score",
                spec,
                "--out",
                str(run),
                "--model",
                "curate-tiny",
                "--pretrained",
                "none",
                "--no-progress",
                "--json",
                "-m",
                "negclip",
            ],
            capsys,
        )
        assert code == 0, err
        summary = json.loads(out)
        assert summary["read"] == 20 and summary["scored"] == 20
    record = json.loads((run / "run.json").read_text())
    assert sorted(record["shards"].values()) == [
        "s3://pool/shards/00000.tar",
        "s3://pool/shards/00001.tar",
    ]
