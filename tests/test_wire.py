import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.learning.models import FEATURE_CHANNELS
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.codecs import encode_array
from edge_runtime.protocol.limits import HEADER_ROOM
from edge_runtime.protocol.wire import WireError, chunk_sizes, decode_message, encode_message

MAX = 1 << 22


def feature_tensors(k=5, codec="q8", classes=10, size=8):
    rng = np.random.default_rng(0)
    return {
        "ids": (np.arange(k, dtype=np.int64) + 100, "exact"),
        "labels": (np.arange(k, dtype=np.int64) % classes, "exact"),
        "logits": (rng.normal(size=(k, classes)).astype(np.float32), "fp32"),
        "features": (np.maximum(rng.normal(size=(k, 16, size, size)), 0).astype(np.float32),
                     codec),
    }


def features_msg(k=5, codec="q8", **overrides) -> bytes:
    tensors = feature_tensors(k, codec)
    tensors.update(overrides)
    return encode_message("features", "dev0", 3, tensors, msg_id="r3-ab:0", chunk=0, chunks=2)


def split(data: bytes) -> tuple[dict, bytes]:
    _, _, hlen = struct.unpack_from(">3sBI", data)
    return json.loads(data[8:8 + hlen]), data[8 + hlen:]


def frame(header, payload=b"", *, version=1, crc=True) -> bytes:
    """Frame a (possibly hostile) header and payload; crc=True fixes the checksum."""
    if crc and isinstance(header, dict):
        header = dict(header, crc32=zlib.crc32(payload))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">3sBI", b"GKT", version, len(raw)) + raw + payload


def edit(data: bytes, fn, payload: bytes | None = None) -> bytes:
    """Let ``fn`` change the header of a valid message, then re-frame it."""
    header, old = split(data)
    fn(header)
    return frame(header, old if payload is None else payload)


def edit_spec(data: bytes, tensor: str, **fields) -> bytes:
    return edit(data, lambda h: next(s for s in h["tensors"] if s["name"] == tensor)
                .update(fields))


def reason(data: bytes, **kw) -> str:
    with pytest.raises(WireError) as err:
        decode_message(data, max_bytes=kw.pop("max_bytes", MAX), **kw)
    assert str(err.value)  # every rejection says what was wrong
    return err.value.reason


def encode_reason(*args, **kw) -> str:
    with pytest.raises(WireError) as err:
        encode_message(*args, **kw)
    return err.value.reason


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["fp32", "fp16", "q8", "q4"])
def test_feature_chunks_round_trip(codec):
    sent = feature_tensors(codec=codec)
    msg = decode_message(features_msg(codec=codec), max_bytes=MAX)
    assert (msg.kind, msg.device, msg.round, msg.msg_id, msg.chunk, msg.chunks, msg.v) == (
        "features", "dev0", 3, "r3-ab:0", 0, 2, wire.PROTOCOL_VERSION)
    assert msg.meta == {}
    for name in ("ids", "labels", "logits"):
        assert msg.tensors[name].dtype == sent[name][0].dtype
        assert np.array_equal(msg.tensors[name], sent[name][0])
    feats = msg.tensors["features"]
    assert feats.dtype == np.float32 and feats.shape == (5, 16, 8, 8)
    assert np.abs(feats - sent["features"][0]).max() <= sent["features"][0].max() / 15
    assert [s.name for s in msg.specs] == ["ids", "labels", "logits", "features"]
    assert msg.specs[3].codec == codec and msg.specs[3].shape == (5, 16, 8, 8)
    assert wire.FEATURE_CHANNELS == FEATURE_CHANNELS


def test_a_features_chunk_may_leave_the_logits_out():
    tensors = {k: v for k, v in feature_tensors().items() if k != "logits"}
    msg = decode_message(encode_message("features", "dev0", 3, tensors, msg_id="r3-ab:0"),
                         max_bytes=MAX)
    assert "logits" not in msg.tensors and [s.name for s in msg.specs] == [
        "ids", "labels", "features"]
    bad = dict(tensors, labels=(np.array([0, 1, -2, 3, 4], np.int64), "exact"))
    assert encode_reason("features", "d", 0, bad, msg_id="a") == "schema"
    # the hub -> device logits message still needs them
    assert encode_reason("logits", "d", 0, {"ids": tensors["ids"]}, msg_id="a") == "schema"


def test_logits_may_travel_as_fp16_and_decode_to_float32():
    logits = np.random.default_rng(1).normal(size=(5, 10)).astype(np.float32)
    msg = decode_message(features_msg(logits=(logits, "fp16")), max_bytes=MAX)
    assert msg.tensors["logits"].dtype == np.float32
    assert np.allclose(msg.tensors["logits"], logits, rtol=2**-11, atol=0)


EXTRACTOR = {"0.weight": (np.ones((16, 3, 3, 3), np.float32), "exact"),
             "1.running_mean": (np.zeros(16, np.float32), "exact"),
             "1.num_batches_tracked": (np.array(7, dtype=np.int64), "exact")}


@pytest.mark.parametrize("kind, tensors, meta", [
    ("hello", {}, {"num_samples": 10, "num_classes": 10, "codec": "q8", "image_size": 32}),
    ("upload_done", {}, {"num_samples": 10, "num_chunks": 2, "upload_id": "r0-x"}),
    ("extractor", EXTRACTOR, {}),
    ("ack", {}, {"msg_ids": ["a:1", "a:2"]}),
    ("logits", {"ids": (np.arange(3), "exact"), "logits": (np.ones((3, 10), np.float32), "fp32")},
     {}),
    ("logits", {"ids": (np.arange(0), "exact"),
                "logits": (np.ones((0, 10), np.float32), "fp32")}, {}),
    ("logits_request", {}, {"round": 2}),
    ("round", {}, {"state": "collect", "deadline": 1.7e9, "config": {"epochs": 20}}),
    ("round", {}, {"state": "stop", "deadline": None}),
])
def test_every_kind_round_trips(kind, tensors, meta):
    data = encode_message(kind, "dev-1", 2, tensors, msg_id="m1", meta=meta)
    msg = decode_message(data, max_bytes=MAX)
    assert (msg.kind, msg.device, msg.round, msg.meta) == (kind, "dev-1", 2, meta)
    assert list(msg.tensors) == list(tensors)
    for name, (arr, _) in tensors.items():
        assert msg.tensors[name].dtype == arr.dtype and np.array_equal(msg.tensors[name], arr)


def test_features_chunk_of_a_32x32_batch_is_self_contained_and_small():
    data = encode_message("features", "d", 0, feature_tensors(k=64, codec="q8", size=32),
                          msg_id="u:0")
    assert len(data) < 64 * 65536 / 3  # q8 + zstd: well under a third of raw fp32
    assert decode_message(data, max_bytes=len(data)).tensors["features"].shape == (
        64, 16, 32, 32)


# -- rejections: one test per reason -------------------------------------------------------


def test_bad_magic():
    assert reason(b"\x80\x04pickle-bytes") == "bad_magic"
    assert reason(b"XYZ" + features_msg()[3:]) == "bad_magic"


def test_bad_version():
    good = features_msg()
    assert reason(good[:3] + bytes([2]) + good[4:]) == "bad_version"
    header, payload = split(good)
    assert reason(frame(dict(header, v=2), payload)) == "bad_version"  # header disagrees


def test_bad_header():
    good = features_msg()
    header, payload = split(good)
    cases = {
        "not json": b"{not json",
        "not utf-8": json.dumps(header).encode("utf-16"),
        "not an object": b"[1, 2]",
        "NaN": json.dumps(dict(header, meta={"x": float("nan")})).encode(),
        "1e999": json.dumps(header).replace('"meta": {}', '"meta": {"x": 1e999}').encode(),
        "huge int": json.dumps(dict(header, round=10**30)).encode(),
        "duplicate key": json.dumps(header)[:-1].encode() + b', "kind": "ack"}',
        "deep nesting": json.dumps(header)[:-1].encode() + b', "x": ' + b"[" * 30000 + b"}",
    }
    for name, raw in cases.items():
        assert reason(frame(raw, payload)) == "bad_header", name
    for change in ({"round": -1}, {"round": "3"}, {"round": True}, {"chunk": 2},
                   {"chunks": 0}, {"device": "a/b"}, {"device": "$SYS"}, {"msg_id": ""},
                   {"msg_id": "x" * 65}, {"msg_id": "a b"}, {"meta": []},
                   {"tensors": {}}, {"extra": 1}):
        assert reason(edit(good, lambda h, c=change: h.update(c))) == "bad_header", change
    for crc in (2**32, -1, "0"):
        assert reason(frame(dict(header, crc32=crc), payload, crc=False)) == "bad_header"
    assert reason(frame({k: v for k, v in header.items() if k != "crc32"}, payload,
                        crc=False)) == "bad_header"
    assert reason(edit_spec(good, "features", codec="pickle")) == "bad_header"
    assert reason(edit_spec(good, "ids", nbytes=-1)) == "bad_header"
    assert reason(edit_spec(good, "ids", name="../x")) == "bad_header"
    assert reason(edit(good, lambda h: h["tensors"][1].update(name="ids"))) == "bad_header"
    assert reason(edit(good, lambda h: h["tensors"][0].pop("nbytes"))) == "bad_header"
    assert encode_reason("ack", "d", 0, {}, msg_id="a", meta={"x": object()}) == "bad_header"


def test_unknown_kind():
    good = features_msg()
    assert reason(edit(good, lambda h: h.update(kind="pickle"))) == "unknown_kind"
    assert encode_reason("pickle", "d", 0, {}, msg_id="a") == "unknown_kind"


def test_schema():
    good = features_msg()
    ft = feature_tensors()
    missing = {k: v for k, v in ft.items() if k != "labels"}
    assert encode_reason("features", "d", 0, missing, msg_id="a") == "schema"
    extra = dict(ft, more=(np.zeros(5, np.int64), "exact"))
    assert encode_reason("features", "d", 0, extra, msg_id="a") == "schema"
    assert encode_reason("hello", "d", 0, {"x": (np.zeros(1), "exact")}, msg_id="a",
                         meta={"num_samples": 1, "num_classes": 10, "codec": "q8"}) == "schema"
    assert encode_reason("extractor", "d", 0, {}, msg_id="a") == "schema"
    # A quantizer would clamp negative logits: only fp32/fp16/exact float32 are allowed.
    assert reason(edit_spec(good, "logits", codec="q8")) == "schema"
    for meta in ({"num_classes": 10, "codec": "q8"},
                 {"num_samples": -1, "num_classes": 10, "codec": "q8"},
                 {"num_samples": 1, "num_classes": True, "codec": "q8"},
                 {"num_samples": 1, "num_classes": 10, "codec": "zip"},
                 {"num_samples": 1, "num_classes": 10, "codec": "q8", "image_size": 0},
                 {"num_samples": 1, "num_classes": 10, "codec": "q8", "max_payload": 1000}):
        assert encode_reason("hello", "d", 0, {}, msg_id="h", meta=meta) == "schema", meta
    bad_metas = [
        ("upload_done", {"num_samples": 1, "num_chunks": 1}),
        ("upload_done", {"num_samples": 1, "num_chunks": 1, "upload_id": "a/b"}),
        ("ack", {"msg_ids": []}),
        ("ack", {"msg_ids": ["ok", 3]}),
        ("ack", {"msg_ids": ["a"] * (wire.MAX_ACK_IDS + 1)}),
        ("logits_request", {}),
        ("round", {"state": "explode", "deadline": None}),
        ("round", {"state": "train"}),
        ("round", {"state": "train", "deadline": "soon"}),
        ("round", {"state": "train", "deadline": None, "config": [1]}),
    ]
    for kind, meta in bad_metas:
        assert encode_reason(kind, "hub", 0, {}, msg_id="m", meta=meta) == "schema", meta


def test_values_that_break_the_schema():
    for name, arr in (("ids", np.array([1, 2, 3, 4, -1])), ("ids", np.array([1, 2, 3, 4, 1])),
                      ("labels", np.array([0, 1, 2, 3, 10]))):
        bad = dict(feature_tensors(), **{name: (arr.astype(np.int64), "exact")})
        assert encode_reason("features", "d", 0, bad, msg_id="a") == "schema", (name, arr)
    # The decoder checks values itself, not only the sender.
    good = features_msg()
    header, payload = split(good)
    ids_blob = encode_array(np.array([7, 7, 7, 7, 7], np.int64))
    old_ids = header["tensors"][0]["nbytes"]
    header["tensors"][0]["nbytes"] = len(ids_blob)
    assert reason(frame(header, ids_blob + payload[old_ids:])) == "schema"


def test_checksum():
    flipped = bytearray(features_msg())
    flipped[-5] ^= 0xFF
    assert reason(bytes(flipped)) == "checksum"


def test_truncated():
    good = features_msg()
    assert reason(b"") == "truncated"
    assert reason(good[:6]) == "truncated"
    assert reason(good[:20]) == "truncated"  # header cut
    assert reason(good[:-10]) == "truncated"  # payload cut


def test_trailing():
    assert reason(features_msg() + b"extra") == "trailing"


def test_too_large():
    good = features_msg()
    assert reason(good, max_bytes=len(good) - 1) == "too_large"
    assert decode_message(good, max_bytes=len(good)).kind == "features"
    assert reason(good, max_elements=5 * 16 * 8 * 8) == "too_large"
    assert reason(struct.pack(">3sBI", b"GKT", 1, wire.MAX_HEADER + 1) + b" " * 70000) == (
        "too_large")
    # Shapes that would need terabytes are refused before anything is allocated ...
    assert reason(edit_spec(good, "features", shape=[2**30, 16, 8, 8])) == "shape"
    assert reason(edit_spec(good, "logits", shape=[5, 2**31 - 1])) == "shape"
    ext = encode_message("extractor", "d", 0, {"w": (np.zeros(4, np.float32), "exact")},
                         msg_id="e")
    assert reason(edit_spec(ext, "w", shape=[2**16, 2**15])) == "too_large"
    # ... including products that overflow int64 (2**64 elements wrap to 0 in numpy).
    assert reason(edit_spec(ext, "w", shape=[2**16] * 4)) == "too_large"
    # A zip bomb whose size matches its shape is legal zstd: max_elements is what stops it.
    bomb = zstd.ZstdCompressor().compress(bytes(4 * 12_500_000))
    header, _ = split(ext)
    header["tensors"][0].update(shape=[12_500_000], nbytes=len(bomb))
    assert len(bomb) < 10_000 and reason(frame(header, bomb)) == "too_large"
    huge_ack = {"msg_ids": ["x" * 64] * wire.MAX_ACK_IDS}
    assert decode_message(encode_message("ack", "d", 0, {}, msg_id="a", meta=huge_ack),
                          max_bytes=MAX).meta == huge_ack
    assert encode_reason("round", "d", 0, {}, msg_id="a", meta={
        "state": "train", "deadline": None, "config": {"x": "y" * 70000}}) == "too_large"


def test_dtype():
    good = features_msg()
    assert reason(edit_spec(good, "ids", dtype="int32")) == "dtype"
    assert reason(edit_spec(good, "ids", dtype="object")) == "dtype"
    assert reason(edit_spec(good, "features", dtype="float16")) == "dtype"
    assert reason(edit_spec(good, "logits", codec="exact", dtype="int64")) == "dtype"
    bad = dict(feature_tensors(), ids=(np.arange(5, dtype=np.int32), "exact"))
    assert encode_reason("features", "d", 0, bad, msg_id="a") == "dtype"
    assert encode_reason("extractor", "d", 0, {"w": (np.zeros(3, np.float16), "exact")},
                         msg_id="e") == "dtype"


def test_shape():
    good = features_msg()
    for name, shape in (("features", [5, 16, 8, 9]), ("features", [5, 8, 8, 8]),
                        ("features", [5, 16, 8]), ("features", [5, 16, 1024, 1024]),
                        ("ids", [4]), ("ids", [5, 1]), ("logits", [5, 0]),
                        ("features", [5, 16, -8, 8]), ("features", [5, 16, 8.0, 8])):
        assert reason(edit_spec(good, name, shape=shape)) == "shape", (name, shape)
    assert reason(edit_spec(good, "ids", shape=[0])) == "shape"  # first dims differ
    empty = feature_tensors()
    empty = {k: (v[0][:0], v[1]) for k, v in empty.items()}
    assert encode_reason("features", "d", 0, empty, msg_id="a") == "shape"
    with pytest.raises(WireError, match=r"\[k, 16, S, S\]"):
        features_msg(features=(np.zeros((5, 8, 8, 8), np.float32), "q8"))


def blobs_of(data: bytes) -> tuple[dict, list[bytes]]:
    header, payload = split(data)
    blobs, off = [], 0
    for spec in header["tensors"]:
        blobs.append(payload[off:off + spec["nbytes"]])
        off += spec["nbytes"]
    return header, blobs


def replace_blob(data: bytes, index: int, blob: bytes) -> bytes:
    """Swap one tensor's blob (nbytes and checksum follow): a well-framed hostile message."""
    header, blobs = blobs_of(data)
    blobs[index] = blob
    header["tensors"][index]["nbytes"] = len(blob)
    return frame(header, b"".join(blobs))


def test_nonfinite():
    nan_logits = zstd.ZstdCompressor().compress(np.full((5, 10), np.nan, "<f4").tobytes())
    assert reason(replace_blob(features_msg(), 2, nan_logits)) == "nonfinite"
    inf_weights = zstd.ZstdCompressor().compress(np.array([1, np.inf, 0, 0], "<f4").tobytes())
    ext = encode_message("extractor", "d", 0, {"w": (np.zeros(4, np.float32), "exact")},
                         msg_id="e")
    assert reason(replace_blob(ext, 0, inf_weights)) == "nonfinite"
    logits = np.full((5, 10), np.inf, np.float32)
    assert encode_reason("features", "d", 0, dict(feature_tensors(), logits=(logits, "fp32")),
                         msg_id="a") == "nonfinite"


def test_corrupt_blob():
    good = features_msg()
    header, blobs = blobs_of(good)
    assert reason(replace_blob(good, 0, bytes(len(blobs[0])))) == "corrupt"
    assert reason(replace_blob(good, 0, blobs[0] + blobs[0])) == "corrupt"  # two frames


def test_blob_that_disagrees_with_its_shape():
    good = features_msg()
    _, blobs = blobs_of(good)
    assert reason(replace_blob(good, 0, encode_array(np.arange(6, dtype=np.int64)))) == (
        "too_large")
    assert reason(replace_blob(good, 0, encode_array(np.arange(4, dtype=np.int64)))) == (
        "truncated")
    bomb = zstd.ZstdCompressor().compress(bytes(50_000_000))
    assert reason(replace_blob(good, 3, bomb)) == "too_large"


def test_reason_codes_are_documented():
    seen = {"bad_magic", "bad_version", "bad_header", "unknown_kind", "schema", "checksum",
            "truncated", "trailing", "too_large", "dtype", "shape", "nonfinite", "corrupt"}
    assert seen == set(wire.REASONS)


# -- chunking and topics -------------------------------------------------------------------


def test_chunk_sizes_fit_the_packet_limit():
    sizes = chunk_sizes(1000, 4152, 256 * 1024)
    assert sum(sizes) == 1000 and max(sizes) * 4152 <= 256 * 1024 - HEADER_ROOM
    assert sizes[:-1] == [sizes[0]] * (len(sizes) - 1) and 0 < sizes[-1] <= sizes[0]
    assert chunk_sizes(0, 100, 1 << 20) == []
    assert chunk_sizes(3, 100, 1 << 20) == [3]
    with pytest.raises(ValueError, match="does not fit"):
        chunk_sizes(10, 300_000, 256 * 1024)
    with pytest.raises(ValueError):
        chunk_sizes(10, 0, 256 * 1024)


def test_a_chunk_built_from_chunk_sizes_fits():
    classes, size, max_payload = 10, 32, 512 * 1024
    per_sample = 16 * size * size * 4 + classes * 4 + 16  # fp32 worst case
    k = chunk_sizes(100, per_sample, max_payload)[0]
    rng = np.random.default_rng(0)
    tensors = feature_tensors(k=k, codec="fp32", size=size)
    tensors["features"] = (rng.random((k, 16, size, size), dtype=np.float32), "fp32")
    data = encode_message("features", "d" * 64, 2**31 - 1, tensors, msg_id="x" * 64,
                          chunk=999_999, chunks=1_000_000)
    assert len(data) <= max_payload


def test_topics():
    assert topics.up("dev0") == "gkt/v1/dev/dev0/up"
    assert topics.down("dev0") == "gkt/v1/dev/dev0/down"
    assert topics.ROUND_TOPIC == "gkt/v1/hub/round"
    assert topics.UP_WILDCARD == "gkt/v1/dev/+/up"
    assert topics.device_from_topic("gkt/v1/dev/pi-4.a_b/up") == "pi-4.a_b"
    assert topics.validate_device_id("x" * 64) == "x" * 64


@pytest.mark.parametrize("bad, problem", [
    ("", "empty"), ("x" * 65, "65 characters"), ("a/b", "level separator"),
    ("+", "wildcard"), ("dev#1", "wildcard"), ("$SYS", "starts with '\\$'"),
    ("dev 1", "' '"), ("dév", "'é'"), (None, "must be a string"),
])
def test_bad_device_ids_say_what_is_wrong(bad, problem):
    with pytest.raises(ValueError, match=problem):
        topics.validate_device_id(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError):
            topics.up(bad)


def test_device_from_topic_takes_only_up_topics():
    for topic in ("gkt/v1/dev/dev0/down", "gkt/v1/dev/dev0/model", "gkt/v1/dev//up",
                  "gkt/v1/dev/a/b/up",
                  "gkt/v2/dev/dev0/up", "gkt/v1/hub/round", "gkt/v1/dev/+/up", ""):
        with pytest.raises(WireError) as err:
            topics.device_from_topic(topic)
        assert err.value.reason == "bad_topic"


# -- fuzzing -------------------------------------------------------------------------------

ALLOC_LIMIT = 16 * 1024 * 1024  # bytes any one decode of these small inputs may allocate


def decode_bounded(data: bytes):
    """Decode under tracemalloc (numpy reports its buffers to it): only WireError may
    escape, and nothing may allocate more than ALLOC_LIMIT."""
    tracemalloc.start()
    try:
        return decode_message(data, max_bytes=MAX)
    except WireError:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < ALLOC_LIMIT, f"decoding {len(data)} bytes allocated {peak}"


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_random_bytes_only_ever_raise_wire_error(data):
    decode_bounded(data)
    decode_bounded(b"GKT\x01" + data)


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_messages_only_ever_raise_wire_error(data):
    codec = data.draw(st.sampled_from(["fp32", "fp16", "q8", "q4"]))
    good = bytearray(features_msg(k=3, codec=codec))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        i = data.draw(st.integers(0, max(len(good) - 1, 0)))
        if op == "flip" and good:
            good[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del good[i:i + data.draw(st.integers(1, 64))]
        elif op == "insert":
            good[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del good[i:]
    msg = decode_bounded(bytes(good))
    assert msg is None or msg.kind in wire.KINDS  # a mutation that validates is a message


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=12)
DIM = st.one_of(st.integers(0, 70), st.integers(-2**63, 2**63), st.sampled_from([2**31 - 1,
                                                                                   2**32]))


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_headers_with_a_valid_frame_only_ever_raise_wire_error(data):
    """Valid framing and checksum, hostile header: shapes, dtypes, codecs, kind, meta."""
    sometimes = st.integers(0, 3).map(lambda i: i == 0)
    codec = data.draw(st.sampled_from(["fp32", "q8", "q4"]))
    header, payload = split(features_msg(k=2, codec=codec))
    if data.draw(sometimes):  # extractor: free tensor names, any rank up to 4
        header["kind"] = "extractor"
        for spec in header["tensors"]:
            spec.update(codec="exact", dtype="float32")
    if data.draw(sometimes):
        header["kind"] = data.draw(st.sampled_from([*wire.KINDS, "nope"]))
    for spec in header["tensors"]:
        if data.draw(st.booleans()):
            spec["shape"] = data.draw(st.lists(DIM, max_size=5))
        if data.draw(sometimes):
            spec["dtype"] = data.draw(st.sampled_from(["int64", "float32", "float16", "uint8",
                                                       "object", "<f4", "V8"]))
        if data.draw(sometimes):
            spec["codec"] = data.draw(st.sampled_from(["exact", "fp32", "fp16", "q8", "q4"]))
    if data.draw(sometimes):
        header["meta"] = data.draw(st.dictionaries(st.sampled_from(
            ["num_samples", "num_classes", "codec", "msg_ids", "round", "state", "deadline",
             "config", "upload_id", "num_chunks"]), JSON, max_size=5))
    raw = json.dumps(header).encode()  # Python writes NaN/Infinity: must be refused
    msg = decode_bounded(frame(raw, payload))
    assert msg is None or msg.kind in wire.KINDS
