"""The one image preprocessing of the toolkit: training on a device's own images, the
metadata written next to an exported model, and ``gkt-edge predict`` all call it, so a
model never sees pixels prepared one way in training and another way in use.

Steps, in order (``to_rgb_u8`` then ``normalize``; ``preprocess`` does both):

0. Decoding (``load_image``/``decode_image`` with ``for_size``): a JPEG much larger than
   the input is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), the smallest
   that keeps both sides at least ``DRAFT_FACTOR`` x ``size``. A 12-megapixel photo
   decodes about 4.4x faster, and after step 3 its pixels differ from a full decode's by
   at most 2 in 255, 0.1 on average (bench/bench_photo_decode.py). Other formats, and
   JPEGs under 8x the input size, decode in full.
1. EXIF orientation applied (``ImageOps.exif_transpose``): a phone photo taken sideways
   is seen the way a person sees it.
2. Converted to 8-bit RGB: grey and bilevel images repeat their one channel three times;
   16-bit and 32-bit integer grey is scaled to 8 bits (65535 -> 255), not clipped; palette
   images are expanded; transparent pixels (RGBA, LA, palette with transparency) are
   composited over white, so what was transparent does not become an arbitrary colour;
   CMYK and other modes go through PIL's own conversion. Animated images: first frame.
   HEIC/HEIF photos (iPhones' default) need the ``[heif]`` extra (pillow-heif); without it
   they are skipped with a message that says so.
3. Resized to ``size`` x ``size`` with PIL's antialiased bilinear filter, by ``resize``:
   - ``"center_crop"`` (default): the shorter side is scaled to ``size`` and the centre
     square kept, so shapes keep their proportions (a camera's 4:3 frame loses its edges);
   - ``"stretch"``: the whole image is scaled to the square, proportions not kept.
   Square inputs (CIFAR's 32x32 at size 32) come out the same either way, pixel for pixel.
4. Scaled to [0, 1] and normalised per channel, ``(x - mean) / std``, as float32 CHW:
   the same values as torchvision's ``ToTensor()`` + ``Normalize(mean, std)``.

Steps 1-3 give a uint8 HWC array that devices cache (3 KB a 32x32 image); step 4 is
cheap and is done per batch in training. Torch-free: PIL and numpy only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_runtime.protocol.run_spec import PREPROCESS_VERSION, RESIZE_METHODS, RunSpec

try:  # the [heif] extra: iPhones save HEIC by default
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF = True
except ImportError:
    HEIF = False

SPEC_VERSION = PREPROCESS_VERSION
# ISO-BMFF brands of HEIC/HEIF/AVIF-family stills (bytes 8-12 of the file)
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over
DRAFT_FACTOR = 4  # a reduced-scale JPEG decode keeps both sides >= this x the input size


class UnreadableImage(ValueError):
    """A file that is not an image PIL can decode in full (its message names the file)."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input. Serialised into run specs and export metadata."""

    size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    resize: str = "center_crop"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize must be one of {list(RESIZE_METHODS)}, "
                             f"got {self.resize!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} needs one value per RGB channel (3), got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``from_dict(to_dict())`` gives back an equal spec."""
        return {"version": SPEC_VERSION, **asdict(self), "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        fields = dict(data)
        version = fields.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"preprocess spec version {version!r} is not supported "
                             f"(this toolkit reads version {SPEC_VERSION})")
        unknown = set(fields) - {"size", "mean", "std", "resize"}
        if unknown:
            raise ValueError(f"unknown preprocess fields {sorted(unknown)}")
        return cls(**fields)

    @property
    def cache_key(self) -> str:
        """What a cached uint8 image depends on (not the normalisation, applied later)."""
        return f"{self.resize}-{self.size}-draft{DRAFT_FACTOR}"


def load_image(path: str | Path, for_size: int | None = None) -> Image.Image:
    """Open and fully decode an image file (any format PIL reads: JPEG, PNG, BMP, WebP,
    GIF, TIFF...). Raises ``UnreadableImage`` naming the file for a missing, empty,
    truncated or non-image file, so callers can skip it with one clear log line.
    ``for_size``: the input size it will be resized to (step 0 in the module doc)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        why = "no such file" if isinstance(err, FileNotFoundError) else f"cannot read ({err})"
        raise UnreadableImage(f"{path}: {why}") from err
    return decode_image(data, str(path), for_size)


def decode_image(data: bytes, name: str, for_size: int | None = None) -> Image.Image:
    """``load_image`` for bytes already read (``name`` is what errors call them)."""
    if not data:
        raise UnreadableImage(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if for_size and img.format == "JPEG":
                img.draft(img.mode, (DRAFT_FACTOR * for_size,) * 2)
            img.load()  # decode now: a truncated file fails here, not in training
            return img.copy()  # the pixels and info (EXIF, palette), free of the file
    except UnidentifiedImageError as err:
        if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS and not HEIF:
            raise UnreadableImage(f"{name}: a HEIC/HEIF photo; install the [heif] extra "
                                  f"(pip install 'gkt-edge-toolkit[heif]') or convert it "
                                  f"to JPEG") from err
        raise UnreadableImage(f"{name}: not an image PIL can read") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports truncated and corrupt data as OSError (some plugins: SyntaxError)
        raise UnreadableImage(f"{name}: cannot decode ({err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Steps 1-2: EXIF orientation applied, 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64)
        scale = 1.0 if mode == "F" else 257.0  # 16-bit full range 65535 -> 255
        image = Image.fromarray(np.clip(arr / scale + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image if mode == "RGB" else image.convert("RGB")


def resize(image: Image.Image, spec: Preprocess) -> Image.Image:
    """Step 3: ``spec.size`` square by ``spec.resize`` (antialiased bilinear)."""
    s = spec.size
    w, h = image.size
    if (w, h) == (s, s):
        return image
    if spec.resize == "stretch":
        return image.resize((s, s), Image.BILINEAR)
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    left, top = (nw - s) // 2, (nh - s) // 2
    # box= crops in source coordinates while resizing, so only the kept part is filtered
    box = (left / scale, top / scale, (left + s) / scale, (top + s) / scale)
    return image.resize((s, s), Image.BILINEAR, box=box)


def to_rgb_u8(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """Steps 1-3: uint8 (size, size, 3), what a device caches."""
    return np.asarray(resize(to_rgb(image), spec), dtype=np.uint8)


def normalize(u8: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Step 4 for one uint8 HWC image or a batch NHWC: float32 CHW / NCHW."""
    x = np.moveaxis(u8, -1, -3).astype(np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def preprocess(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """A PIL image -> the model's float32 (3, size, size) input."""
    return normalize(to_rgb_u8(image, spec), spec)


def preprocess_of(spec: RunSpec) -> Preprocess:
    """The run spec's ``Preprocess`` (its fields were checked when the spec was made)."""
    return Preprocess.from_dict(spec.preprocess)
