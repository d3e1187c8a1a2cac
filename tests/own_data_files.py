"""Image folders for own-data tests: the shipped digits as PNG files, plus every kind of
bad and odd file a real camera folder or download holds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.learning.data import digits_arrays

CLASSES = ",".join(str(d) for d in range(10))


def write_digits(root: Path, per_class: int, classes=range(10), start: int = 0) -> list[Path]:
    """``per_class`` digits of each class as 8x8 greyscale PNGs in root/<digit>/."""
    images, labels = digits_arrays()
    out = []
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[start:start + per_class]:
            path = root / str(c) / f"{i:04d}.png"
            Image.fromarray(np.round(images[i] * 255 / 16).astype(np.uint8), "L").save(path)
            out.append(path)
    return out


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def write_odd_but_good(root: Path) -> list[Path]:
    """Readable images in awkward formats, modes and sizes (all must be used)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    d = root / "3"
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "sixteen_bit.png": lambda p: Image.fromarray(
            rng.integers(0, 65536, (20, 20), dtype=np.uint16)).save(p),
        "palette.gif": lambda p: Image.fromarray(rgb).convert(
            "P", palette=Image.ADAPTIVE).save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack(
            [rgb, rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)])).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "wide.bmp": lambda p: Image.fromarray(
            rng.integers(0, 256, (3, 500, 3), dtype=np.uint8)).save(p),
        "one_pixel.webp": lambda p: Image.fromarray(np.full((1, 1, 3), 99, np.uint8)).save(p),
        "bilevel.png": lambda p: Image.fromarray(rgb[..., 0] > 128).save(p),
    }
    out = []
    for name, write in files.items():
        write(d / name)
        out.append(d / name)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(d / "exif_rotated.jpg", exif=exif)
    out.append(d / "exif_rotated.jpg")
    return out


def write_bad(root: Path) -> list[Path]:
    """Files no decoder can use (each must be skipped, counted and named)."""
    d = root / "5"
    d.mkdir(parents=True, exist_ok=True)
    good = _jpeg_bytes(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    bad = {
        "zero_bytes.png": b"",
        "truncated.jpg": good[:len(good) // 2],
        "text.jpg": b"this is not a picture\n",
        "noise.png": bytes(np.random.default_rng(3).integers(0, 256, 300, dtype=np.uint8)),
        "header_only.png": b"\x89PNG\r\n\x1a\n",
    }
    out = []
    for name, data in bad.items():
        (d / name).write_bytes(data)
        out.append(d / name)
    return out
