"""What each kind of message must hold: tensor names, codecs, dtypes, shapes, meta keys,
and the values only decoded arrays show. ``wire`` runs these on every message it encodes
or decodes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.protocol.codecs import FEATURE_CODECS
from edge_runtime.protocol.errors import WireError
from edge_runtime.protocol.limits import MIN_PAYLOAD

if TYPE_CHECKING:
    from edge_runtime.protocol.wire import Message, TensorSpec

FEATURE_CHANNELS = 16  # channels of H; equals edge_runtime.learning.models.FEATURE_CHANNELS
MAX_FEATURE_SIZE = 512  # largest S of a [k, 16, S, S] feature chunk
MAX_CLASSES = 100_000
MAX_ACK_IDS = 512  # 512 ids of 64 characters fit the header limit
ROUND_STATES = ("collect", "train", "done", "stop", "async")  # async: no rounds (docs/async.md)
_MSG_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_INT32 = 2**31 - 1
MODEL_VARIANTS = ("fp32", "int8")  # a delivered model: the composed graph, fp32 or int8 QDQ
MAX_MODEL_BYTES = 512 * 1024 * 1024  # an ONNX protobuf cannot exceed 2 GB; ours are ~1-5 MB
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_REASON = re.compile(r"[a-z0-9_]{1,64}")


_FEATURES = {(c, "float32") for c in (*FEATURE_CODECS, "s8")}  # s8: residuals (needs base)
_LOGITS = {("exact", "float32"), ("fp32", "float32"), ("fp16", "float32"), ("s8", "float32")}
_INT64 = {("exact", "int64"), ("delta", "int64")}
_WEIGHTS = {("exact", "float32"), ("exact", "int64")}
_TENSORS = {  # kind -> tensor name -> (allowed (codec, dtype), rank)
    "features": {"ids": (_INT64, 1), "labels": (_INT64, 1), "logits": (_LOGITS, 2),
                 "features": (_FEATURES, 4)},
    "logits": {"ids": (_INT64, 1), "logits": (_LOGITS, 2)},
}
_MODEL = {"data": ({("exact", "uint8")}, 1)}  # a slice of the ONNX file, bytes as they are


def check_schema(m: Message) -> None:
    """What the header alone shows: tensor names, codecs, dtypes, shapes, and meta."""
    specs = {s.name: s for s in m.specs}
    if m.kind == "extractor":
        if not specs:
            raise WireError("schema", "extractor: no tensors")
        for s in m.specs:
            _check_tensor(m.kind, s, _WEIGHTS, None)
            if len(s.shape) > 4:
                raise WireError("shape", f"extractor: {s.name} has rank {len(s.shape)} > 4")
    else:
        expected = _MODEL if m.kind == "model" else _TENSORS.get(m.kind, {})
        if m.kind == "features" and "rows" in specs:  # features for only these rows
            expected = {**expected, "rows": (_INT64, 1)}
        if m.kind == "features" and "logits" not in specs:  # a hub that does not distil
            expected = {k: v for k, v in expected.items() if k != "logits"}
        if set(specs) != set(expected):
            raise WireError("schema", f"{m.kind}: tensors {sorted(specs)}, expected "
                                      f"{sorted(expected)}")
        for name, (allowed, rank) in expected.items():
            _check_tensor(m.kind, specs[name], allowed, rank)
    if m.kind in _TENSORS:
        partial = "rows" in specs
        firsts = {n: s.shape[0] for n, s in specs.items() if not (partial and n in (
            "rows", "features"))}
        if len(set(firsts.values())) != 1:
            raise WireError("shape", f"{m.kind}: first dimensions differ: {firsts}")
        if "logits" in specs and not 1 <= specs["logits"].shape[1] <= MAX_CLASSES:
            raise WireError("shape", f"{m.kind}: {specs['logits'].shape[1]} classes")
    if m.kind == "features":
        shape = specs["features"].shape
        if specs["ids"].shape[0] == 0 or (shape[0] == 0 and "rows" not in specs):
            raise WireError("shape", "features: empty chunk")
        if "rows" in specs and not (specs["rows"].shape[0] == shape[0] <= specs["ids"].shape[0]):
            raise WireError("shape", f"features: {shape[0]} feature rows for "
                                     f"{specs['rows'].shape[0]} row indices of "
                                     f"{specs['ids'].shape[0]} samples")
        depends = "rows" in specs or specs["features"].codec == "s8"
        base = m.meta.get("base")
        if depends and not (isinstance(base, str) and _MSG_ID.fullmatch(base)):
            raise WireError("schema", "features: omitted rows or s8 residuals need meta "
                                      "'base', the feature epoch they build on")
        if shape[1] != FEATURE_CHANNELS or shape[2] != shape[3] or not (
                1 <= shape[2] <= MAX_FEATURE_SIZE):
            raise WireError("shape", f"features: must be [k, {FEATURE_CHANNELS}, S, S] with "
                                     f"1 <= S <= {MAX_FEATURE_SIZE}, got {list(shape)}")
    _check_meta(m.kind, m.meta)
    if m.kind == "model":  # meta is checked: offset and total_bytes are integers
        n = specs["data"].shape[0]
        if n == 0 or m.meta["offset"] + n > m.meta["total_bytes"]:
            raise WireError("shape", f"model: {n} bytes at offset {m.meta['offset']} do not "
                                     f"fit {m.meta['total_bytes']} total bytes")


def _check_tensor(kind: str, s: TensorSpec, allowed: set, rank: int | None) -> None:
    if (s.codec, s.dtype) not in allowed:
        dtypes = sorted({d for _, d in allowed})
        reason = "dtype" if s.dtype not in dtypes else "schema"
        raise WireError(reason, f"{kind}: {s.name} is {s.dtype} via {s.codec}; allowed: "
                                f"{sorted(allowed)}")
    if rank is not None and len(s.shape) != rank:
        raise WireError("shape", f"{kind}: {s.name} must have rank {rank}, got "
                                 f"{list(s.shape)}")


def _check_meta(kind: str, meta: dict) -> None:
    """Required meta keys per kind; other keys pass through (meta is the extension point)."""
    if kind == "hello":
        _meta_int(kind, meta, "num_samples", 0, _INT32)
        _meta_int(kind, meta, "num_classes", 1, MAX_CLASSES)
        if meta.get("codec") not in FEATURE_CODECS:
            raise WireError("schema", f"hello: codec must be one of {', '.join(FEATURE_CODECS)}")
        if "image_size" in meta:  # optional for now: older devices do not send it
            _meta_int(kind, meta, "image_size", 1, 4096)
        if "max_payload" in meta:  # the largest message the device takes (optional)
            _meta_int(kind, meta, "max_payload", MIN_PAYLOAD, _INT32)
    elif kind == "upload_done":
        _meta_int(kind, meta, "num_samples", 0, _INT32)
        _meta_int(kind, meta, "num_chunks", 0, _INT32)
        if not isinstance(meta.get("upload_id"), str) or not _MSG_ID.fullmatch(
                meta["upload_id"]):
            raise WireError("schema", "upload_done: upload_id must be 1-64 of A-Z a-z 0-9 "
                                      "_ . : -")
        _meta_epoch(kind, meta, "epoch")
    elif kind == "logits":
        _meta_epoch(kind, meta, "feature_epoch")
    elif kind == "ack":
        ids = meta.get("msg_ids")
        if not (isinstance(ids, list) and 1 <= len(ids) <= MAX_ACK_IDS and all(
                isinstance(i, str) and _MSG_ID.fullmatch(i) for i in ids)):
            raise WireError("schema", f"ack: msg_ids must be 1-{MAX_ACK_IDS} message ids")
    elif kind == "logits_request":
        _meta_int(kind, meta, "round", 0, _INT32)
    elif kind in ("model", "model_ack"):
        if meta.get("variant") not in MODEL_VARIANTS:
            raise WireError("schema", f"{kind}: variant must be one of "
                                      f"{', '.join(MODEL_VARIANTS)}")
        if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            raise WireError("schema", f"{kind}: sha256 must be 64 lowercase hex digits")
        _meta_int(kind, meta, "total_bytes", 1, MAX_MODEL_BYTES)
        if kind == "model":
            _meta_int(kind, meta, "offset", 0, MAX_MODEL_BYTES - 1)
    elif kind == "round":
        if meta.get("state") not in ROUND_STATES:
            raise WireError("schema", f"round: state must be one of {', '.join(ROUND_STATES)}")
        deadline = meta.get("deadline", "missing")
        if deadline is not None and (isinstance(deadline, (bool, str)) or not isinstance(
                deadline, (int, float)) or deadline < 0):
            raise WireError("schema", "round: deadline must be unix seconds or null")
        if not isinstance(meta.get("config", {}), dict):
            raise WireError("schema", "round: config must be an object")
        for key in ("run", "hub", "sig"):  # run id, hub instance nonce, signature
            if key in meta and not (isinstance(meta[key], str) and _TOKEN.fullmatch(meta[key])):
                raise WireError("schema", f"round: {key} must be 1-128 of A-Z a-z 0-9 _ . : -")
    elif kind == "reject":
        if not (isinstance(meta.get("reason"), str) and _REASON.fullmatch(meta["reason"])):
            raise WireError("schema", "reject: reason must be 1-64 of a-z 0-9 _")
        if not isinstance(meta.get("detail"), str) or len(meta["detail"]) > 1000:
            raise WireError("schema", "reject: detail must be a string of at most 1000")
        if not isinstance(meta.get("fatal"), bool):
            raise WireError("schema", "reject: fatal must be true or false")
        refused = meta.get("refused")
        if not (isinstance(refused, str) and (refused == "" or _MSG_ID.fullmatch(refused))):
            raise WireError("schema", "reject: refused must be a message id or empty")


def _meta_epoch(kind: str, meta: dict, key: str) -> None:
    """Optional feature epoch (docs/uplink.md): a message id-like string or null."""
    v = meta.get(key)
    if v is not None and not (isinstance(v, str) and _MSG_ID.fullmatch(v)):
        raise WireError("schema", f"{kind}: meta {key!r} must be 1-64 of A-Z a-z 0-9 _ . : - "
                                  "or null")


def _meta_int(kind: str, meta: dict, key: str, lo: int, hi: int) -> None:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise WireError("schema", f"{kind}: meta {key!r} must be an integer in [{lo}, {hi}], "
                                  f"got {str(v)[:40]!r}")


def check_values(m: Message, arrays: dict[str, np.ndarray]) -> None:
    """What only the decoded arrays show (codecs already refuse NaN and Inf)."""
    if m.kind not in _TENSORS:
        return
    ids = arrays["ids"]
    if ids.size and ids.min() < 0:
        raise WireError("schema", f"{m.kind}: negative sample id")
    if len(np.unique(ids)) != len(ids):
        raise WireError("schema", f"{m.kind}: duplicate sample ids")
    if m.kind == "features":
        rows = arrays.get("rows")
        if rows is not None and rows.size and (rows.min() < 0 or rows.max() >= len(ids) or (
                np.diff(rows) <= 0).any()):
            raise WireError("schema", "features: rows must increase within the chunk")
        labels = arrays["labels"]
        if labels.size and labels.min() < 0:
            raise WireError("schema", "features: negative label")
        if "logits" in arrays and labels.size and labels.max() >= arrays["logits"].shape[1]:
            raise WireError("schema", f"features: labels outside [0, {arrays['logits'].shape[1]})")
