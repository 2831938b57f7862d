"""The size of a model from its open_clip config, known before anything is built.

A config can ask for more memory than the machine has (a 20-billion-parameter tower is 80 GB in
fp32); building it would end in the OOM killer with no message. `check_model_size` estimates the
parameter count from the config (within 2% for every ViT, ResNet and CoCa config open_clip ships)
and refuses one above `max_parameters()`: 5 billion by default, so every open_clip model fits
(ViT-e-14, the largest, has 4.6 billion); the ``CURATE_MAX_PARAMS`` environment variable raises
or lowers it. Towers named from timm or Hugging Face (``timm_model_name``, ``hf_model_name``) are
published models of known size and are not counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from curate.errors import ModelLoadError, brief

__all__ = ["DEFAULT_MAX_PARAMS", "MAX_PARAMS_ENV", "check_model_size", "estimate_parameters"]

DEFAULT_MAX_PARAMS = 5_000_000_000
MAX_PARAMS_ENV = "CURATE_MAX_PARAMS"

# open_clip's defaults (CLIPVisionCfg, CLIPTextCfg, MultimodalCfg) for keys a config leaves out.
_VISION = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
           "image_size": 224}  # fmt: skip
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12, "mlp_ratio": 4.0}
_MULTIMODAL = _TEXT


def max_parameters() -> int:
    """The largest parameter count `check_model_size` accepts (``CURATE_MAX_PARAMS``)."""
    value = os.environ.get(MAX_PARAMS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PARAMS
    try:
        limit = float(value.replace("_", ""))
    except ValueError:
        limit = -1.0
    if not limit >= 1 or limit == float("inf"):
        raise ModelLoadError(
            f"{MAX_PARAMS_ENV} must be a parameter count such as 8e9, not {brief(value)}"
        )
    return int(limit)


def check_model_size(config: Mapping[str, Any], source: str) -> int:
    """The estimated parameter count of `config`; `ModelLoadError` above `max_parameters()`."""
    estimate = estimate_parameters(config, source)
    limit = max_parameters()
    if estimate > limit:
        raise ModelLoadError(
            f"model config {source} has about {_count(estimate)} parameters "
            f"({estimate * 4 / 1e9:.1f} GB in fp32), over the limit of {_count(limit)}; "
            f"set {MAX_PARAMS_ENV} (e.g. {MAX_PARAMS_ENV}={max(estimate * 2, 10**9):.0e}) "
            "to build it anyway"
        )
    return estimate


def _count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.1f} billion"
    if n >= 10**6:
        return f"{n / 1e6:.1f} million"
    return f"{n:,}"


def estimate_parameters(config: Mapping[str, Any], source: str) -> int:
    """Parameters of the model an open_clip config describes (towers from timm/HF count 0).

    Every value used is checked first, so a config open_clip could not build either is one
    `ModelLoadError` naming the key.
    """
    if not isinstance(config, Mapping):
        raise ModelLoadError(f"model config {source} must be a JSON object")
    reader = _Reader(source)
    embed = reader.integer(config, "embed_dim", None, "")
    total = 1 + int("init_logit_bias" in config)  # logit_scale (and logit_bias)
    vision = reader.tower(config, "vision_cfg")
    if not vision.get("timm_model_name"):
        total += _vision(reader, vision, embed)
    text = reader.tower(config, "text_cfg")
    if not text.get("hf_model_name"):
        total += _text(reader, text, embed)
    if config.get("multimodal_cfg") is not None:
        total += _multimodal(reader, reader.tower(config, "multimodal_cfg"))
    return total


def _block(width: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block: attention (qkv + out, with biases), MLP, two LayerNorms."""
    hidden = int(width * mlp_ratio)
    return 4 * width * width + 4 * width + 2 * width * hidden + hidden + width + 4 * width


def _vision(reader: _Reader, cfg: Mapping[str, Any], embed: int) -> int:
    width = reader.integer(cfg, "width", _VISION["width"], "vision_cfg.")
    image = reader.pair(cfg, "image_size", _VISION["image_size"], "vision_cfg.")
    layers = cfg.get("layers", _VISION["layers"])
    if isinstance(layers, list | tuple):
        stages = [reader.integer({"layers": n}, "layers", None, "vision_cfg.") for n in layers]
        if len(stages) != 4:
            raise reader.fail("vision_cfg.layers", "an integer, or 4 integers (a ResNet)", layers)
        return _resnet(stages, width, image[0], embed)
    layers = reader.integer(cfg, "layers", None, "vision_cfg.")
    patch = reader.pair(cfg, "patch_size", _VISION["patch_size"], "vision_cfg.")
    mlp_ratio = reader.number(cfg, "mlp_ratio", _VISION["mlp_ratio"], "vision_cfg.")
    tokens = (image[0] // patch[0]) * (image[1] // patch[1]) + 1
    scale = 2 * width * layers if cfg.get("ls_init_value") is not None else 0
    return (
        3 * patch[0] * patch[1] * width  # patch embedding (no bias)
        + width  # class token
        + tokens * width  # positional embedding
        + 4 * width  # ln_pre, ln_post
        + layers * _block(width, mlp_ratio)
        + scale
        + width * embed  # projection
    )


def _resnet(stages: list[int], width: int, image: int, embed: int) -> int:
    """open_clip's ModifiedResNet: a 3-conv stem, bottleneck stages, attention pooling."""
    half = width // 2
    total = 27 * half + 9 * half * half + 9 * half * width + 2 * (2 * half + width)  # stem
    inplanes = width
    for index, blocks in enumerate(stages):
        planes = width * 2**index
        for block in range(blocks):
            total += inplanes * planes + 9 * planes * planes + 4 * planes * planes
            total += 2 * (planes + planes + 4 * planes)  # batch norms
            if block == 0 and (index > 0 or inplanes != 4 * planes):
                total += inplanes * 4 * planes + 8 * planes  # downsample conv and norm
            inplanes = 4 * planes
    features = width * 32
    total += ((image // 32) ** 2 + 1) * features  # attention-pool positional embedding
    total += 3 * (features * features + features) + features * embed + embed  # q, k, v, c
    return total


def _text(reader: _Reader, cfg: Mapping[str, Any], embed: int) -> int:
    width = reader.integer(cfg, "width", _TEXT["width"], "text_cfg.")
    layers = reader.integer(cfg, "layers", _TEXT["layers"], "text_cfg.")
    vocab = reader.integer(cfg, "vocab_size", _TEXT["vocab_size"], "text_cfg.")
    context = reader.integer(cfg, "context_length", _TEXT["context_length"], "text_cfg.")
    mlp_ratio = reader.number(cfg, "mlp_ratio", _TEXT["mlp_ratio"], "text_cfg.")
    scale = 2 * width * layers if cfg.get("ls_init_value") is not None else 0
    return (
        (vocab + context + int(bool(cfg.get("embed_cls")))) * width
        + layers * _block(width, mlp_ratio)
        + scale
        + 2 * width  # ln_final
        + width * embed  # projection
    )


def _multimodal(reader: _Reader, cfg: Mapping[str, Any]) -> int:
    """CoCa's text decoder: self-attention and cross-attention blocks, then logits over words."""
    width = reader.integer(cfg, "width", _MULTIMODAL["width"], "multimodal_cfg.")
    layers = reader.integer(cfg, "layers", _MULTIMODAL["layers"], "multimodal_cfg.")
    vocab = reader.integer(cfg, "vocab_size", _MULTIMODAL["vocab_size"], "multimodal_cfg.")
    mlp_ratio = reader.number(cfg, "mlp_ratio", _MULTIMODAL["mlp_ratio"], "multimodal_cfg.")
    return 2 * layers * _block(width, mlp_ratio) + 2 * width * layers + 2 * width + width * vocab


class _Reader:
    """Typed access to config values, each problem one `ModelLoadError` naming the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, value: object) -> ModelLoadError:
        return ModelLoadError(
            f"model config {self.source}: {key} must be {expected}, not {brief(value)}"
        )

    def tower(self, config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = config.get(key)
        if not isinstance(value, Mapping):
            raise self.fail(key, "a JSON object", value)
        return value

    def integer(self, cfg: Mapping[str, Any], key: str, default: int | None, prefix: str) -> int:
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(prefix + key, "a positive integer", value)
        return value

    def number(self, cfg: Mapping[str, Any], key: str, default: float, prefix: str) -> float:
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
            raise self.fail(prefix + key, "a positive number", value)
        return float(value)

    def pair(self, cfg: Mapping[str, Any], key: str, default: int, prefix: str) -> tuple[int, int]:
        value = cfg.get(key, default)
        items = list(value) if isinstance(value, list | tuple) else [value, value]
        good = all(not isinstance(v, bool) and isinstance(v, int) and v > 0 for v in items)
        if len(items) != 2 or not good:
            raise self.fail(prefix + key, "a positive integer or two of them", value)
        return items[0], items[1]
