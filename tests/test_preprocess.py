"""The one preprocessing function: modes, sizes, EXIF, bad files, and agreement with
torchvision's ToTensor + Normalize and with the batched in-memory path."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.learning.batches import U8Images
from edge_runtime.learning.preprocess import (
    Preprocess,
    UnreadableImage,
    load_image,
    normalize,
    preprocess,
    to_rgb_u8,
)


def _bands(height: int = 32) -> np.ndarray:
    """96 x height: a red, a green and a blue band of 32 columns each."""
    a = np.zeros((height, 96, 3), np.uint8)
    for c in range(3):
        a[:, 32 * c:32 * (c + 1), c] = 200
    return a


def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot save one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_spec_round_trips_and_validates():
    spec = Preprocess(size=24, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), resize="stretch")
    assert Preprocess.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["version"] == 1
    with pytest.raises(ValueError, match="resize"):
        Preprocess(resize="squash")
    with pytest.raises(ValueError, match="3"):
        Preprocess(mean=(0.5,))
    with pytest.raises(ValueError, match="std"):
        Preprocess(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="unknown"):
        Preprocess.from_dict({**spec.to_dict(), "colour": "yes"})
    with pytest.raises(ValueError, match="version"):
        Preprocess.from_dict({**spec.to_dict(), "version": 99})


def test_centre_crop_keeps_the_middle_and_stretch_keeps_everything():
    img = Image.fromarray(_bands())
    crop = to_rgb_u8(img, Preprocess(size=32))
    assert crop.shape == (32, 32, 3)
    assert (crop[..., 1] == 200).all() and (crop[..., [0, 2]] == 0).all()  # the green band
    stretch = to_rgb_u8(img, Preprocess(size=32, resize="stretch"))
    assert stretch[:, :8, 0].min() > 150 and stretch[:, -8:, 2].min() > 150
    tall = to_rgb_u8(Image.fromarray(_bands().transpose(1, 0, 2)), Preprocess(size=16))
    assert tall.shape == (16, 16, 3) and (tall[..., 1] > 150).all()


def test_matches_torchvision_and_the_batched_path():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    spec = Preprocess(size=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    ours = preprocess(Image.fromarray(arr), spec)
    tv = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    np.testing.assert_allclose(ours, tv(Image.fromarray(arr)).numpy(), rtol=0, atol=1e-6)
    batched, _ = U8Images(arr[None], np.zeros(1), (spec.mean, spec.std), False).batch(
        torch.tensor([0]), None)
    assert np.array_equal(ours, batched[0].numpy())  # bit for bit: training == predict
    assert np.array_equal(normalize(arr[None], spec)[0], ours)


@pytest.mark.parametrize("name,make", [
    ("grey.png", lambda a: Image.fromarray(a[..., 0])),
    ("bilevel.bmp", lambda a: Image.fromarray(a[..., 0] > 100)),
    ("rgb.webp", lambda a: Image.fromarray(a)),
    ("rgba.png", lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]))),
    ("palette.gif", lambda a: Image.fromarray(a).convert("P", palette=Image.ADAPTIVE)),
    ("cmyk.jpg", lambda a: Image.fromarray(a).convert("CMYK")),
    ("grey_alpha.png", lambda a: Image.fromarray(a[..., :2].copy(), "LA")),
])
def test_every_common_mode_becomes_rgb(tmp_path, name, make):
    a = _bands(20)
    make(a).save(tmp_path / name)
    x = preprocess(load_image(tmp_path / name), Preprocess(size=8))
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()


def test_transparent_pixels_become_white_not_their_hidden_colour():
    a = np.dstack([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)])
    assert (to_rgb_u8(Image.fromarray(a, "RGBA"), Preprocess(size=4)) == 255).all()


def test_sixteen_bit_grey_and_rgb_are_scaled_not_clipped(tmp_path):
    grey = np.full((8, 8), 257 * 100, np.uint16)
    grey[:4] = 65535
    Image.fromarray(grey).save(tmp_path / "g16.png")
    out = to_rgb_u8(load_image(tmp_path / "g16.png"), Preprocess(size=8))
    assert (out[:4] == 255).all() and (out[4:] == 100).all()
    _png16_rgb(tmp_path / "rgb16.png", np.full((8, 8, 3), [65535, 32768, 0], np.uint16))
    out = to_rgb_u8(load_image(tmp_path / "rgb16.png"), Preprocess(size=8))
    assert (out[..., 0] == 255).all() and (out[..., 1] == 128).all() and (out[..., 2] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, :30] = 255  # left half white
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = to_rgb_u8(load_image(tmp_path / "rot.jpg"), Preprocess(size=30, resize="stretch"))
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # white now on top


def test_bad_files_raise_unreadable_naming_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_bands()).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "zero.png").write_bytes(b"")
    for name, why in [("trunc.jpg", "cannot decode"), ("text.jpg", "not an image"),
                      ("zero.png", "empty"), ("missing.png", "no such file")]:
        with pytest.raises(UnreadableImage, match=why) as err:
            load_image(tmp_path / name)
        assert name in str(err.value)


def _photo(path: Path, w: int, h: int, fmt: str = "JPEG", exif_rotate: bool = False) -> None:
    rng = np.random.default_rng(w)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    x[: h // 2, : w // 3] = (30, 160, 90)  # a block whose edges the resize must keep
    img = Image.fromarray(np.clip(x + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8))
    exif = img.getexif()
    if exif_rotate:
        exif[0x0112] = 6
    img.save(path, fmt, quality=90, exif=exif)


@pytest.mark.parametrize("resize", ["center_crop", "stretch"])
def test_a_large_jpeg_decodes_at_reduced_scale_to_nearly_the_same_pixels(tmp_path, resize):
    path, spec = tmp_path / "photo.jpg", Preprocess(size=32, resize=resize)
    _photo(path, 2048, 1536, exif_rotate=True)
    reduced = load_image(path, spec.size)
    assert reduced.size == (256, 192)  # 1/8 scale: both sides still >= 4 x 32
    full = to_rgb_u8(load_image(path), spec)
    fast = to_rgb_u8(reduced, spec)
    assert fast.shape == full.shape == (32, 32, 3)
    diff = np.abs(full.astype(int) - fast.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_small_jpegs_and_other_formats_decode_in_full(tmp_path):
    _photo(tmp_path / "small.jpg", 100, 80)
    _photo(tmp_path / "big.png", 2048, 1536, fmt="PNG")
    assert load_image(tmp_path / "small.jpg", 32).size == (100, 80)  # 1/2 would go below 128
    assert load_image(tmp_path / "big.png", 32).size == (2048, 1536)
    spec = Preprocess(size=32)
    for name in ("small.jpg", "big.png"):
        assert np.array_equal(to_rgb_u8(load_image(tmp_path / name, 32), spec),
                              to_rgb_u8(load_image(tmp_path / name), spec))


def test_heic_photos_decode_with_the_heif_extra(tmp_path):
    """iPhones save HEIC by default; the [heif] extra (pillow-heif, in [all]) reads them."""
    a = np.zeros((60, 80, 3), np.uint8)
    a[:, :40] = (200, 40, 40)
    Image.fromarray(a).save(tmp_path / "phone.heic", quality=95)
    Image.fromarray(a).save(tmp_path / "same.png")
    spec = Preprocess(size=16)
    heic = to_rgb_u8(load_image(tmp_path / "phone.heic", spec.size), spec).astype(int)
    png = to_rgb_u8(load_image(tmp_path / "same.png", spec.size), spec).astype(int)
    assert np.abs(heic - png).mean() < 4  # lossy, but the same picture


def test_a_heic_photo_without_the_extra_says_what_to_install(tmp_path, monkeypatch):
    from edge_runtime.learning import preprocess as pre

    monkeypatch.setattr(pre, "HEIF", False)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    with pytest.raises(UnreadableImage, match=r"IMG_0001.HEIC: a HEIC/HEIF photo; install "
                                              r"the \[heif\] extra"):
        load_image(path)
