"""The wire format: a small JSON header plus zstd-compressed tensor blobs. Never pickle.

    b"GKT" | version (1 byte) | header length (uint32, big-endian) | JSON header | payload

The UTF-8 JSON header (at most 64 KiB) holds ``v, kind, device, round, msg_id, chunk,
chunks, tensors, crc32, meta``; each entry of ``tensors`` is ``{name, dtype, shape, codec,
nbytes}`` and the payload is the blobs in that order, covered by ``crc32`` (zlib).
``codec`` is a float codec (fp32/fp16/q8/q4/s8, decoding to float32), "exact"
(``codecs.encode_array``: the array bit for bit) or "delta" (int64 ids as differences).

``decode_message`` checks the frame, the header, the kind's schema and every size before
it decompresses anything, then the values (finite floats, ids, labels); anything else
raises ``WireError`` whose ``reason`` is one of ``REASONS``. ``encode_message`` runs the
same checks, so a bad message fails where it is made.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_runtime.protocol.codecs import (
    ARRAY_DTYPES,
    FLOAT_CODECS,
    array_dtype,
    decode_array,
    decode_delta,
    encode_array,
    encode_delta,
    get_codec,
)
from edge_runtime.protocol.errors import WireError
from edge_runtime.protocol.limits import rows_per_message
from edge_runtime.protocol.schema import (  # noqa: F401 (part of wire's API)
    _INT32,
    _MSG_ID,
    FEATURE_CHANNELS,
    MAX_ACK_IDS,
    MAX_CLASSES,
    MAX_FEATURE_SIZE,
    ROUND_STATES,
    check_schema,
    check_values,
)
from edge_runtime.protocol.topics import validate_device_id

MAGIC = b"GKT"
PROTOCOL_VERSION = 1
MAX_HEADER = 64 * 1024
MAX_ELEMENTS = 8 * 1024 * 1024  # default cap on decoded elements per message (32 MB fp32)
KINDS = ("hello", "features", "upload_done", "extractor", "ack", "logits", "logits_request",
         "round", "model", "model_request", "model_ack", "reject")
REASONS = ("bad_magic", "bad_version", "bad_header", "unknown_kind", "schema", "checksum",
           "truncated", "trailing", "too_large", "dtype", "shape", "nonfinite", "corrupt")

_PREFIX = struct.Struct(">3sBI")
_HEADER_KEYS = {"v", "kind", "device", "round", "msg_id", "chunk", "chunks", "tensors",
                "crc32", "meta"}
_SPEC_KEYS = {"name", "dtype", "shape", "codec", "nbytes"}
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.]{1,128}")
_MAX_TENSORS = 64
_MAX_RANK = 8

__all__ = ["WireError", "TensorSpec", "Message", "encode_message", "decode_message",
           "chunk_sizes"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype, shape and codec in a message header."""

    name: str
    dtype: str  # what the tensor decodes to
    shape: tuple[int, ...]
    codec: str  # a float codec, "exact" or "delta"
    nbytes: int  # blob length in the payload

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Message:
    """A decoded message: the header's fields plus ``tensors`` (name -> array)."""

    kind: str
    device: str
    round: int
    msg_id: str
    chunk: int
    chunks: int
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    specs: tuple[TensorSpec, ...]
    crc32: int
    v: int = PROTOCOL_VERSION


def encode_message(kind: str, device: str, round: int,
                   tensors: dict[str, tuple[np.ndarray, str]], *, msg_id: str, chunk: int = 0,
                   chunks: int = 1, meta: dict[str, Any] | None = None) -> bytes:
    """Frame one message. ``tensors`` maps name -> (array, codec), codec being a float
    codec, "exact" or "delta". Raises WireError if the result would not decode."""
    specs, blobs, arrays = [], [], {}
    for name, (arr, codec) in tensors.items():
        arr = np.asarray(arr)
        if codec == "exact":
            blob, dtype = encode_array(arr), array_dtype(arr)
        elif codec == "delta":
            blob, dtype = encode_delta(arr), "int64"
        else:
            blob, dtype = get_codec(codec).encode(arr), "float32"
        specs.append({"name": name, "dtype": dtype, "shape": list(arr.shape), "codec": codec,
                      "nbytes": len(blob)})
        blobs.append(blob)
        arrays[name] = arr
    payload = b"".join(blobs)
    header = {"v": PROTOCOL_VERSION, "kind": kind, "device": device, "round": round,
              "msg_id": msg_id, "chunk": chunk, "chunks": chunks, "tensors": specs,
              "crc32": zlib.crc32(payload), "meta": {} if meta is None else meta}
    try:
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise WireError("bad_header", f"header is not plain JSON: {err}") from None
    if len(raw) > MAX_HEADER:
        raise WireError("too_large", f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    msg = _message(_parse_header(raw), {})  # exactly what the receiver will parse
    check_schema(msg)
    check_values(msg, arrays)
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(raw)) + raw + payload


def decode_message(data: bytes, *, max_bytes: int, max_elements: int = MAX_ELEMENTS) -> Message:
    """Parse and validate one message of at most ``max_bytes`` whose tensors hold at most
    ``max_elements`` elements in all; WireError otherwise."""
    if len(data) > max_bytes:
        raise WireError("too_large", f"message of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < _PREFIX.size:
        raise WireError("truncated", f"message of {len(data)} bytes is shorter than its "
                                     f"{_PREFIX.size}-byte prefix")
    view = memoryview(data).cast("B")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise WireError("bad_magic", f"starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {version}; this side speaks "
                                       f"{PROTOCOL_VERSION}")
    if hlen > MAX_HEADER:
        raise WireError("too_large", f"header of {hlen} bytes exceeds {MAX_HEADER}")
    if _PREFIX.size + hlen > len(view):
        raise WireError("truncated", f"header of {hlen} bytes does not fit a "
                                     f"{len(view)}-byte message")
    header = _parse_header(view[_PREFIX.size:_PREFIX.size + hlen])
    if header["v"] != version:
        raise WireError("bad_version", f"header says version {header['v']}, prefix {version}")
    msg = _message(header, {})
    check_schema(msg)
    total = sum(s.numel for s in msg.specs)
    if total > max_elements:
        raise WireError("too_large", f"tensors hold {total} elements; the limit is "
                                     f"{max_elements}")
    payload = view[_PREFIX.size + hlen:]
    declared = sum(s.nbytes for s in msg.specs)
    if len(payload) < declared:
        raise WireError("truncated", f"tensors declare {declared} payload bytes, "
                                     f"{len(payload)} arrived")
    if len(payload) > declared:
        raise WireError("trailing", f"{len(payload) - declared} bytes after the last tensor")
    if zlib.crc32(payload) != msg.crc32:
        raise WireError("checksum", f"payload CRC-32 {zlib.crc32(payload):08x} != header's "
                                    f"{msg.crc32:08x}")
    arrays, off = {}, 0
    for s in msg.specs:
        blob = payload[off:off + s.nbytes]
        off += s.nbytes
        try:
            if s.codec == "exact":
                arrays[s.name] = decode_array(blob, s.dtype, s.shape)
            elif s.codec == "delta":
                arrays[s.name] = decode_delta(blob, s.shape)
            else:
                arrays[s.name] = get_codec(s.codec).decode(blob, s.shape)
        except WireError as err:
            raise WireError(err.reason, f"tensor {s.name!r}: {err}") from None
    check_values(msg, arrays)
    return replace(msg, tensors=arrays)


def chunk_sizes(n_samples: int, bytes_per_sample: int, max_payload: int) -> list[int]:
    """Samples per message so that each message of ``bytes_per_sample`` per sample fits
    ``max_payload`` (limits.py): full chunks, then the rest. ValueError if a single sample
    does not fit."""
    if n_samples < 0 or bytes_per_sample <= 0:
        raise ValueError(f"need n_samples >= 0 and bytes_per_sample > 0, got {n_samples} "
                         f"and {bytes_per_sample}")
    per = rows_per_message(max_payload, bytes_per_sample)
    return [min(per, n_samples - s) for s in range(0, n_samples, per)]


# -- header --------------------------------------------------------------------------------


def _parse_header(raw: memoryview | bytes) -> dict:
    try:
        text = bytes(raw).decode("utf-8")
        header = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                            parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise WireError("bad_header", f"header is not UTF-8 JSON: {str(err)[:200]}") from None
    if not isinstance(header, dict):
        raise WireError("bad_header", "header must be a JSON object")
    if set(header) != _HEADER_KEYS:
        raise WireError("bad_header", f"header fields {sorted(header)[:20]} != "
                                      f"{sorted(_HEADER_KEYS)}")
    for key in ("v", "round", "chunk", "chunks", "crc32"):
        _int(header[key], f"header field {key!r}", "bad_header")
    for key, typ in (("kind", str), ("device", str), ("msg_id", str), ("tensors", list),
                     ("meta", dict)):
        if not isinstance(header[key], typ):
            raise WireError("bad_header", f"header field {key!r} must be a {typ.__name__}")
    if header["kind"] not in KINDS:
        raise WireError("unknown_kind", f"unknown message kind {header['kind'][:64]!r}; "
                                        f"known: {', '.join(KINDS)}")
    try:
        validate_device_id(header["device"])
    except ValueError as err:
        raise WireError("bad_header", str(err)) from None
    if not _MSG_ID.fullmatch(header["msg_id"]):
        raise WireError("bad_header", f"msg_id {header['msg_id'][:80]!r} must be 1-64 of "
                                      "A-Z a-z 0-9 _ . : -")
    if not 0 <= header["round"] <= _INT32:
        raise WireError("bad_header", f"round {header['round']} out of range")
    if not 0 <= header["chunk"] < header["chunks"] <= _INT32:
        raise WireError("bad_header", f"chunk {header['chunk']} of {header['chunks']} is "
                                      "not 0 <= chunk < chunks")
    if not 0 <= header["crc32"] < 2**32:
        raise WireError("bad_header", f"crc32 {header['crc32']} is not a 32-bit value")
    if len(header["tensors"]) > _MAX_TENSORS:
        raise WireError("bad_header", f"{len(header['tensors'])} tensors; at most "
                                      f"{_MAX_TENSORS}")
    return header


def _message(h: dict, tensors: dict[str, np.ndarray]) -> Message:
    specs = tuple(_spec(s) for s in h["tensors"])
    if len({s.name for s in specs}) != len(specs):
        raise WireError("bad_header", "duplicate tensor names")
    return Message(h["kind"], h["device"], h["round"], h["msg_id"], h["chunk"], h["chunks"],
                   h["meta"], tensors, specs, h["crc32"], h["v"])


def _spec(s: Any) -> TensorSpec:
    if not isinstance(s, dict) or set(s) != _SPEC_KEYS:
        raise WireError("bad_header", f"tensor entry {str(s)[:200]} needs exactly the "
                                      f"fields {sorted(_SPEC_KEYS)}")
    name = s["name"]
    if not isinstance(name, str) or not _TENSOR_NAME.fullmatch(name):
        raise WireError("bad_header", f"tensor name {str(name)[:80]!r} must be 1-128 of "
                                      "A-Z a-z 0-9 _ .")
    if s["codec"] not in ("exact", "delta", *FLOAT_CODECS):
        raise WireError("bad_header", f"tensor {name}: unknown codec {str(s['codec'])[:40]!r}")
    if s["dtype"] not in ARRAY_DTYPES:
        raise WireError("dtype", f"tensor {name}: dtype {str(s['dtype'])[:40]!r} is not one "
                                 f"of {', '.join(ARRAY_DTYPES)}")
    want = {"exact": None, "delta": "int64"}.get(s["codec"], "float32")
    if want is not None and s["dtype"] != want:
        raise WireError("dtype", f"tensor {name}: codec {s['codec']} decodes to {want}, "
                                 f"header says {s['dtype']}")
    shape = s["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_RANK:
        raise WireError("shape", f"tensor {name}: shape must be a list of at most "
                                 f"{_MAX_RANK} sizes")
    for d in shape:
        _int(d, f"tensor {name}: shape entry", "shape")
        if not 0 <= d <= _INT32:
            raise WireError("shape", f"tensor {name}: size {d} out of range")
    _int(s["nbytes"], f"tensor {name}: nbytes", "bad_header")
    if s["nbytes"] < 0:
        raise WireError("bad_header", f"tensor {name}: negative nbytes")
    return TensorSpec(name, s["dtype"], tuple(shape), s["codec"], s["nbytes"])


def _int(v: Any, what: str, reason: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise WireError(reason, f"{what} must be an integer, got {str(v)[:40]!r}")
    return v


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 20:  # beyond int64; also spares int() a quadratic parse
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in a JSON object")
    return out
