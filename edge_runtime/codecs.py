"""Codecs for tensors on the wire, each followed by zstd.

Feature maps H are post-ReLU (non-negative, often zero), so the quantizers map
[0, max] of every (sample, channel) plane onto 0..255 (q8) or 0..15 (q4); zeros stay
exactly zero, which zstd then squeezes. Negative inputs are clamped to 0. "exact" keeps
any numeric array bit-for-bit (ids, labels, logits, weights).

Decoding never trusts the blob: the expected size follows from the header's shape, the
decompressor is bounded by it (a zip bomb is refused), and every size is checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard as zstd

from .errors import WireError

ZSTD_LEVEL = 3
FEATURE_CODECS = ("fp32", "fp16", "q8", "q4")
EXACT_DTYPES = ("int64", "int32", "int16", "uint8", "float32", "float16", "float64", "bool")


def _compress(raw: bytes, level: int = ZSTD_LEVEL) -> bytes:
    return zstd.ZstdCompressor(level=level).compress(raw)


def _decompress(blob: bytes, expected: int) -> bytes:
    try:
        params = zstd.get_frame_parameters(blob)
    except zstd.ZstdError as err:
        raise WireError("corrupt", f"not a zstd frame: {err}") from None
    if params.content_size not in (expected, zstd.CONTENTSIZE_UNKNOWN):
        raise WireError("shape", f"payload holds {params.content_size} bytes, shape needs "
                                 f"{expected}")
    try:
        raw = zstd.ZstdDecompressor().decompress(blob, max_output_size=expected)
    except zstd.ZstdError as err:
        raise WireError("corrupt", f"zstd: {err}") from None
    if len(raw) != expected:
        raise WireError("truncated", f"decoded {len(raw)} bytes, shape needs {expected}")
    return raw


def _planes(shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of (sample, channel) planes, elements per plane) of an [N, C, ...] shape."""
    if len(shape) < 2:
        raise WireError("shape", f"feature codecs need [N, C, ...], got {list(shape)}")
    planes = int(shape[0]) * int(shape[1])
    per = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return planes, per


@dataclass(frozen=True)
class Codec:
    name: str
    level: int = ZSTD_LEVEL

    def encode(self, x: np.ndarray) -> bytes:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.name == "fp32":
            return _compress(x.tobytes(), self.level)
        if self.name == "fp16":
            return _compress(x.astype(np.float16).tobytes(), self.level)
        levels = 255 if self.name == "q8" else 15
        planes, per = _planes(x.shape)
        flat = np.maximum(x.reshape(planes, per), 0.0)
        scale = (flat.max(axis=1) / levels).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        q = np.rint(flat / safe).clip(0, levels).astype(np.uint8)
        if self.name == "q4":
            q = _pack4(q.reshape(-1))
        return _compress(scale.tobytes() + q.tobytes(), self.level)

    def decode(self, blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        if self.name in ("fp32", "fp16"):
            dtype = np.float32 if self.name == "fp32" else np.float16
            raw = _decompress(blob, n * np.dtype(dtype).itemsize)
            return np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(shape)
        planes, per = _planes(shape)
        qbytes = n if self.name == "q8" else (n + 1) // 2
        raw = _decompress(blob, 4 * planes + qbytes)
        scale = np.frombuffer(raw, dtype=np.float32, count=planes)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise WireError("nonfinite", "quantization scales must be finite and >= 0")
        q = np.frombuffer(raw, dtype=np.uint8, offset=4 * planes)
        if self.name == "q4":
            q = _unpack4(q, n)
        return (q.reshape(planes, per).astype(np.float32) * scale[:, None]).reshape(shape)

    def max_error(self, x: np.ndarray) -> np.ndarray:
        """Worst-case absolute error per (sample, channel) plane: half a quantization step."""
        if self.name == "fp32":
            return np.zeros(_planes(x.shape)[0], dtype=np.float32)
        planes, per = _planes(x.shape)
        peak = np.maximum(x.reshape(planes, per), 0).max(axis=1)
        if self.name == "fp16":
            return peak * 2.0**-11  # half a unit in the last place of fp16
        return peak / (255 if self.name == "q8" else 15) / 2


def _pack4(q: np.ndarray) -> np.ndarray:
    if len(q) % 2:
        q = np.append(q, np.uint8(0))
    return (q[0::2] << 4) | q[1::2]


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(len(packed) * 2, dtype=np.uint8)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0x0F
    return out[:n]


def get_codec(name: str) -> Codec:
    if name not in FEATURE_CODECS:
        raise ValueError(f"unknown codec {name!r}; choose from {list(FEATURE_CODECS)}")
    return Codec(name)


def encode_exact(x: np.ndarray) -> bytes:
    return _compress(np.ascontiguousarray(x).tobytes())


def decode_exact(blob: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype not in EXACT_DTYPES:
        raise WireError("dtype", f"dtype {dtype!r} is not allowed; use one of {EXACT_DTYPES}")
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(_decompress(blob, n * dt.itemsize), dtype=dt).reshape(shape).copy()
