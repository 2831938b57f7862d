"""decode_image: every bad input maps to one failure code, every mode comes back as RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from shardkit import make_image_bytes

from curate.io.images import SampleError, decode_image, to_rgb


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (grey, 8 bit) with one short IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _code(data: bytes, **kw: int) -> str:
    with pytest.raises(SampleError) as info:
        decode_image(data, **kw)
    return info.value.code


def test_sample_error_str_and_attributes() -> None:
    err = SampleError("image_decode", "cannot identify image file")
    assert err.code == "image_decode"
    assert err.detail == "cannot identify image file"
    assert str(err) == "image_decode: cannot identify image file"


def test_zero_bytes_is_empty_image() -> None:
    assert _code(b"") == "empty_image"


@pytest.mark.parametrize(
    "data",
    [
        b"definitely not an image",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,  # PNG signature, garbage after
        b"\xff\xd8\xff",  # bare JPEG start marker
    ],
)
def test_undecodable_bytes(data: bytes) -> None:
    assert _code(data) == "image_decode"


@pytest.mark.parametrize("kind", ["jpg", "png", "webp"])
def test_truncated_image_fails_at_decode(kind: str) -> None:
    data = make_image_bytes(kind, "RGB", size=(64, 64), seed=3)
    assert _code(data[: len(data) // 2]) == "image_decode"


def test_too_large_by_our_limit() -> None:
    data = make_image_bytes("png", "RGB", size=(32, 32))
    assert _code(data, max_pixels=32 * 32 - 1) == "image_too_large"
    assert decode_image(data, max_pixels=32 * 32).size == (32, 32)


@pytest.mark.parametrize(
    "size",
    [
        (10_000, 10_000),  # above PIL's warning threshold: its warning must not escape
        (20_000, 20_000),  # above PIL's hard error threshold
    ],
)
def test_header_claims_huge_image(size: tuple[int, int]) -> None:
    data = _png_header_only(*size)
    assert len(data) < 200
    with pytest.raises(SampleError) as info:
        decode_image(data)
    assert info.value.code == "image_too_large"
    assert "pixels" in info.value.detail


def test_real_decompression_bomb_png() -> None:
    # A genuine 10000x10000 bi-level PNG: ~100M pixels in a few KB.
    data = _encode(Image.new("1", (10_000, 10_000), 1), optimize=True)
    assert len(data) < 100_000
    assert _code(data) == "image_too_large"


@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        ("jpg", "RGB"),
        ("jpg", "L"),
        ("jpg", "CMYK"),
        ("png", "RGB"),
        ("png", "L"),
        ("png", "RGBA"),
        ("png", "P"),
        ("webp", "RGB"),
        ("webp", "RGBA"),
    ],
)
def test_modes_decode_to_rgb(kind: str, mode: str) -> None:
    img = decode_image(make_image_bytes(kind, mode, size=(24, 16), seed=1))
    assert img.mode == "RGB"
    assert img.size == (24, 16)


def test_rgba_composited_on_white() -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red channel set, but fully transparent everywhere ...
    arr[0, 0] = (10, 20, 30, 255)  # ... except one opaque pixel
    img = decode_image(_encode(Image.fromarray(arr)))
    assert img.getpixel((0, 0)) == (10, 20, 30)
    assert img.getpixel((3, 3)) == (255, 255, 255)


def test_la_composited_on_white() -> None:
    arr = np.zeros((2, 2, 2), dtype=np.uint8)
    arr[0, 0] = (50, 255)
    img = decode_image(_encode(Image.fromarray(arr).convert("LA")))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (50, 50, 50)
    assert img.getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency_index() -> None:
    data = make_image_bytes("png", "P", size=(16, 16), seed=2, transparent=True)
    src = Image.open(io.BytesIO(data))
    assert src.mode == "P" and src.info.get("transparency") == 0
    idx = np.asarray(src)
    img = decode_image(data)
    assert img.mode == "RGB"
    out = np.asarray(img)
    assert (idx == 0).any()
    assert (out[idx == 0] == 255).all()


def test_palette_with_transparency_bytes() -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (3 * 254))
    pal.putpixel((0, 0), 0)
    data = _encode(pal, transparency=b"\x00\xff")  # index 0 transparent, index 1 opaque
    img = decode_image(data)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (255, 0, 0)


def test_bilevel_and_16bit_grey() -> None:
    assert decode_image(_encode(Image.new("1", (8, 8), 1))).getpixel((0, 0)) == (255, 255, 255)
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 0x8000
    img = decode_image(_encode(Image.fromarray(arr)))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_32bit_int_and_float_modes() -> None:
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert ints.mode == "I"
    assert to_rgb(ints).getpixel((1, 0)) == (255, 255, 255)
    small = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert to_rgb(small).getpixel((1, 0)) == (200, 200, 200)
    floats = Image.fromarray(np.array([[0.0, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert to_rgb(floats).getpixel((1, 0)) == (255, 255, 255)
    tiff = decode_image(_encode(floats, "TIFF"))
    assert tiff.mode == "RGB" and tiff.getpixel((0, 0)) == (0, 0, 0)


def test_decode_is_fully_loaded_and_detached() -> None:
    data = bytearray(make_image_bytes("jpg", "RGB"))
    img = decode_image(bytes(data))
    data[:] = b"\0" * len(data)
    assert img.copy().size == (32, 32)


_EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
    b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
)


def test_postscript_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostScript bytes (in a `.jpg` member) must fail without PIL calling Ghostscript."""
    from PIL import EpsImagePlugin

    calls: list[object] = []

    def spy(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError("ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", spy)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    with pytest.raises(SampleError) as info:
        decode_image(_EPS)
    assert info.value.code == "image_decode"
    assert "not allowed" in info.value.detail
    assert calls == []


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_outside_the_allowlist_fail(fmt: str) -> None:
    data = _encode(Image.new("RGB", (16, 16), (200, 10, 10)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # PIL itself would open it
    assert _code(data) == "image_decode"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_decode(fmt: str) -> None:
    img = decode_image(_encode(Image.new("RGB", (16, 12), (0, 128, 255)), fmt))
    assert img.mode == "RGB" and img.size == (16, 12)
