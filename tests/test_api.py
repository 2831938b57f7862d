"""The library entry points (`curate.NAME(source, out, config, runtime=, progress=)`): the same
bytes as the CLI, reports whose to_json() is JSON, and select/write/balance without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from clikit import run_cli
from fairkit import OCCUPATIONS, people_rows, write_people_shards

import curate

TINY = ["--model", "curate-tiny", "--pretrained", "none", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("api")
    write_people_shards(root / "shards", people_rows(60, {"nurse": 0.8}, seed=5), per_shard=20)
    concepts = root / "occupations.txt"
    concepts.write_text("\n".join(OCCUPATIONS) + "\n")
    return root / "shards", concepts


def _files(folder: Path) -> dict[str, bytes]:
    """Every data file (not records, logs, caches or the timed summaries)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if (p.is_file() and ".curate" not in p.parts and p.suffix not in (".json", ".sqlite"))
        or (p.is_file() and p.name in ("manifest.json", "sizes.json"))
    }


def test_every_command_gives_the_cli_bytes(
    data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from curate.balancing.metadata import load_metadata
    from curate.balancing.stage import BalanceConfig, BalanceSpec
    from curate.embedding.stage import EmbedConfig
    from curate.fairness.audit import AuditConfig
    from curate.fairness.rebalance import RebalanceOptions
    from curate.fairness.spec import load_spec
    from curate.rewriting.backends import RulesBackend
    from curate.rewriting.prompts import load_prompts
    from curate.rewriting.stage import RewriteConfig, RewriteOptions
    from curate.scoring.stage import NegclipOptions, ScoreConfig
    from curate.selection.rules import TopStep
    from curate.selection.stage import SelectSpec
    from curate.writing.stage import WriteOptions

    shards, concepts = data
    cli, lib = tmp_path / "cli", tmp_path / "lib"
    commands = [
        ["score", str(shards), "--out", str(cli / "run"), "-m", "clipscore", "-m", "negclip",
         "--negclip-batch", "8", "--negclip-k", "2", *TINY],
        ["select", str(cli / "run"), "--top", "negclip:0.5", "--out", str(cli / "subset")],
        ["write", str(shards), "--subset", str(cli / "subset"), "--out", str(cli / "written"),
         "--shard-samples", "7", "--no-progress"],
        ["balance", str(shards), "-m", str(concepts), "-o", str(cli / "balanced"), "--t", "5",
         "--no-progress"],
        ["audit", str(shards), "--concepts", str(concepts), "--attribute", "gender", "--out",
         str(cli / "audit"), "--no-progress"],
        ["rebalance", str(cli / "audit"), "--out", str(cli / "rebalanced")],
        ["rewrite", str(shards), "--backend", "rules", "--num-rewrites", "2", "-o",
         str(cli / "rewrites"), "--no-progress"],
    ]  # fmt: skip
    for args in commands:
        code, _, err = run_cli(args, capsys)
        assert code == 0, (args[0], err)

    embed = EmbedConfig(model="curate-tiny", pretrained="none", workers=0)
    reports = [
        curate.score(
            shards, lib / "run",
            ScoreConfig(metrics=["clipscore", "negclip"], negclip=NegclipOptions(8, 2),
                        embed=embed),
            progress=False,
        ),
        curate.select(lib / "run", lib / "subset", SelectSpec(top=[TopStep.parse("negclip:0.5")])),
        curate.write(shards, lib / "written", WriteOptions(max_samples=7), subset=lib / "subset",
                     progress=False),
        curate.balance(shards, lib / "balanced", BalanceConfig(concepts, BalanceSpec(t=5)),
                       progress=False),
        curate.audit(
            shards, lib / "audit",
            AuditConfig(load_metadata(concepts), load_spec(None).select(["gender"])),
            progress=False,
        ),
        curate.rebalance(lib / "audit", lib / "rebalanced", RebalanceOptions()),
        curate.rewrite(
            shards, lib / "rewrites",
            RewriteConfig(RulesBackend(seed=0), load_prompts(None),
                          RewriteOptions(num_rewrites=2), where="the rules backend"),
            progress=False,
        ),
    ]  # fmt: skip
    for report in reports:
        json.dumps(report.to_json(), default=str)
    assert _files(lib) == _files(cli)
    assert reports[0].scored == 60 and reports[1].selected >= 30  # ties at the cut stay


def test_commands_without_units_refuse_a_cluster_runtime(tmp_path: Path) -> None:
    from curate.errors import InputError

    with pytest.raises(InputError, match="no units to spread"):
        curate.select(tmp_path / "run", tmp_path / "s", runtime=curate.Runtime("ray"))


def test_import_curate_and_cpu_entry_points_load_no_torch() -> None:
    code = (
        "import sys, curate; curate.select, curate.write, curate.balance, curate.rebalance; "
        "import curate.api; print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
