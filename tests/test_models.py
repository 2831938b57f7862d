"""Model loading: JSON configs, local checkpoints (safely), clear errors, device and precision."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from curate.errors import ModelLoadError
from curate.models.loading import (
    load_model,
    read_checkpoint,
    resolve_device,
    resolve_precision,
    state_fingerprint,
)

CONFIG = Path(__file__).parent.parent / "curate" / "models" / "configs" / "curate-tiny.json"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny model's weights as .safetensors, with the fingerprint they must load back to."""
    folder = tmp_path_factory.mktemp("weights")
    model = load_model("curate-tiny", None)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move away from the seeded initialisation, so loading must work
        for param in model.model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    path = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(path))
    return path, state_fingerprint(model.model)


def test_local_safetensors_and_training_checkpoint(
    tiny_weights: tuple[Path, str], tmp_path: Path
) -> None:
    path, fingerprint = tiny_weights
    assert load_model("curate-tiny", None).fingerprint != fingerprint
    assert load_model("curate-tiny", str(path)).fingerprint == fingerprint
    # open_clip training checkpoints: {"state_dict": {"module.…": …}, "epoch": …}
    from safetensors.torch import load_file

    state = {f"module.{k}": v for k, v in load_file(str(path)).items()}
    pt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": state}, pt)
    loaded = load_model("curate-tiny", str(pt))
    assert loaded.fingerprint == fingerprint
    assert loaded.pretrained == str(pt.resolve())


def test_json_config_defines_a_custom_architecture(
    tiny_weights: tuple[Path, str], tmp_path: Path
) -> None:
    config = json.loads(CONFIG.read_text())
    config["embed_dim"] = 48
    arch = tmp_path / "my-arch.json"
    arch.write_text(json.dumps(config))
    model = load_model(str(arch), None)
    assert model.name == "my-arch" and model.embed_dim == 48
    img, txt = model.encode(torch.rand(2, 3, 32, 32), model.tokenizer(["a", "b"]))
    assert img.shape == txt.shape == (2, 48)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(str(arch), str(tiny_weights[0]))  # 64-d weights into a 48-d model


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickle code ran",))


def test_pickled_code_is_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": _Exploit()}, handle)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        read_checkpoint(evil)
    assert "pickle code ran" not in capsys.readouterr().out


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("curate-tiny", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="did you mean"):
        load_model("curate-tinyy", None)
    with pytest.raises(ModelLoadError, match=r"config .* not found"):
        load_model(str(tmp_path / "nope.json"), None)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model("curate-tiny", str(garbage))


def test_device_and_precision_defaults() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_random_weights_are_seeded() -> None:
    torch.manual_seed(123)  # the global generator neither matters nor is consumed
    state = torch.random.get_rng_state()
    first = load_model("curate-tiny", "none").fingerprint
    assert torch.equal(state, torch.random.get_rng_state())
    assert load_model("curate-tiny", None).fingerprint == first


def test_bf16_inference_on_cpu_matches_fp32() -> None:
    fp32 = load_model("curate-tiny", None, precision="fp32")
    bf16 = load_model("curate-tiny", None, precision="bf16")
    assert fp32.fingerprint == bf16.fingerprint
    pixels, tokens = torch.rand(4, 3, 32, 32), fp32.tokenizer(["a red circle"] * 4)
    a, _ = fp32.encode(pixels, tokens)
    b, _ = bf16.encode(pixels, tokens)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_picks_half_precision() -> None:
    model = load_model("curate-tiny", None)
    assert model.device.type == "cuda" and model.precision in ("bf16", "fp16")


def _config(**changes: dict[str, object]) -> dict[str, object]:
    config = json.loads(CONFIG.read_text())
    for tower, values in changes.items():
        if tower == "top":
            config.update(values)
        else:
            config[tower] = {**config[tower], **values}
    return config


@pytest.mark.parametrize(
    "config",
    [
        _config(),
        json.loads((CONFIG.parent / "curate-demo.json").read_text()),
        _config(top={"embed_dim": 96}, vision_cfg={"mlp_ratio": 2.5, "image_size": [48, 32]}),
        _config(vision_cfg={"layers": 5, "width": 96, "patch_size": 4, "ls_init_value": 0.1}),
        _config(text_cfg={"context_length": 77, "vocab_size": 1000, "mlp_ratio": 3.0}),
        _config(vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 64}),
        _config(vision_cfg={"layers": [2, 1, 2, 1], "width": 32, "image_size": 96}),
    ],
    ids=["tiny", "demo", "ratio-and-size", "deeper-vit", "text", "resnet", "resnet-wide"],
)
def test_parameter_estimate_matches_built_models(tmp_path: Path, config: dict[str, object]) -> None:
    from curate.models.size import estimate_parameters

    path = tmp_path / "arch.json"
    path.write_text(json.dumps(config))
    built = sum(p.numel() for p in load_model(str(path), None).model.parameters())
    estimate = estimate_parameters(config, str(path))
    assert abs(estimate - built) <= 0.05 * built, (estimate, built)


def test_parameter_limit_and_its_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "arch.json"
    path.write_text(CONFIG.read_text())
    monkeypatch.setenv("CURATE_MAX_PARAMS", "1e6")  # curate-tiny has about 3.5 million
    with pytest.raises(ModelLoadError, match="million parameters") as exc:
        load_model(str(path), None)
    assert "arch.json" in str(exc.value) and "CURATE_MAX_PARAMS" in str(exc.value)
    monkeypatch.setenv("CURATE_MAX_PARAMS", "many")
    with pytest.raises(ModelLoadError, match="CURATE_MAX_PARAMS"):
        load_model(str(path), None)
    monkeypatch.setenv("CURATE_MAX_PARAMS", "5000000")
    assert load_model(str(path), None).embed_dim == 64


@pytest.mark.parametrize(
    ("tower", "key", "value"),
    [
        ("vision_cfg", "width", "wide"),
        ("vision_cfg", "layers", [1, 2]),
        ("vision_cfg", "patch_size", 0),
        ("text_cfg", "layers", True),
        ("text_cfg", "vocab_size", -3),
        ("vision_cfg", "mlp_ratio", "x" * 10_000),
    ],
)
def test_bad_config_values_are_one_line(
    tmp_path: Path, tower: str, key: str, value: object
) -> None:
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(_config(**{tower: {key: value}})))
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(path), None)
    message = str(exc.value)
    assert f"{tower}.{key}" in message and "\n" not in message and len(message) < 300
