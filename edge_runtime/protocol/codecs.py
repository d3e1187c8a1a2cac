"""Tensor codecs for the wire: numpy in, zstd-compressed bytes out, and back. No torch.

Feature codecs for H (post-ReLU maps, float32 [N, C, ...], non-negative, many zeros):
  fp32  the reference, lossless
  fp16  half precision (rejects values above 65504 instead of sending Inf)
  q8    uint8 codes, per-(sample, channel) scale = plane max / 255
  q4    4-bit codes, per-(sample, channel) scale = plane max / 15, two codes per byte
  s8    signed: int8 codes, per-plane scale = max |x| / 127 (feature residuals against what
        the hub holds; logits, one plane per sample)
The quantizers map [0, max] of each plane linearly, so zeros stay exactly zero (which zstd
then squeezes) and the error is at most half a step. They **clamp negative inputs to 0**:
H comes after a ReLU, and spending range on values that cannot occur would cost precision.
fp32/fp16 keep negatives. Non-finite inputs are refused by every codec.

Quantized blob before zstd: little-endian float32 scales [N*C], then the codes
(q4: element 2i in the high nibble of byte i, element 2i+1 in the low one).

``encode_delta``/``decode_delta`` carry int64 ids as their first value and successive
differences: sorted ids then cost about a byte each after zstd.

``encode_array``/``decode_array`` carry any array of ``ARRAY_DTYPES`` bit for bit (ids,
labels, logits, weights), little-endian; float arrays must be finite.

Decoders never trust a blob: the expected size follows from ``shape``, the zstd frame must
declare exactly that size before anything is decompressed (a zip bomb is refused) and
must hold nothing after it. ``shape`` itself is the caller's to bound (``wire`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import zstandard as zstd

from edge_runtime.protocol.errors import WireError

ZSTD_LEVEL = 3  # fast; levels above ~6 cost a device far more CPU than they save bytes
FEATURE_CODECS = ("fp32", "fp16", "q8", "q4")
FEATURE_CODEC = "q4"  # the default for feature maps, chosen by measurement (docs/uplink.md)
LOGITS_CODEC = "fp16"  # both ways; fp32 or s8 on request (accuracy cost: docs/uplink.md)
LOGITS_CODECS = ("fp32", "fp16", "s8")
FLOAT_CODECS = (*FEATURE_CODECS, "s8")  # everything ``Codec`` knows; s8 keeps signs
ARRAY_DTYPES = ("uint8", "int32", "int64", "float16", "float32", "float64")
_LEVELS = {"q8": 255, "q4": 15, "s8": 127}
_FP16_MAX = float(np.finfo(np.float16).max)
_F32 = np.dtype("<f4")
_F32_MAX = float(np.finfo(np.float32).max)
_TINY = np.finfo(np.float32).tiny  # smaller scales would overflow 1/scale: flush to zero


def _compress(raw: bytes | np.ndarray, level: int) -> bytes:
    return zstd.ZstdCompressor(level=level, write_content_size=True).compress(raw)


def _decompress(blob: bytes | memoryview, expected: int) -> bytes:
    """Exactly ``expected`` bytes out of one zstd frame, or WireError."""
    try:
        declared = zstd.get_frame_parameters(blob).content_size
    except zstd.ZstdError as err:
        raise WireError("corrupt", f"not a zstd frame: {err}") from None
    if declared == zstd.CONTENTSIZE_UNKNOWN:
        raise WireError("corrupt", "zstd frame does not declare its decompressed size")
    if declared > expected:
        raise WireError("too_large", f"blob decompresses to {declared} bytes, the shape "
                                     f"allows {expected}")
    if declared < expected:
        raise WireError("truncated", f"blob decompresses to {declared} bytes, the shape "
                                     f"needs {expected}")
    try:
        raw = zstd.ZstdDecompressor().decompress(blob, max_output_size=max(expected, 1),
                                                 allow_extra_data=False)
    except zstd.ZstdError as err:
        raise WireError("corrupt", f"zstd: {err}") from None
    if len(raw) != expected:
        raise WireError("corrupt", f"zstd frame declared {expected} bytes, produced {len(raw)}")
    return raw


def _numel(shape: tuple[int, ...]) -> int:
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise WireError("shape", f"shape must be non-negative integers, got {list(shape)}")
    return math.prod(int(d) for d in shape)


def _planes(shape: tuple[int, ...], signed: bool = False) -> tuple[int, int]:
    """(number of (sample, channel) planes, elements per plane) of an [N, C, ...] shape;
    signed codecs give a rank-2 [N, C] array (logits) one plane per sample."""
    if len(shape) < 2:
        raise WireError("shape", f"quantizers need [N, C, ...], got {list(shape)}")
    if signed and len(shape) == 2:
        return int(shape[0]), int(shape[1])
    return int(shape[0]) * int(shape[1]), math.prod(int(d) for d in shape[2:])


@dataclass(frozen=True)
class Codec:
    """A feature codec; ``level`` is the zstd level used when encoding."""

    name: str
    level: int = ZSTD_LEVEL

    def __post_init__(self) -> None:
        if self.name not in FLOAT_CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose from "
                             f"{', '.join(FLOAT_CODECS)}")
        if not 1 <= self.level <= 22:
            raise ValueError(f"zstd level must be in 1..22, got {self.level}")

    def encode(self, x: np.ndarray) -> bytes:
        x = np.ascontiguousarray(x, dtype=_F32)
        if not np.isfinite(x).all():
            raise WireError("nonfinite", f"{self.name}: input holds NaN or Inf")
        if self.name == "fp32":
            return _compress(x.reshape(-1).view(np.uint8), self.level)
        if self.name == "fp16":
            if x.size and np.abs(x).max() > _FP16_MAX:
                raise WireError("nonfinite", f"fp16: values above {_FP16_MAX:g} would become "
                                             "Inf; use fp32 or q8")
            return _compress(x.astype("<f2").tobytes(), self.level)
        levels, signed = _LEVELS[self.name], self.name == "s8"
        planes, per = _planes(x.shape, signed)
        flat = x.reshape(planes, per) if signed else np.maximum(x.reshape(planes, per), 0)
        peak = np.abs(flat).max(axis=1) if per else np.zeros(planes, _F32)
        scale = peak / np.float32(levels)
        scale[scale < _TINY] = 0
        inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
        q = np.rint(flat * inv[:, None])
        np.clip(q, -levels if signed else 0, levels, out=q)
        codes = q.astype(np.int8 if signed else np.uint8).reshape(-1)
        if self.name == "q4":
            codes = _pack4(codes)
        return _compress(scale.astype(_F32).tobytes() + codes.tobytes(), self.level)

    def decode(self, blob: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        """float32 array of ``shape``; WireError for any blob that does not fit it."""
        shape = tuple(shape)
        n = _numel(shape)
        if self.name in ("fp32", "fp16"):
            dtype = _F32 if self.name == "fp32" else np.dtype("<f2")
            raw = _decompress(blob, n * dtype.itemsize)
            out = np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(shape)
            if not np.isfinite(out).all():
                raise WireError("nonfinite", f"{self.name}: blob holds NaN or Inf")
            return out
        levels, signed = _LEVELS[self.name], self.name == "s8"
        planes, per = _planes(shape, signed)
        nbytes = (n + 1) // 2 if self.name == "q4" else n
        raw = _decompress(blob, 4 * planes + nbytes)
        scale = np.frombuffer(raw, dtype=_F32, count=planes).astype(np.float32)
        if not ((scale >= 0) & (scale <= _F32_MAX / levels)).all():  # NaN fails too
            raise WireError("nonfinite", f"{self.name}: scales must be finite and >= 0")
        codes = np.frombuffer(raw, dtype=np.int8 if signed else np.uint8, offset=4 * planes)
        if signed and codes.size and codes.min() < -levels:
            raise WireError("corrupt", "s8: code -128 is never sent")
        if self.name == "q4":
            codes = _unpack4(codes, n)
        out = codes.reshape(planes, per).astype(np.float32)
        out *= scale[:, None]
        return out.reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """Largest absolute error per plane that ``decode(encode(x))`` may show for a
        non-negative ``x`` (any ``x`` for s8): half a step, plus float32 rounding."""
        signed = self.name == "s8"
        planes, per = _planes(x.shape, signed)
        flat = np.asarray(x, dtype=np.float32).reshape(planes, per)
        flat = np.abs(flat) if signed else np.maximum(flat, 0)
        peak = flat.max(axis=1).astype(np.float64) if per else np.zeros(planes)
        if self.name == "fp32":
            return np.zeros(planes)
        if self.name == "fp16":
            return np.maximum(peak * 2.0**-11, 2.0**-25)  # half an fp16 ulp (subnormals too)
        step = peak / _LEVELS[self.name]
        return step / 2 + peak * 2.0**-21 + 2.0**-110  # last term: planes flushed to zero


def _pack4(codes: np.ndarray) -> np.ndarray:
    if len(codes) % 2:
        codes = np.append(codes, np.uint8(0))
    return (codes[0::2] << 4) | codes[1::2]


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(2 * len(packed), dtype=np.uint8)
    np.right_shift(packed, 4, out=out[0::2])
    np.bitwise_and(packed, 0x0F, out=out[1::2])
    return out[:n]


def get_codec(name: str, level: int = ZSTD_LEVEL) -> Codec:
    """The feature codec ``name``; ValueError naming the valid ones otherwise."""
    return Codec(name, level)


def array_dtype(x: np.ndarray) -> str:
    """The wire name of ``x``'s dtype, or WireError if arrays of it cannot be sent."""
    name = np.dtype(x.dtype).name  # byte order is the wire's business: little-endian
    if name not in ARRAY_DTYPES:
        raise WireError("dtype", f"dtype {x.dtype} cannot be sent; use one of "
                                 f"{', '.join(ARRAY_DTYPES)}")
    return name


def encode_array(x: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """Any array of ``ARRAY_DTYPES``, bit for bit (little-endian), zstd-compressed."""
    x = np.asarray(x)
    wire_dtype = np.dtype(array_dtype(x)).newbyteorder("<")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise WireError("nonfinite", "array holds NaN or Inf")
    return _compress(np.ascontiguousarray(x, dtype=wire_dtype).tobytes(), level)


def encode_delta(ids: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """int64 ids as their first value and successive differences, zstd-compressed."""
    ids = np.asarray(ids)
    if ids.dtype != np.int64 or ids.ndim != 1:
        raise WireError("dtype", f"delta coding takes 1-D int64 ids, got {ids.dtype} "
                                 f"{list(ids.shape)}")
    return encode_array(np.diff(ids, prepend=np.int64(0)), level)


def decode_delta(blob: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    # int64 wraps on overflow: a hostile blob yields some ids, which schema checks bound
    return np.cumsum(decode_array(blob, "int64", shape), dtype=np.int64)


def decode_array(blob: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype not in ARRAY_DTYPES:
        raise WireError("dtype", f"dtype {dtype!r} cannot be received; use one of "
                                 f"{', '.join(ARRAY_DTYPES)}")
    wire_dtype = np.dtype(dtype).newbyteorder("<")
    shape = tuple(shape)
    raw = _decompress(blob, _numel(shape) * wire_dtype.itemsize)
    out = np.frombuffer(raw, dtype=wire_dtype).astype(np.dtype(dtype)).reshape(shape)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise WireError("nonfinite", f"{dtype} array holds NaN or Inf")
    return out
