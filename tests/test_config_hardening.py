"""Hostile config and text files: aliases, deep nesting, huge or special files, huge models.

Tests that would hang or exhaust memory if a bug came back run in a child process under an
address-space limit and a timeout, so a regression fails instead of taking CI down.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from shardkit import make_shard

from curate.balancing.metadata import load_metadata
from curate.errors import CurateError, InputError
from curate.fairness.spec import load_spec
from curate.fairness.swap import load_swap_table
from curate.io.text_files import read_text_file
from curate.models.loading import load_model
from curate.rewriting.prompts import load_prompts

GiB = 1 << 30
TINY = Path(__file__).parent.parent / "curate" / "models" / "configs" / "curate-tiny.json"

# 600 bytes of YAML whose aliases stand for 10^9 strings once expanded (or repr()'d).
BILLION_LAUGHS = "\n".join(
    [
        "version: 1",
        "attributes: {g: {groups: {f: {terms: [she]}, m: {terms: [he]}}}}",
        "person:",
        "  terms:",
        "  - - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]",
        *(
            f"    - &{name} [{', '.join([f'*{prev}'] * 10)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def _run_guarded(
    args: list[str], *, memory: int, timeout: float, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`python ARGS` with at most `memory` bytes of address space; fails the test on timeout."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        return subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limit,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`python {' '.join(args[:3])} ...` did not finish within {timeout:.0f} s")


def _one_line(message: str, limit: int = 400) -> None:
    assert "\n" not in message.strip() and len(message) < limit, message[:1000]


# --------------------------------------------------------------------------- YAML aliases


def test_billion_laughs_spec_is_refused_by_audit(tmp_path: Path) -> None:
    assert len(BILLION_LAUGHS) < 700
    (tmp_path / "laughs.yaml").write_text(BILLION_LAUGHS)
    (tmp_path / "shards").mkdir()
    make_shard(tmp_path / "shards" / "00000.tar", 2)
    result = _run_guarded(
        ["-m", "curate", "audit", "shards", "--spec", "laughs.yaml", "--out", "o"],
        memory=6 * GiB,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    _one_line(result.stderr)
    assert "laughs.yaml" in result.stderr and "aliases" in result.stderr
    assert "line 5" in result.stderr  # the first anchor
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "text",
    [
        "version: &v 1\nattributes: {g: {groups: {f: {terms: [she]}, m: {terms: [he]}}}}",
        "base: &b {terms: [she]}\nattributes: {g: {groups: {f: *b, m: {terms: [he]}}}}",
    ],
)
def test_spec_anchors_aliases_and_merge_keys_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match="anchors and aliases") as exc:
        load_spec(path)
    _one_line(str(exc.value))


# --------------------------------------------------------------------------- deep nesting


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_deeply_nested_spec_is_one_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"version": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError, match="nested too deeply") as exc:
        load_spec(path)
    _one_line(str(exc.value))


def test_deeply_nested_metadata_and_prompts_are_one_line(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "meta.json").write_text(deep)
    with pytest.raises(InputError, match="nested too deeply") as exc:
        load_metadata(tmp_path / "meta.json")
    _one_line(str(exc.value))
    (tmp_path / "prompts.json").write_text('{"instruction": ' + deep + "}")
    with pytest.raises(InputError, match="nested too deeply") as exc:
        load_prompts(tmp_path / "prompts.json")
    _one_line(str(exc.value))


def test_huge_json_numbers_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("[" + "1" * 5000 + "]")
    with pytest.raises(InputError) as exc:
        load_metadata(tmp_path / "meta.json")
    assert "meta.json" in str(exc.value)
    _one_line(str(exc.value))
    for name in ("spec.json", "spec.yaml"):
        (tmp_path / name).write_text('{"version": ' + "1" * 5000 + "}")
        with pytest.raises(InputError) as exc:
            load_spec(tmp_path / name)
        assert name in str(exc.value)
        _one_line(str(exc.value))


@pytest.mark.parametrize("depth", [100_000, 300])
def test_deeply_nested_model_config_is_one_line(tmp_path: Path, depth: int) -> None:
    config = json.loads(TINY.read_text())
    text = json.dumps(config).replace('"layers": 2', '"layers": ' + "[" * depth + "]" * depth, 1)
    path = tmp_path / "deep.json"
    path.write_text(text)
    with pytest.raises(CurateError) as exc:
        load_model(str(path), None)
    assert "deep.json" in str(exc.value)
    _one_line(str(exc.value))


# --------------------------------------------------------------------------- user values in errors


def test_brief_is_bounded_for_huge_and_deep_values() -> None:
    from curate.errors import brief

    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    for value in (deep, list(range(1_000_000)), "x" * 1_000_000, {str(i): i for i in range(10**5)}):
        shown = brief(value)
        assert 0 < len(shown) <= 80 and "\n" not in shown
    assert brief("short") == "'short'"
    assert brief("a\nb") == "'a\\nb'"


_GROUPS = "groups: {f: {terms: [she]}, m: {terms: [he]}}"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("spec.yaml", "version: [" + ", ".join(["1"] * 100_000) + "]"),
        (
            "spec.yaml",
            "person: {terms: [[" + ", ".join(["x"] * 100_000) + "]]}\n"
            f"attributes: {{g: {{{_GROUPS}}}}}",
        ),
        (
            "spec.yaml",
            "attributes: {g: {groups: {f: {terms: ['-" + "x" * 100_000 + "']}, m: {terms: [he]}}}}",
        ),
        (
            "spec.yaml",
            f"attributes: {{g: {{{_GROUPS}, target: {{f: 1, m: ["
            + ", ".join(["0"] * 100_000)
            + "]}}}",
        ),
        ("spec.json", json.dumps({"attributes": {"x" * 100_000: {"groups": {"f": {}}}}})),
        ("spec.json", json.dumps({"person": {"y" * 100_000: 1}})),
        ("spec.json", json.dumps({"z" * 100_000: 1})),
    ],
)
def test_spec_errors_never_repeat_huge_values(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as exc:
        load_spec(path)
    _one_line(str(exc.value))


def test_prompt_and_swap_errors_never_repeat_huge_values(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    huge = ["x"] * 100_000
    for data in (
        {"instruction": "i", "k": huge, "banks": {"s": [["a", "b"]]}},
        {"instruction": "i", "k": 0, "banks": {"s": [["a", "b"]]}, "format": huge},
        {"instruction": "i", "k": 0, "banks": {"s" * 100_000: 3}},
        {"instruction": "i", "k": 0, "banks": {"s": [["a", "b"]]}, "z" * 100_000: 1},
    ):
        prompts.write_text(json.dumps(data))
        with pytest.raises(InputError) as exc:
            load_prompts(prompts)
        _one_line(str(exc.value))
    swap = tmp_path / "swap.txt"
    for text in ("x" * 100_000 + "1 he\n", "w" * 100_000 + " " + "w" * 100_000 + "\n"):
        swap.write_text(text)
        with pytest.raises(InputError) as exc:
            load_swap_table(swap)
        _one_line(str(exc.value))


# --------------------------------------------------------------------------- special and huge files

_LOADERS = """
import json, sys
from curate.errors import CurateError
from curate.balancing.metadata import load_metadata
from curate.fairness.spec import load_spec
from curate.fairness.swap import load_swap_table
from curate.rewriting.prompts import load_prompts

messages = {}
for name, load in [("spec", load_spec), ("metadata", load_metadata),
                   ("prompts", load_prompts), ("swap", load_swap_table)]:
    try:
        load(sys.argv[1])
        messages[name] = "loaded"
    except CurateError as exc:
        messages[name] = str(exc)
print(json.dumps(messages))
"""


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_special_files_are_refused_at_once(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        target = tmp_path / "input.json"
        os.mkfifo(target)
        expected = "FIFO"
    else:
        target = Path("/dev/zero")
        if not target.exists():
            pytest.skip("no /dev/zero here")
        expected = "character device"
    result = _run_guarded(["-c", _LOADERS, str(target)], memory=1 * GiB, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    messages = json.loads(result.stdout)
    assert set(messages) == {"spec", "metadata", "prompts", "swap"}
    for message in messages.values():
        assert str(target) in message and expected in message and "regular file" in message
        _one_line(message)


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def test_oversized_files_are_refused_before_reading(tmp_path: Path) -> None:
    from curate.io.text_files import MAX_BYTES

    cases = [
        ("attribute spec", lambda p: load_spec(p), "spec.yaml"),
        ("metadata", lambda p: load_metadata(p), "metadata.json"),
        ("prompt file", lambda p: load_prompts(p), "prompts.json"),
        ("swap table", lambda p: load_swap_table(p), "swap.txt"),
        ("model config", lambda p: load_model(str(p), None), "arch.json"),
    ]
    for what, load, name in cases:
        limit = MAX_BYTES[what]
        path = _sparse(tmp_path / name, limit + 1)
        with pytest.raises(InputError) as exc:
            load(path)
        message = str(exc.value)
        _one_line(message)
        assert name in message and f"{limit + 1:,} bytes" in message
        assert f"limit of {limit:,} bytes" in message


def test_metaclip_sized_metadata_loads(tmp_path: Path) -> None:
    entries = [f"entry number {i}" for i in range(500_000)]  # MetaCLIP's size: ~10 MB
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(entries))
    assert path.stat().st_size > 8 << 20
    assert load_metadata(path).size == 500_000


def test_text_file_messages(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt", "prompt file")
    with pytest.raises(InputError, match="is a folder, not a file"):
        read_text_file(tmp_path, "prompt file")
    (tmp_path / "ok.txt").write_text("hello")
    assert read_text_file(tmp_path / "ok.txt", "prompt file") == "hello"


def test_swap_path_with_nul_byte_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        'attributes: {g: {swap: "a\\0b.txt", groups: {f: {terms: [she]}, m: {terms: [he]}}}}'
    )
    with pytest.raises(InputError, match="swap") as exc:
        load_spec(path)
    _one_line(str(exc.value))


# --------------------------------------------------------------------------- huge models


def test_huge_model_config_is_refused_before_building(tmp_path: Path) -> None:
    config = json.loads(TINY.read_text())
    config["vision_cfg"].update(width=8192, layers=48, head_width=128)
    config["text_cfg"].update(width=8192, layers=48, heads=64)
    (tmp_path / "my-arch.json").write_text(json.dumps(config))
    (tmp_path / "shards").mkdir()
    make_shard(tmp_path / "shards" / "00000.tar", 2)
    args = ["-m", "curate", "embed", "shards", "--model", "my-arch.json", "--pretrained", "none"]
    result = _run_guarded(
        [*args, "--device", "cpu", "--out", "run", "--no-progress"],
        memory=8 * GiB,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    _one_line(result.stderr)
    assert "my-arch.json" in result.stderr and "billion parameters" in result.stderr
    assert "CURATE_MAX_PARAMS" in result.stderr


@pytest.mark.parametrize(
    "text", ["1: x\nb: y", "person: {1: x, b: y}", "attributes: {g: {1: x, b: y}}"]
)
def test_spec_keys_of_mixed_types_are_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match="unknown key") as exc:
        load_spec(path)
    _one_line(str(exc.value))


def test_model_config_fifo_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "arch.json")
    code = (
        "from curate.errors import CurateError\n"
        "from curate.models.loading import load_model\n"
        "try:\n    load_model('arch.json', None)\n"
        "except CurateError as exc:\n    print(exc)\n"
    )
    result = _run_guarded(["-c", code], memory=8 * GiB, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "arch.json" in result.stdout and "FIFO" in result.stdout
    _one_line(result.stdout)
