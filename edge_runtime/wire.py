"""The wire format: a small JSON header plus raw tensor blobs. Never pickle.

    b"GKT" | version (1 byte) | header length (uint32, big-endian) | JSON header | payload

The header names the protocol version, kind, device, round, message id, chunk i of n,
and each tensor's name, dtype, shape, codec and byte length; a CRC-32 covers the
payload. ``decode_message`` checks all of it against the kind's schema before it
allocates anything, and raises ``WireError`` (with a short ``reason``) otherwise.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codecs import EXACT_DTYPES, FEATURE_CODECS, decode_exact, encode_exact, get_codec
from .errors import WireError

MAGIC = b"GKT"
PROTOCOL_VERSION = 1
FEATURE_CHANNELS = 16  # channels of H; equals edge_runtime.models.FEATURE_CHANNELS
MAX_HEADER = 64 * 1024
MAX_ELEMENTS = 8 * 1024 * 1024  # per tensor, checked before decompressing
_PREFIX = struct.Struct(">3sBI")
_NAME = re.compile(r"[A-Za-z0-9_.]{1,128}")
_SENDER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MSG_ID = re.compile(r"[A-Za-z0-9_.:-]{1,96}")
ROUND_STATES = ("collect", "train", "done", "stop")

__all__ = ["WireError", "Message", "encode_message", "decode_message", "chunk_sizes"]


@dataclass(frozen=True)
class Message:
    kind: str
    device: str
    round: int
    msg_id: str
    chunk: int = 0
    chunks: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION


def encode_message(kind: str, device: str, round: int, tensors: dict[str, tuple[np.ndarray, str]],
                   *, msg_id: str, chunk: int = 0, chunks: int = 1,
                   meta: dict[str, Any] | None = None) -> bytes:
    """``tensors`` maps name -> (array, codec); codec is a feature codec or "exact"."""
    specs, blobs = [], []
    for name, (arr, codec) in tensors.items():
        arr = np.asarray(arr)
        blob = encode_exact(arr) if codec == "exact" else get_codec(codec).encode(arr)
        dtype = str(arr.dtype) if codec == "exact" else "float32"
        specs.append({"name": name, "dtype": dtype, "shape": list(arr.shape), "codec": codec,
                      "nbytes": len(blob)})
        blobs.append(blob)
    payload = b"".join(blobs)
    header = {"v": PROTOCOL_VERSION, "kind": kind, "device": device, "round": int(round),
              "msg_id": msg_id, "chunk": chunk, "chunks": chunks, "tensors": specs,
              "crc32": zlib.crc32(payload), "meta": meta or {}}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    msg = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(raw)) + raw + payload
    _validate(_check_header(header), {s["name"]: (s, None) for s in specs})  # fail at source
    return msg


def decode_message(data: bytes, *, max_bytes: int, max_elements: int = MAX_ELEMENTS) -> Message:
    data = bytes(data)
    if len(data) > max_bytes:
        raise WireError("too_large", f"message of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < _PREFIX.size:
        raise WireError("truncated", f"message of {len(data)} bytes is shorter than a prefix")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad_magic", "not a GKT message")
    if version != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {version}, this side speaks "
                                       f"{PROTOCOL_VERSION}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(data):
        raise WireError("truncated", f"header length {hlen} does not fit the message")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen])
    except (UnicodeDecodeError, ValueError) as err:
        raise WireError("bad_header", f"header is not JSON: {err}") from None
    h = _check_header(header)
    if h["v"] != version:
        raise WireError("bad_version", "header and prefix disagree on the version")
    payload = data[_PREFIX.size + hlen:]
    total = sum(s["nbytes"] for s in h["tensors"])
    if total != len(payload):
        raise WireError("truncated", f"tensors declare {total} bytes, payload has "
                                     f"{len(payload)}")
    if zlib.crc32(payload) != h["crc32"]:
        raise WireError("checksum", "payload CRC-32 mismatch")
    for s in h["tensors"]:
        if int(np.prod(s["shape"], dtype=np.int64)) > max_elements:
            raise WireError("too_large", f"tensor {s['name']} has more than {max_elements} "
                                         "elements")
    tensors, off = {}, 0
    for s in h["tensors"]:
        blob = payload[off:off + s["nbytes"]]
        off += s["nbytes"]
        shape = tuple(s["shape"])
        if s["codec"] == "exact":
            arr = decode_exact(blob, s["dtype"], shape)
        else:
            arr = get_codec(s["codec"]).decode(blob, shape)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise WireError("nonfinite", f"tensor {s['name']} holds NaN or Inf")
        tensors[s["name"]] = arr
    _validate(h, {s["name"]: (s, tensors[s["name"]]) for s in h["tensors"]})
    return Message(h["kind"], h["device"], h["round"], h["msg_id"], h["chunk"], h["chunks"],
                   h["meta"], tensors, h["v"])


def _check_header(h: Any) -> dict:
    if not isinstance(h, dict):
        raise WireError("bad_header", "header must be a JSON object")
    want = {"v": int, "kind": str, "device": str, "round": int, "msg_id": str, "chunk": int,
            "chunks": int, "tensors": list, "crc32": int, "meta": dict}
    for key, typ in want.items():
        if not isinstance(h.get(key), typ) or isinstance(h.get(key), bool):
            raise WireError("bad_header", f"header field {key!r} missing or not {typ.__name__}")
    if h["kind"] not in SCHEMAS:
        raise WireError("unknown_kind", f"unknown message kind {h['kind']!r}")
    if not _SENDER.fullmatch(h["device"]):
        raise WireError("bad_header", f"bad device id {h['device']!r}")
    if not _MSG_ID.fullmatch(h["msg_id"]):
        raise WireError("bad_header", f"bad msg_id {h['msg_id'][:100]!r}")
    if h["round"] < 0 or not 0 <= h["chunk"] < h["chunks"] <= 1_000_000:
        raise WireError("bad_header", f"bad round/chunk: round {h['round']}, chunk "
                                      f"{h['chunk']} of {h['chunks']}")
    if len(h["tensors"]) > 64:
        raise WireError("schema", "more than 64 tensors in one message")
    for s in h["tensors"]:
        if not (isinstance(s, dict) and isinstance(s.get("name"), str)
                and _NAME.fullmatch(s["name"]) and isinstance(s.get("shape"), list)
                and len(s["shape"]) <= 6
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                        for d in s["shape"])
                and isinstance(s.get("nbytes"), int) and s["nbytes"] >= 0):
            raise WireError("bad_header", f"bad tensor spec {str(s)[:200]}")
        if s.get("codec") == "exact":
            if s.get("dtype") not in EXACT_DTYPES:
                raise WireError("dtype", f"tensor {s['name']}: dtype {s.get('dtype')!r} "
                                         "not allowed")
        elif s.get("codec") in FEATURE_CODECS:
            if s.get("dtype") != "float32":
                raise WireError("dtype", f"tensor {s['name']}: codec {s['codec']} decodes to "
                                         "float32")
        else:
            raise WireError("bad_header", f"tensor {s['name']}: unknown codec {s.get('codec')!r}")
    if len({s["name"] for s in h["tensors"]}) != len(h["tensors"]):
        raise WireError("schema", "duplicate tensor names")
    return h


def _meta(h: dict, key: str, typ: type | tuple) -> Any:
    v = h["meta"].get(key)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise WireError("schema", f"{h['kind']}: meta {key!r} missing or of the wrong type")
    return v


def _spec(specs: dict, name: str, kind: str, dtypes: tuple[str, ...], rank: int) -> list[int]:
    if name not in specs:
        raise WireError("schema", f"{kind}: tensor {name!r} missing")
    s = specs[name][0]
    if s["dtype"] not in dtypes:
        raise WireError("dtype", f"{kind}: {name} must be {'/'.join(dtypes)}, got {s['dtype']}")
    if len(s["shape"]) != rank:
        raise WireError("shape", f"{kind}: {name} must have rank {rank}, got {s['shape']}")
    return s["shape"]


def _validate(h: dict, specs: dict) -> None:
    kind = h["kind"]
    expected = SCHEMAS[kind]
    if expected is not None and set(specs) != expected:
        raise WireError("schema", f"{kind}: tensors {sorted(specs)} != {sorted(expected)}")
    if kind == "features":
        k = _spec(specs, "ids", kind, ("int64",), 1)[0]
        labels = _spec(specs, "labels", kind, ("int64",), 1)
        logits = _spec(specs, "logits", kind, ("float32", "float16"), 2)
        feats = _spec(specs, "features", kind, ("float32",), 4)
        if not (labels[0] == logits[0] == feats[0] == k) or k == 0:
            raise WireError("shape", f"features: first dimensions differ or are 0: ids {k}, "
                                     f"labels {labels[0]}, logits {logits[0]}, "
                                     f"features {feats[0]}")
        if feats[1] != FEATURE_CHANNELS or feats[2] != feats[3] or not 1 <= feats[2] <= 512:
            raise WireError("shape", f"features must be [k, {FEATURE_CHANNELS}, S, S], got "
                                     f"{feats}")
        if not 1 < logits[1] <= 100_000:
            raise WireError("shape", f"features: bad class count {logits[1]}")
    elif kind == "logits":
        k = _spec(specs, "ids", kind, ("int64",), 1)[0]
        if _spec(specs, "logits", kind, ("float32",), 2)[0] != k:
            raise WireError("shape", "logits: ids and logits differ in length")
    elif kind == "extractor":
        if not specs:
            raise WireError("schema", "extractor: no tensors")
        for name, (s, _) in specs.items():
            if s["codec"] != "exact" or s["dtype"] not in ("float32", "int64"):
                raise WireError("dtype", f"extractor: {name} must be exact float32/int64")
    elif kind == "hello":
        for key in ("num_samples", "num_classes"):
            if _meta(h, key, int) < 0:
                raise WireError("schema", f"hello: {key} must be >= 0")
        _meta(h, "codec", str)
    elif kind == "upload_done":
        _meta(h, "num_samples", int)
        _meta(h, "num_chunks", int)
        _meta(h, "upload_id", str)
    elif kind == "ack":
        ids = _meta(h, "msg_ids", list)
        if not ids or len(ids) > 1024 or not all(isinstance(i, str) for i in ids):
            raise WireError("schema", "ack: msg_ids must be 1-1024 strings")
    elif kind == "logits_request":
        _meta(h, "round", int)
    elif kind == "round":
        if _meta(h, "state", str) not in ROUND_STATES:
            raise WireError("schema", f"round: state must be one of {ROUND_STATES}")
    for name, (_, arr) in specs.items():
        if arr is not None and kind in ("features", "logits") and name in ("ids", "labels"):
            if arr.size and arr.min() < 0:
                raise WireError("schema", f"{kind}: negative {name}")


# Kind -> exact set of tensor names (None: free names, checked per kind above).
SCHEMAS: dict[str, set[str] | None] = {
    "hello": set(),
    "features": {"ids", "labels", "logits", "features"},
    "upload_done": set(),
    "extractor": None,
    "ack": set(),
    "logits": {"ids", "logits"},
    "logits_request": set(),
    "round": set(),
}


def chunk_sizes(n_samples: int, bytes_per_sample: int, max_payload: int,
                header_room: int = 8192) -> list[int]:
    """Samples per message so each fits ``max_payload`` (the broker's packet limit)."""
    room = max_payload - header_room
    if bytes_per_sample > room:
        raise ValueError(f"one sample ({bytes_per_sample} bytes) does not fit a "
                         f"{max_payload}-byte message; raise the broker's max packet size")
    per = max(1, room // bytes_per_sample)
    return [min(per, n_samples - s) for s in range(0, n_samples, per)]
