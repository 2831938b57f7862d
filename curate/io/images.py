"""Image decoding for worker processes: bytes in, an RGB ``PIL.Image`` out, or a ``SampleError``.

Failure codes: ``empty_image`` (zero bytes), ``image_decode`` (unreadable, truncated or corrupt
data), ``image_too_large`` (width*height over ``max_pixels``, checked from the header before any
pixel is decoded). PIL warnings about odd files are silenced inside ``decode_image`` (they are
not actionable per sample and tests run with warnings as errors); the pixel limit is ours, not
PIL's ``MAX_IMAGE_PIXELS`` (PIL's own hard error at twice that limit is also mapped to
``image_too_large``).

Only the formats in ``IMAGE_FORMATS`` are opened, whatever the member's extension or magic bytes:
PIL's EPS/PS and PDF plugins hand the bytes to Ghostscript when it is on PATH, and the many rare
plugins are attack surface no img2dataset shard needs. Other data fails with
``image_decode: format not allowed``.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_FORMATS", "SampleError", "decode_image", "to_rgb"]

# PIL's default MAX_IMAGE_PIXELS (~ a 9459x9459 image), kept as our own constant.
DEFAULT_MAX_PIXELS = 89_478_485

# What img2dataset writes and browsers show; never EPS/PS/PDF (Ghostscript) or other plugins.
_WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
Image.init()
IMAGE_FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)  # AVIF needs Pillow >= 11.2

_HIGH_DEPTH = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


class SampleError(Exception):
    """A per-sample failure with a stable machine-readable ``code`` and a human ``detail``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image (alpha composited onto white)."""
    if not data:
        raise SampleError("empty_image", "image member has zero bytes")
    with warnings.catch_warnings():
        # DecompressionBombWarning and friends must never escape (warnings are errors in tests).
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.UnidentifiedImageError:
            raise SampleError(
                "image_decode",
                f"format not allowed or not an image (allowed: {', '.join(IMAGE_FORMATS)})",
            ) from None
        except Image.DecompressionBombError as exc:
            raise SampleError("image_too_large", str(exc)) from None
        except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, struct...
            raise SampleError("image_decode", _describe(exc)) from None
        width, height = img.size
        if width * height > max_pixels:
            img.close()
            raise SampleError(
                "image_too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}"
            )
        try:
            img.load()  # here, so truncated files fail now rather than in a later transform
            return to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise SampleError("image_too_large", str(exc)) from None
        except Exception as exc:
            raise SampleError("image_decode", _describe(exc)) from None


def _describe(exc: BaseException) -> str:
    # PIL names the file object with its memory address; drop it so reruns give equal bytes.
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey and float images to 8-bit grey (PIL's own convert clips instead)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.uint32) >> 8
    elif img.mode == "I":
        # Usually a 16-bit PNG opened as 'I'; values above 255 mean a 16-bit range.
        out = arr >> 8 if arr.size and arr.max() > 255 else arr
    else:  # "F": treat [0, 1] data as normalised, anything else as 0..255
        arr = np.nan_to_num(arr.astype(np.float64))
        out = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        out = np.rint(out)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha (or palette/colour-key transparency) goes onto white."""
    if img.mode in _HIGH_DEPTH:
        img = _high_depth_to_l(img)
    has_alpha = img.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")
