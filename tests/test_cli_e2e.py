"""End to end through the CLI on tiny shards: embed, score, resume, bad input, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from clikit import run_cli
from shardkit import make_image_bytes, make_shard, sample_members, write_tar

from curate.embedding.store import RunFolder, embeddings_to_numpy

TINY = ["--model", "curate-tiny", "--pretrained", "none", "--no-progress"]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        make_shard(folder / f"{i:05d}.tar", 20, shard_index=i)
    return folder


@pytest.fixture
def bad_shard(tmp_path: Path) -> Path:
    """One shard holding every per-sample problem next to good samples (11 samples in all)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = make_image_bytes("jpg")
    members = []
    members += sample_members("000000000", image=good, caption="fine")
    members += sample_members("000000001", image=b"", caption="zero-byte image")
    members += sample_members("000000002", image=b"not an image at all", caption="undecodable")
    members += sample_members("000000003", image=None, caption="no image")
    members += sample_members("000000004", image=good, caption=None)
    members += sample_members("000000005", image=good, caption=b"\xff\xfe bad utf8")
    members += sample_members("000000006", image=good, caption="   ")
    members += sample_members(
        "000000007", image=make_image_bytes("png", "L"), caption="grey", image_ext="png"
    )
    members += sample_members(
        "000000008", image=make_image_bytes("png", "RGBA"), caption="alpha", image_ext="png"
    )
    members += sample_members("000000009", image=make_image_bytes("jpg", "CMYK"), caption="cmyk")
    members += sample_members("000000000", image=good, caption="duplicate key")
    write_tar(folder / "00000.tar", members)
    return folder


def test_embed_then_score_every_sample(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code, out, _ = run_cli(
        ["embed", str(shards), "--out", str(run), *TINY, "--workers", "2", "--batch-size", "8"],
        capsys,
    )
    assert code == 0, out
    assert sorted(p.name for p in (run / "embeddings").glob("*.parquet")) == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]
    code, out, _ = run_cli(
        ["score", str(run), "-m", "clipscore", "-m", "negclip", "--json", "--no-progress"], capsys
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["read"] == 60 and summary["scored"] == 60 and summary["failed"] == 0
    table = pl.read_parquet(run / "scores.parquet")
    assert table.height == 60 and table["uid"].n_unique() == 60
    assert set(table.columns) >= {"uid", "shard", "key", "caption", "clipscore", "negclip"}
    # clipscore is the cosine of the stored (float16, normalised) embeddings
    stored = RunFolder(run).read_shard("00001")
    img = embeddings_to_numpy(stored.column("image_emb"), 64).astype(np.float64)
    txt = embeddings_to_numpy(stored.column("text_emb"), 64).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=2e-3)
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    got = table.filter(pl.col("shard") == "00001")["clipscore"].to_numpy()
    np.testing.assert_allclose(got, cos, atol=1e-4)
    # negclip ≤ clipscore: R_B(i) ≥ s_ii since the batch contains i itself
    assert (table["negclip"] <= table["clipscore"] + 1e-6).all()


def test_rerun_skips_complete_and_redoes_incomplete(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    base = ["embed", str(shards), "--out", str(run), *TINY, "--workers", "0", "--json"]
    code, out, _ = run_cli(base, capsys)
    assert code == 0 and json.loads(out)["shards_embedded"] == 3
    before = {p.name: p.stat().st_mtime_ns for p in (run / "embeddings").iterdir()}
    code, out, _ = run_cli(base, capsys)
    report = json.loads(out)
    assert report["shards_skipped"] == 3 and report["shards_embedded"] == 0
    assert report["samples_read"] == 60
    assert before == {p.name: p.stat().st_mtime_ns for p in (run / "embeddings").iterdir()}
    # A crash between table and record leaves the table without its record: redone.
    (run / "embeddings" / "00001.json").unlink()
    code, out, _ = run_cli(base, capsys)
    report = json.loads(out)
    assert report["shards_embedded"] == 1 and report["shards_skipped"] == 2
    assert report["samples_read"] == 60
    # A changed source shard (other size) is redone too.
    make_shard(shards / "00002.tar", 25, shard_index=2)
    code, out, _ = run_cli(base, capsys)
    report = json.loads(out)
    assert report["shards_embedded"] == 1 and report["samples_read"] == 65
    assert not list((run / "embeddings").glob(".*tmp"))


def test_same_inputs_same_bytes(
    shards: Path, bad_shard: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (shards / "00009.tar").write_bytes((bad_shard / "00000.tar").read_bytes())
    outs = []
    for name in ("a", "b"):
        run = tmp_path / name
        code, _, _ = run_cli(
            [
                "score",
                str(shards),
                "--out",
                str(run),
                "-m",
                "negclip",
                "--negclip-batch",
                "16",
                "--negclip-k",
                "3",
                "--seed",
                "7",
                *TINY,
                "--workers",
                "2",
            ],
            capsys,
        )
        assert code == 0
        outs.append((run / "scores.parquet").read_bytes())
    assert outs[0] == outs[1]


def test_worker_count_does_not_change_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    make_shard(folder / "00000.tar", 30)
    tables = []
    for workers in ("0", "2"):  # 2 workers split the single shard into parts
        run = tmp_path / f"w{workers}"
        code, _, _ = run_cli(
            [
                "score",
                str(folder),
                "--out",
                str(run),
                *TINY,
                "--workers",
                workers,
                "--batch-size",
                "4",
            ],
            capsys,
        )
        assert code == 0
        tables.append(pl.read_parquet(run / "scores.parquet"))
    assert tables[0]["key"].to_list() == tables[1]["key"].to_list()
    # Batches are whole tar-order blocks whatever the worker count; only the model's CPU
    # thread count may differ (chosen by measuring with workers), which could move last bits.
    np.testing.assert_allclose(
        tables[0]["clipscore"].to_numpy(), tables[1]["clipscore"].to_numpy(), rtol=0, atol=1e-6
    )


def test_bad_samples_are_accounted_for(
    bad_shard: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code, out, _ = run_cli(
        ["score", str(bad_shard), "--out", str(run), *TINY, "--json", "--workers", "2"], capsys
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["read"] == 11
    assert summary["scored"] + summary["failed"] == summary["read"]
    assert summary["failures"] == {
        "caption_not_utf8": 1,
        "duplicate_key": 1,
        "empty_caption": 1,
        "empty_image": 1,
        "image_decode": 1,
        "missing_caption": 1,
        "missing_image": 1,
    }
    table = pl.read_parquet(run / "scores.parquet")
    assert table.height == 11
    scored = table.filter(pl.col("status") == "scored")
    assert sorted(scored["caption"].to_list()) == ["alpha", "cmyk", "fine", "grey"]
    assert table.filter(pl.col("status") == "failed")["clipscore"].null_count() == 7


def test_unopenable_shard_named_and_nonzero_exit(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (shards / "00003.tar").write_bytes(b"this is not a tar file" * 10)
    run = tmp_path / "run"
    code, out, err = run_cli(["score", str(shards), "--out", str(run), *TINY, "--json"], capsys)
    assert code == 1
    assert "00003.tar" in err
    assert json.loads(out)["read"] == 60  # the other shards were finished


def test_duplicate_uids_across_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dup"
    folder.mkdir()
    uid = lambda i: f"{i:032x}"  # noqa: E731
    make_shard(folder / "00000.tar", 5, uid_fn=uid)
    make_shard(folder / "00001.tar", 5, shard_index=1, uid_fn=uid)  # same uids again
    code, out, _ = run_cli(
        ["score", str(folder), "--out", str(tmp_path / "r"), *TINY, "--json"], capsys
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["scored"] == 5 and summary["failures"] == {"duplicate_uid": 5}
    table = pl.read_parquet(tmp_path / "r" / "scores.parquet").filter(pl.col("status") == "scored")
    assert table["uid"].to_list() == [uid(i) for i in range(5)]


def test_normsim_with_target_shards(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    make_shard(target / "00000.tar", 12, shard_index=9)
    run = tmp_path / "run"
    for p in ("inf", "2", "3"):
        code, out, _ = run_cli(
            [
                "score",
                str(shards),
                "--out",
                str(run),
                "-m",
                "normsim",
                "--target",
                str(target),
                "--normsim-p",
                p,
                *TINY,
            ],
            capsys,
        )
        assert code == 0, out
    table = pl.read_parquet(run / "scores.parquet")
    [target_run] = list((run / "targets").iterdir())
    tgt = RunFolder(target_run).read_shard("00000")
    g = embeddings_to_numpy(tgt.column("image_emb"), 64).astype(np.float64)
    pool = RunFolder(run).read_shard("00000")
    f = embeddings_to_numpy(pool.column("image_emb"), 64).astype(np.float64)
    # The scorers renormalise the float16-stored embeddings before use; so does the oracle.
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    expect = (np.abs(f @ g.T) ** 3).sum(1) ** (1 / 3)
    got = table.filter(pl.col("shard") == "00000")["normsim_3"].to_numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-4)


def test_usage_errors_are_one_line(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "run")]
    cases = [
        (["score", str(shards), "--no-such-flag"], "no-such-flag"),
        (["score", str(tmp_path / "missing")], "missing"),
        (["score", str(shards), "-m", "nonsense"], "nonsense"),
        (["score", str(shards), "-m", "normsim", *TINY], "--target"),
        (["score", str(shards), "--model", "ViT-B-3x"], "ViT-B-32"),
        (["score", str(shards), "--normsim-p", "0.5", *TINY], "normsim-p"),
    ]
    for args, needle in cases:
        code, _, err = run_cli([*args, *out], capsys)
        assert code == 2, (args, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (args, err)
        assert needle in lines[0] and "Traceback" not in err


def test_offline_weights_say_what_to_pass(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        [
            "score",
            str(shards),
            "--out",
            str(tmp_path / "r"),
            "--model",
            "ViT-B-32",
            "--pretrained",
            "openai",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2
    assert "--pretrained" in err and len(err.strip().splitlines()) == 1


def test_run_folder_refuses_another_model(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert run_cli(["embed", str(shards), "--out", str(run), *TINY], capsys)[0] == 0
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    from curate.models.loading import load_model

    model = load_model("curate-tiny", None)
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    state["logit_scale"] = state["logit_scale"] + 1.0  # other weights
    save_file(state, str(other))
    make_shard(shards / "00009.tar", 3, shard_index=9)
    code, _, err = run_cli(
        [
            "embed",
            str(shards),
            "--out",
            str(run),
            "--model",
            "curate-tiny",
            "--pretrained",
            str(other),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and "another model" in err


def test_console_script_and_module_entry(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for cmd in (["curate", "--version"], [sys.executable, "-m", "curate", "--version"]):
        exe = cmd if cmd[0] != "curate" else [str(Path(sys.executable).parent / "curate"), *cmd[1:]]
        done = subprocess.run(exe, capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 0 and done.stdout.startswith("curate ")
    done = subprocess.run(
        [sys.executable, "-m", "curate", "score", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "nope" in done.stderr


def test_library_example_runs(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "score_with_library.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(example), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = pl.read_parquet(tmp_path / "run" / "scores.parquet")
    assert table.height == 200
    assert table.filter(pl.col("status") == "failed").height == 4  # the generator's corrupt 2%


# ---------------------------------------------------------------- resume and run-folder safety


def _score_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    code, out, err = run_cli([*args, *TINY, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_shard_names_are_stable_across_calls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_shard(a / "00000.tar", 10)
    make_shard(b / "00000.tar", 10, shard_index=7)  # same file name, other folder
    run = str(tmp_path / "run")
    _score_json(["embed", str(a / "00000.tar"), "--out", run], capsys)
    report = _score_json(
        ["embed", str(a / "00000.tar"), str(b / "00000.tar"), "--out", run], capsys
    )
    assert report["shards_skipped"] == 1 and report["shards_embedded"] == 1
    shards = json.loads((tmp_path / "run" / "run.json").read_text())["shards"]
    assert sorted(shards.values()) == [str(a / "00000.tar"), str(b / "00000.tar")]
    summary = _score_json(["score", run], capsys)
    assert summary["read"] == 20 and summary["scored"] == 20


def test_rewritten_shard_of_equal_size_is_redone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    shard = folder / "00000.tar"
    make_shard(shard, 8, caption_fn=lambda i: f"first caption {i}")
    run = str(tmp_path / "run")
    _score_json(["score", str(folder), "--out", run], capsys)
    size = shard.stat().st_size
    make_shard(shard, 8, caption_fn=lambda i: f"other caption {i}")  # same length, same size
    assert shard.stat().st_size == size
    os.utime(shard, (shard.stat().st_atime + 10, shard.stat().st_mtime + 10))
    _score_json(["score", str(folder), "--out", run], capsys)
    table = pl.read_parquet(tmp_path / "run" / "scores.parquet")
    assert table["caption"].str.starts_with("other").all()


def test_damaged_table_or_lost_run_record_is_redone(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _score_json(["embed", str(shards), "--out", str(run)], capsys)
    table = run / "embeddings" / "00001.parquet"
    table.write_bytes(table.read_bytes()[:100])  # e.g. a power cut before data reached disk
    report = _score_json(["embed", str(shards), "--out", str(run)], capsys)
    assert report["shards_embedded"] == 1
    (run / "run.json").unlink()  # shards without a record of their model are never trusted
    report = _score_json(["embed", str(shards), "--out", str(run)], capsys)
    assert report["shards_embedded"] == 3
    assert _score_json(["score", str(run)], capsys)["scored"] == 60


def test_malformed_run_record_is_one_line(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for content in ("{}", "[]", "{not json"):
        (run / "run.json").write_text(content)
        code, _, err = run_cli(["score", str(run), "--no-progress"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "run.json" in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_cli(["score", str(shards), "--out", str(afile), *TINY], capsys)
    assert code == 2 and "is a file" in err


def test_json_config_run_can_be_resumed_and_rescored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = Path(__file__).parent.parent / "curate" / "models" / "configs" / "curate-tiny.json"
    arch = tmp_path / "cfg" / "my-arch.json"
    arch.parent.mkdir()
    arch.write_text(config.read_text())
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_shard(a / "00000.tar", 6)
    make_shard(b / "00001.tar", 6, shard_index=1)
    from safetensors.torch import save_file

    from curate.models.loading import load_model

    weights = tmp_path / "cfg" / "weights.safetensors"  # random weights differ per load: save
    state = load_model(str(arch), None).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    run = str(tmp_path / "run")
    code, _, err = run_cli(
        [
            "embed",
            str(a),
            "--out",
            run,
            "--model",
            str(arch),
            "--pretrained",
            str(weights),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    # no model options: the run's own (JSON-config) model is reused
    code, _, err = run_cli(["embed", str(b), "--out", run, "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = run_cli(
        ["score", run, "-m", "normsim", "--target", str(b), "--no-progress"], capsys
    )
    assert code == 0, err


def test_scores_json_names_failed_shards(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (shards / "00003.tar").write_bytes(b"garbage" * 50)
    run = tmp_path / "run"
    code, _, _ = run_cli(["score", str(shards), "--out", str(run), *TINY], capsys)
    assert code == 1
    saved = json.loads((run / "scores.json").read_text())
    assert list(saved["shard_errors"]) == [str(shards / "00003.tar")]
