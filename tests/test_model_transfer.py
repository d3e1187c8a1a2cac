"""Model delivery on the wire and on disk: chunking, checksums, hostile chunks, the store's
atomic newest-round-wins rule."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from edge_runtime.device.model_store import current_model, store_model, stored_models
from edge_runtime.protocol import wire
from edge_runtime.protocol.model_transfer import (
    ModelAssembler,
    ModelFile,
    ack_message,
    model_messages,
    request_message,
)

MAX = 64 * 1024


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def decode(payload: bytes) -> wire.Message:
    return wire.decode_message(payload, max_bytes=MAX)


def test_a_model_crosses_in_chunks_in_any_order_with_duplicates():
    model = ModelFile(7, "fp32", blob(300_000))
    msgs = model_messages("dev0", model, MAX, ["fp32", "int8"])
    assert len(msgs) == 6 and all(len(m) <= MAX for m in msgs)
    asm = ModelAssembler()
    order = [3, 0, 5, 3, 1, 4, 0]  # shuffled, with duplicates (QoS 1 redelivery)
    assert all(asm.add(decode(msgs[i])) is None for i in order)
    got = asm.add(decode(msgs[2]))
    assert got == model and got.sha256 == hashlib.sha256(model.data).hexdigest()
    assert decode(msgs[0]).meta["variants"] == ["fp32", "int8"]


def test_a_chunk_with_other_bytes_fails_the_file_checksum():
    model = ModelFile(1, "int8", blob(150_000))
    other = ModelFile(1, "int8", blob(150_000, seed=1))
    good, bad = model_messages("d", model, MAX), model_messages("d", other, MAX)
    # a validly framed chunk of other bytes under the first file's checksum
    forged = decode(bad[1])
    forged_msg = wire.encode_message(
        "model", "d", 1, {"data": (forged.tensors["data"], "exact")}, msg_id="x", chunk=1,
        chunks=len(good), meta=decode(good[1]).meta)
    asm = ModelAssembler()
    for i, m in enumerate(good):
        if i != 1:
            asm.add(decode(m))
    with pytest.raises(wire.WireError) as err:
        asm.add(decode(forged_msg))
    assert err.value.reason == "checksum"


def test_late_chunks_of_an_older_round_do_not_disturb_a_newer_file():
    old, new = ModelFile(2, "fp32", blob(100_000)), ModelFile(3, "fp32", blob(100_000, 1))
    asm = ModelAssembler()
    new_msgs = model_messages("d", new, MAX)
    asm.add(decode(new_msgs[0]))
    for m in model_messages("d", old, MAX):
        assert asm.add(decode(m)) is None
    got = [asm.add(decode(m)) for m in new_msgs[1:]]
    assert got[-1] == new


@pytest.mark.parametrize("meta, reason", [
    ({"variant": "fp16"}, "schema"),
    ({"sha256": "ABC"}, "schema"),
    ({"total_bytes": 0}, "schema"),
    ({"offset": 99_999}, "shape"),  # 10 bytes at 99,999 overrun 100,000
    ({"offset": -1}, "schema"),
])
def test_hostile_model_chunks_are_refused(meta, reason):
    base = {"variant": "fp32", "sha256": "0" * 64, "total_bytes": 100_000, "offset": 0}
    with pytest.raises(wire.WireError) as err:
        wire.encode_message("model", "d", 0, {"data": (np.zeros(10, np.uint8), "exact")},
                            msg_id="m", meta={**base, **meta})
    assert err.value.reason == reason


def test_model_chunks_must_be_uint8_bytes():
    meta = {"variant": "fp32", "sha256": "0" * 64, "total_bytes": 100, "offset": 0}
    with pytest.raises(wire.WireError):
        wire.encode_message("model", "d", 0, {"data": (np.zeros(10, np.float32), "exact")},
                            msg_id="m", meta=meta)


def test_ack_and_request_messages_validate():
    model = ModelFile(4, "int8", b"onnx")
    ack = decode(ack_message("dev1", model))
    assert (ack.kind, ack.round, ack.meta["variant"], ack.meta["sha256"]) == (
        "model_ack", 4, "int8", model.sha256)
    assert decode(request_message("dev1", "n1")).kind == "model_request"


def test_store_keeps_the_newest_round_per_variant_and_replaces_atomically(tmp_path):
    p3 = store_model(tmp_path, ModelFile(3, "fp32", b"three"))
    store_model(tmp_path, ModelFile(3, "int8", b"three-int8"))
    assert current_model(tmp_path) == p3 and p3.read_bytes() == b"three"
    assert store_model(tmp_path, ModelFile(2, "fp32", b"two")) is None  # older: refused
    p5 = store_model(tmp_path, ModelFile(5, "fp32", b"five"))
    assert current_model(tmp_path) == p5 and not p3.exists()  # the older file is gone
    assert sorted(stored_models(tmp_path, "int8")) == [3]  # int8 untouched until its own
    leftovers = [f for f in os.listdir(p5.parent) if f.startswith(".")]
    assert leftovers == []  # no temporary file left behind
    assert current_model(tmp_path / "nothing") is None


def test_the_hub_reaches_the_exporter_through_a_declared_entry_point():
    """server_hub never imports export/: pyproject declares what find_exporter loads."""
    import importlib
    from pathlib import Path

    import tomllib

    from server_hub.delivery.models import EXPORT_ENTRY_POINT

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (value,) = pyproject["project"]["entry-points"][EXPORT_ENTRY_POINT].values()
    module, _, name = value.partition(":")
    assert getattr(importlib.import_module(module), name).__name__ == "export_for_delivery"
    assert pyproject["project"]["optional-dependencies"]["predict"] == ["onnxruntime>=1.17"]
