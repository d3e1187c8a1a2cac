import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime import topics, wire
from edge_runtime.models import FEATURE_CHANNELS
from edge_runtime.wire import WireError, decode_message, encode_message

MAX = 1 << 22


def features_msg(k=5, codec="q8", **kw) -> bytes:
    rng = np.random.default_rng(0)
    tensors = {
        "ids": (np.arange(k, dtype=np.int64) + 100, "exact"),
        "labels": (np.arange(k, dtype=np.int64) % 10, "exact"),
        "logits": (rng.normal(size=(k, 10)).astype(np.float32), "fp32"),
        "features": (np.maximum(rng.normal(size=(k, 16, 8, 8)), 0).astype(np.float32), codec),
    }
    tensors.update(kw.pop("tensors", {}))
    return encode_message("features", "dev0", 3, tensors, msg_id="r3-ab:0", chunk=0, chunks=2,
                          **kw)


def reason(data: bytes, **kw) -> str:
    with pytest.raises(WireError) as err:
        decode_message(data, max_bytes=kw.pop("max_bytes", MAX), **kw)
    return err.value.reason


def rebuild(data: bytes, edit) -> bytes:
    """Decode the JSON header, let ``edit`` change it, re-frame (crc recomputed unless edited)."""
    _, version, hlen = struct.unpack_from(">3sBI", data)
    header = json.loads(data[8:8 + hlen])
    payload = data[8 + hlen:]
    edited = edit(header, payload)
    payload = edited if isinstance(edited, bytes) else payload
    raw = json.dumps(header).encode()
    return struct.pack(">3sBI", b"GKT", version, len(raw)) + raw + payload


def test_features_round_trip():
    msg = decode_message(features_msg(), max_bytes=MAX)
    assert (msg.kind, msg.device, msg.round, msg.chunk, msg.chunks) == ("features", "dev0", 3,
                                                                        0, 2)
    assert msg.tensors["ids"].tolist() == [100, 101, 102, 103, 104]
    assert msg.tensors["features"].shape == (5, 16, 8, 8)
    assert wire.FEATURE_CHANNELS == FEATURE_CHANNELS


@pytest.mark.parametrize("kind, tensors, meta", [
    ("hello", {}, {"num_samples": 10, "num_classes": 10, "codec": "q8"}),
    ("upload_done", {}, {"num_samples": 10, "num_chunks": 2, "upload_id": "r0-x"}),
    ("ack", {}, {"msg_ids": ["a:1", "a:2"]}),
    ("logits_request", {}, {"round": 2}),
    ("round", {}, {"state": "collect", "deadline": 123.0}),
    ("logits", {"ids": (np.arange(3), "exact"), "logits": (np.ones((3, 10), np.float32), "fp32")},
     {}),
    ("extractor", {"0.weight": (np.ones((16, 3, 3, 3), np.float32), "exact"),
                   "1.num_batches_tracked": (np.array(7), "exact")}, {}),
])
def test_every_kind_round_trips(kind, tensors, meta):
    data = encode_message(kind, "dev-1", 2, tensors, msg_id="m1", meta=meta)
    msg = decode_message(data, max_bytes=MAX)
    assert msg.kind == kind and msg.meta == meta
    for name, (arr, _) in tensors.items():
        assert np.array_equal(msg.tensors[name], arr)


def test_rejections_name_their_reason():
    good = features_msg()
    assert reason(b"XYZ" + good[3:]) == "bad_magic"
    assert reason(good[:3] + bytes([9]) + good[4:]) == "bad_version"
    assert reason(good[:6]) == "truncated"
    assert reason(good[:-10]) == "truncated"
    assert reason(good + b"extra") == "truncated"
    assert reason(good, max_bytes=100) == "too_large"
    assert reason(good[:8] + b"{not json" + good[17:]) == "bad_header"
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    assert reason(bytes(flipped)) == "checksum"
    assert reason(rebuild(good, lambda h, p: h.update(kind="pickle"))) == "unknown_kind"
    assert reason(rebuild(good, lambda h, p: h.update(round=-1))) == "bad_header"
    assert reason(rebuild(good, lambda h, p: h.update(chunk=5))) == "bad_header"
    assert reason(rebuild(good, lambda h, p: h.update(device="a/b"))) == "bad_header"
    assert reason(rebuild(good, lambda h, p: h.pop("crc32"))) == "bad_header"


def test_shape_and_dtype_lies_are_caught():
    def set_spec(name, **kv):
        def edit(h, p):
            next(s for s in h["tensors"] if s["name"] == name).update(kv)
        return edit

    good = features_msg()
    assert reason(rebuild(good, set_spec("features", shape=[5, 16, 8, 9]))) == "shape"
    assert reason(rebuild(good, set_spec("features", shape=[5, 16, 4, 4]))) == "shape"
    assert reason(rebuild(good, set_spec("ids", dtype="int32"))) in ("shape", "dtype")
    assert reason(rebuild(good, set_spec("ids", dtype="object"))) == "dtype"
    assert reason(rebuild(good, set_spec("features", shape=[2**30, 16, 8, 8]))) == "too_large"
    assert reason(rebuild(good, set_spec("features", codec="pickle"))) == "bad_header"


def test_schema_violations():
    wrong_channels = np.zeros((5, 8, 8, 8), np.float32)
    with pytest.raises(WireError, match=r"\[k, 16, S, S\]"):
        features_msg(tensors={"features": (wrong_channels, "q8")})
    with pytest.raises(WireError) as err:
        features_msg(tensors={"ids": (np.arange(4, dtype=np.int64), "exact")})
    assert err.value.reason == "shape"
    with pytest.raises(WireError) as err:
        encode_message("hello", "d", 0, {}, msg_id="h", meta={"num_classes": 10})
    assert err.value.reason == "schema"
    with pytest.raises(WireError) as err:
        encode_message("round", "hub", 0, {}, msg_id="r", meta={"state": "explode"})
    assert err.value.reason == "schema"


def test_nan_and_inf_are_rejected():
    logits = np.full((5, 10), np.nan, np.float32)
    data = features_msg(tensors={"logits": (logits, "fp32")})
    assert reason(data) == "nonfinite"
    inf = np.ones((5, 16, 8, 8), np.float32)
    inf[0, 0, 0, 0] = np.inf
    assert reason(features_msg(tensors={"features": (inf, "fp32")})) == "nonfinite"


def test_chunk_sizes_fit_the_packet_limit():
    sizes = wire.chunk_sizes(1000, 4152, 256 * 1024)
    assert sum(sizes) == 1000 and max(sizes) * 4152 <= 256 * 1024 - 8192
    with pytest.raises(ValueError, match="does not fit"):
        wire.chunk_sizes(10, 300_000, 256 * 1024)


def test_topics():
    assert topics.up("dev0") == "gkt/v1/dev/dev0/up"
    assert topics.device_from_topic("gkt/v1/dev/dev0/up") == "dev0"
    for bad in ("a/b", "+", "#", "", "x" * 65, "$SYS"):
        with pytest.raises(ValueError, match="device id"):
            topics.validate_device_id(bad)
    with pytest.raises(WireError):
        topics.device_from_topic("gkt/v1/dev/dev0/down")


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_random_bytes_only_ever_raise_wire_error(data):
    try:
        decode_message(data, max_bytes=MAX)
    except WireError:
        pass


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_messages_only_ever_raise_wire_error(data):
    good = bytearray(features_msg(k=3, codec=data.draw(st.sampled_from(["fp32", "q8", "q4"]))))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(good) - 1))
        if op == "flip":
            good[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del good[i:i + data.draw(st.integers(1, 64))]
        else:
            good[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        if not good:
            break
    try:
        msg = decode_message(bytes(good), max_bytes=MAX)
    except WireError:
        return
    assert msg.kind in wire.SCHEMAS  # a mutation that still validates is a valid message
