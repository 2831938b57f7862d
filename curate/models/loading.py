"""Load open_clip models by name + pretrained tag, `hf-hub:` name, local checkpoint or JSON config.

Weights from a local file are read without executing pickled code: `.safetensors` through
safetensors, anything else through `torch.load(weights_only=True)`. A model's size is estimated
from its config before it is built and refused above a limit (`curate.models.size`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from curate.errors import ModelLoadError
from curate.io.text_files import read_file_bytes
from curate.models.size import check_model_size
from curate.models.text_tower import cut_agrees, encode_text
from curate.models.tokens import cap_tokenizer

Precision = Literal["auto", "fp32", "fp16", "bf16"]

_CONFIG_DIR = Path(__file__).parent / "configs"
_TEXT_PROBE = ("a photo of a cat", "two dogs running on a beach at sunset, seen from above")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_registered_configs: set[Path] = set()


def _open_clip() -> Any:
    # Imported lazily: open_clip pulls in timm and transformers glue, slow for `--help`.
    import open_clip

    for path in sorted(_CONFIG_DIR.glob("*.json")):
        _register_config(open_clip, path)
    return open_clip


def _register_config(open_clip: Any, path: Path) -> str:
    path = path.resolve()
    if path not in _registered_configs:
        try:
            config = json.loads(read_file_bytes(path, "model config"))
        except RecursionError:
            raise ModelLoadError(f"model config {path} is nested too deeply") from None
        except ValueError as exc:
            raise ModelLoadError(f"model config {path} is not readable JSON: {exc}") from exc
        if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(
            config
        ):
            raise ModelLoadError(
                f"model config {path} needs embed_dim, vision_cfg and text_cfg (open_clip format)"
            )
        open_clip.add_model_config(path)
        _registered_configs.add(path)
    return path.stem


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here")
    return dev


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if precision != "auto":
        if precision not in _DTYPES:
            raise ModelLoadError(f"unknown precision {precision!r} (use auto, fp32, fp16, bf16)")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@dataclass
class LoadedModel:
    """A CLIP model ready for inference, with what is needed to reproduce its embeddings."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str  # open_clip's name for the architecture
    source: str  # what was asked for: a name, hf-hub:…, or the absolute path of a JSON config
    pretrained: str | None
    device: torch.device
    precision: str
    embed_dim: int
    logit_scale: float
    fingerprint: str
    short_text: bool = False  # the text tower may run on the batch's shortest context

    @property
    def temperature(self) -> float:
        """τ = 1 / exp(logit_scale), the model's own softmax temperature."""
        return 1.0 / self.logit_scale

    def record(self) -> dict[str, Any]:
        """What a run folder stores to identify the embeddings this model produces."""
        return {
            "model": self.source,
            "architecture": self.name,
            "pretrained": self.pretrained,
            "precision": self.precision,
            "fingerprint": self.fingerprint,
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "preprocess": describe_preprocess(self.preprocess),
            "context_length": int(getattr(self.tokenizer, "context_length", 0) or 0),
        }

    @torch.inference_mode()
    def encode(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings (float32, on CPU)."""
        dtype = _DTYPES[self.precision]
        pixels = pixels.to(self.device, dtype=dtype, non_blocking=True)
        tokens = tokens.to(self.device, non_blocking=True)
        img = self.model.encode_image(pixels).float()
        txt = self._encode_text(tokens).float()
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        return img.cpu(), txt.cpu()

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.short_text:
            return encode_text(self.model, tokens)
        return self.model.encode_text(tokens)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings (float32, rows in the order of `texts`)."""
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            emb = self._encode_text(tokens).float()
            out[start : start + len(tokens)] = (
                torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
            )
        return out


def describe_preprocess(preprocess: Any) -> str:
    """A stable one-line description of the image transform (recorded with embeddings)."""
    return " ".join(str(preprocess).split())


def state_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names, shapes and float32 values: identifies the weights exactly."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", dtype=torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _model_name(open_clip: Any, model: str) -> str:
    """Turn a `--model` value into an open_clip model name (registering JSON configs)."""
    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.exists():  # a folder or FIFO is refused when the config is read
            raise ModelLoadError(f"model config {model} not found")
        return _register_config(open_clip, path)
    if model.startswith("hf-hub:") or model in open_clip.list_models():
        return model
    close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ModelLoadError(
        f"unknown model {model!r}{hint}; pass an open_clip name (see `curate models`), "
        "an hf-hub: name or a JSON config file"
    )


def _check_size(open_clip: Any, name: str, model: str) -> None:
    """Refuse, before building, a model whose config asks for too many parameters."""
    try:
        config = open_clip.get_model_config(name)  # None for hf-hub: models
        if config is not None:
            check_model_size(config, model)
    except RecursionError:
        raise ModelLoadError(f"model config {model} is nested too deeply") from None


def _is_local_checkpoint(pretrained: str | None) -> bool:
    return bool(pretrained) and (
        os.sep in pretrained or Path(pretrained).suffix in {".safetensors", ".pt", ".bin", ".pth"}
    )


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely; unwraps training checkpoints ({'state_dict': ...}, 'module.')."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure is the same user problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read checkpoint {path}: {first}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_model(
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    *,
    device: str = "auto",
    precision: Precision = "auto",
) -> LoadedModel:
    """Build an open_clip model for inference.

    `pretrained` is an open_clip tag (`openai`, `laion2b_s34b_b79k`, ...), a local checkpoint path
    (`.safetensors`, `.pt`, `.bin`), or None / "none" for random weights (tests only).

    >>> m = load_model("curate-tiny", None)  # doctest: +SKIP
    """
    open_clip = _open_clip()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    name = _model_name(open_clip, model)
    _check_size(open_clip, name, model)
    tag = None if pretrained in (None, "", "none") else pretrained
    local = _is_local_checkpoint(tag)
    try:
        # Random initialisation (pretrained none, or before loading a local checkpoint) is
        # seeded, so "none" means the same weights in every process (reproducible test runs).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if local else tag, device="cpu", precision="fp32"
            )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(_explain_failure(name, tag, exc)) from exc
    if local:
        path = Path(str(tag)).expanduser()
        state = read_checkpoint(path)
        try:
            result = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even when strict=False
            mismatch = next(
                (ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln),
                str(exc).splitlines()[0],
            )
            raise ModelLoadError(
                f"checkpoint {path} does not fit model {name}: {mismatch}"
            ) from exc
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(
                f"checkpoint {path} does not fit model {name}: {len(result.missing_keys)} missing "
                f"and {len(result.unexpected_keys)} unexpected tensors "
                f"(first: {(result.missing_keys + result.unexpected_keys)[0]})"
            )
        tag = str(path.resolve())
    net.eval()
    fingerprint = state_fingerprint(net)
    net = net.to(device=dev, dtype=_DTYPES[prec])
    tokenizer = cap_tokenizer(open_clip.get_tokenizer(name))  # BPE only what fits the context
    return LoadedModel(
        model=net,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        source=str(Path(model).expanduser().resolve()) if model.endswith(".json") else model,
        pretrained=tag,
        device=dev,
        precision=prec,
        embed_dim=int(net.text_projection.shape[1])
        if isinstance(getattr(net, "text_projection", None), torch.Tensor)
        else _probe_dim(net, dev),
        logit_scale=float(net.logit_scale.exp().item()),
        fingerprint=fingerprint,
        short_text=cut_agrees(
            net, tokenizer(list(_TEXT_PROBE)).to(dev), 1e-4 if prec == "fp32" else 1e-2
        ),
    )


def _probe_dim(net: torch.nn.Module, dev: torch.device) -> int:
    with torch.inference_mode():
        return int(net.encode_text(torch.zeros(1, 8, dtype=torch.long, device=dev)).shape[-1])


def _explain_failure(name: str, tag: str | None, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if "download" in text.lower() or "connection" in text.lower() or "offline" in text.lower():
        return (
            f"cannot get weights for {name} / {tag}: download failed (offline?). Pass a local "
            "checkpoint instead: --pretrained /path/to/open_clip_model.safetensors, or fill the "
            "Hugging Face cache on a connected machine and set HF_HUB_OFFLINE=1"
        )
    return f"cannot build model {name} with pretrained={tag}: {text[:300]}"
