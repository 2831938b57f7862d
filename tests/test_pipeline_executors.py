"""The whole pipeline on every executor: score (embedding included) → select → write, balance,
audit and rewrite (rules backend) run locally, on a local Ray cluster and as real Slurm job
arrays (a single-node cluster started by the test); every output file is the same, byte for
byte."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fairkit import OCCUPATIONS, people_rows, write_people_shards

TINY = ["--model", "curate-tiny", "--pretrained", "none", "--workers", "1", "--batch-size", "8"]
REPO = Path(__file__).resolve().parents[1]
# Summaries name their own folder and time themselves; every other file must be equal.
SUMMARIES = {
    "scores.json", "select.json", "balance.json", "audit.json", "rewrite.json", "rebalance.json",
}  # fmt: skip
MAPPED = {"score", "write", "balance", "audit", "rewrite"}  # the stages with units
# Summary keys about one invocation, not the result: paths, timings (rebalance's solver message
# says how long it took), and rewrite's requests sent or found cached by this call (a reduce
# after array tasks finds them all cached).
IN_RUN = {
    "seconds", "out", "source", "target", "audit", "message", "task", "executor", "cached",
    "requests_sent",
}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six shards of captions about people with occupations (uids in the json), and the
    occupations as concepts (balance's metadata and the audit's concepts)."""
    root = tmp_path_factory.mktemp("pipeline")
    rows = people_rows(150, {"nurse": 0.85, "engineer": 0.2}, seed=3)
    write_people_shards(root / "shards", rows, per_shard=25)
    concepts = root / "occupations.txt"
    concepts.write_text("\n".join(OCCUPATIONS) + "\n")
    return root / "shards", concepts


def _stages(shards: Path, concepts: Path, out: Path) -> list[tuple[str, list[str]]]:
    return [
        ("score", ["score", str(shards), "--out", str(out / "run"), "-m", "clipscore",
                   "-m", "negclip", "--negclip-batch", "16", "--negclip-k", "3", *TINY]),
        ("select", ["select", str(out / "run"), "--top", "negclip:0.5",
                    "--out", str(out / "subset")]),
        ("write", ["write", str(shards), "--subset", str(out / "subset"),
                   "--out", str(out / "written"), "--shard-samples", "20", "--shuffle",
                   "--seed", "3"]),
        ("balance", ["balance", str(shards), "-m", str(concepts), "-o", str(out / "balanced"),
                     "--t", "10", "--seed", "2"]),
        ("audit", ["audit", str(shards), "--concepts", str(concepts), "--attribute", "gender",
                   "--out", str(out / "audit")]),
        ("rewrite", ["rewrite", str(shards), "--backend", "rules", "--num-rewrites", "2",
                     "-o", str(out / "rewrites")]),
        ("rebalance", ["rebalance", str(out / "audit"), "--out", str(out / "rebalanced")]),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}


def _curate(args: list[str], cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "curate", *args],
        env=_env(), cwd=cwd, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, f"curate {' '.join(args[:1])}: {done.stderr}"


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file under `out` but the runtime's records and logs, rewrite's request caches
    (SQLite pages hold arrival order) and the summaries."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and ".curate" not in p.parts
        and p.suffix != ".sqlite"
        and p.name not in SUMMARIES
    }


def _summaries(out: Path) -> dict[str, dict]:
    """The summaries without their timings and paths: the counts and decisions must agree."""

    def clean(value: object) -> object:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in IN_RUN}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {
        str(p.relative_to(out)): clean(json.loads(p.read_text()))  # type: ignore[misc]
        for p in sorted(out.rglob("*.json"))
        if p.name in SUMMARIES
    }


@pytest.fixture(scope="module")
def local(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local")
    for _, args in _stages(*inputs, out):
        _curate([*args, "--no-progress"] if args[0] not in ("select", "rebalance") else args, out)
    assert (out / "written" / "manifest.json").is_file()
    return out


# Where each stage logs its own work, and a line its log must hold.
STAGE_LOGS = {
    "run/.curate/embed": "embed: finished",
    "run/.curate/score": '"scored": 150',
    "subset/.curate/select": "select: finished",
    "written/.curate/write": "write: finished",
    "balanced/.curate/balance": "balance: finished",
    "audit/.curate/audit": "audit: finished",
    "rewrites/.curate/rewrite": "rewrite: finished",
    "rebalanced/.curate/rebalance": "rebalance: finished",
}


def test_every_stage_logs_into_its_output_folder(local: Path) -> None:
    for folder, line in STAGE_LOGS.items():
        log = (local / folder / "logs" / "reduce.log").read_text()
        assert line in log, (folder, log[-500:])
        assert " INFO curate." in log


def test_log_level_shows_the_log_on_stderr_and_keeps_json_pure(
    local: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clikit import run_cli

    args = ["select", str(local / "run"), "--top", "negclip:0.5", "--out", str(tmp_path / "s")]
    code, out, err = run_cli(["--log-level", "info", *args, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["selected"] == 76
    assert "select: finished" in err
    code, out, err = run_cli([*args, "--json"], capsys)  # the level does not stick
    assert code == 0 and "select: finished" not in err
    code, _, err = run_cli(["--log-level", "loud", *args], capsys)
    assert code == 2 and "--log-level must be one of" in err


def test_ray_gives_the_local_outputs(
    inputs: tuple[Path, Path], local: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    for name, args in _stages(*inputs, tmp_path):
        if name in MAPPED:
            args = [*args, "--executor", "ray", "--no-progress"]
        _curate(args, tmp_path)
    assert _outputs(tmp_path) == _outputs(local)
    assert _summaries(tmp_path) == _summaries(local)
    assert list((tmp_path / "run" / ".curate" / "embed" / "logs").glob("worker-*.log"))


def test_slurm_arrays_give_the_local_outputs(
    inputs: tuple[Path, Path], local: Path, tmp_path: Path
) -> None:
    """`curate slurm --submit` of every mapped stage on a real single-node cluster: three array
    tasks, then the afterok reduce; select (no units) runs as a plain command in between."""
    import slurm_kit

    reason = slurm_kit.missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    out.mkdir()
    with slurm_kit.slurm_cluster(tmp_path / "cluster") as env:
        env = {**env, "PYTHONPATH": _env()["PYTHONPATH"]}
        for name, args in _stages(*inputs, out):
            if name not in MAPPED:
                _curate(args, out)
                continue
            submitted = subprocess.run(
                [sys.executable, "-m", "curate", "slurm", "--array", "0-2", "--submit", "--",
                 *args],
                env=env, cwd=out, capture_output=True, text=True,
            )  # fmt: skip
            assert submitted.returncode == 0, submitted.stderr
            ids = re.findall(r"job (\d+)", submitted.stdout)
            assert len(ids) == 2, submitted.stdout  # the array and its reduce
            slurm_kit.wait_for_jobs(env, ids)
            logs = [p.read_text() for p in out.glob("*.out")]
            stage_dir = {
                "score": "run", "write": "written", "balance": "balanced", "audit": "audit",
                "rewrite": "rewrites",
            }[name]  # fmt: skip
            assert any((out / stage_dir).rglob("task-00002-of-00003.log")), logs
    slurm_logs = {p.name for p in out.glob("*.out")}
    for path in slurm_logs:
        (out / path).unlink()  # sbatch's own output files are not curate's
    assert _outputs(out) == _outputs(local)
    assert _summaries(out) == _summaries(local)
