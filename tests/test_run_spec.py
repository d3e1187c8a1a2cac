"""The run spec's JSON form: round trips, and hostile or damaged input refused by name."""

from __future__ import annotations

import json

import pytest

from edge_runtime.learning.preprocess import Preprocess, preprocess_of
from edge_runtime.protocol.run_spec import (
    MAX_SPEC_BYTES,
    RunSpec,
    RunSpecError,
    decode_run_spec,
    new_run_id,
)

PRE = Preprocess(32, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)).to_dict()


def spec(**kw) -> RunSpec:
    return RunSpec(**{"run_id": "run-abc123", "classes": ("cat", "dog", "bird"),
                      "preprocess": dict(PRE), **kw})


def test_round_trip_keeps_every_field():
    s = spec(epochs=2, batch_size=64, lr=0.01, temperature=2.0, alpha=0.5, codec="q4",
             codecs=("q4", "q8"), round_deadline=60.0, upload_deadline=120.0,
             model_seed=7, dataset="cifar10", refresh="drift:0.05+delta", logits_codec="s8",
             device_logits=False)
    back = decode_run_spec(s.to_json())
    assert back == s
    assert back.classes == ("cat", "dog", "bird") and back.num_classes == 3
    assert json.loads(s.to_json())["version"] == 1
    assert preprocess_of(back) == Preprocess(32, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25))


def test_new_run_ids_are_valid_and_distinct():
    a, b = new_run_id(), new_run_id()
    assert a != b
    spec(run_id=a)


def test_unknown_version_is_refused_by_name():
    d = json.loads(spec().to_json())
    d["version"] = 2
    with pytest.raises(RunSpecError, match="version 2 is not supported"):
        decode_run_spec(json.dumps(d))
    del d["version"]
    with pytest.raises(RunSpecError, match="version"):
        decode_run_spec(json.dumps(d))


@pytest.mark.parametrize("change, match", [
    ({"classes": []}, "non-empty"),
    ({"classes": ["a", "a"]}, "repeat"),
    ({"classes": ["a", ""]}, "printable"),
    ({"classes": ["a", "b\nc"]}, "printable"),
    ({"classes": "ab"}, "must be a list"),
    ({"classes": ["a", 3]}, "class name"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 1.5}, "epochs"),
    ({"epochs": True}, "epochs"),
    ({"batch_size": -1}, "batch_size"),
    ({"lr": 0}, "lr"),
    ({"lr": "0.1"}, "lr"),
    ({"temperature": 1e9}, "temperature"),
    ({"codec": "gzip"}, "codec"),
    ({"codec": "q4", "codecs": ["q8"]}, "not among"),
    ({"refresh": "freeze:0"}, "refresh policy"),
    ({"refresh": "sometimes"}, "refresh policy"),
    ({"refresh": 5}, "refresh"),
    ({"logits_codec": "q4"}, "logits_codec"),
    ({"device_logits": "yes"}, "device_logits"),
    ({"device_logits": 1}, "device_logits"),
    ({"edge_model": "resnet1000"}, "edge_model"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"run_id": "../etc"}, "run_id"),
    ({"run_id": ""}, "run_id"),
    ({"preprocess": {}}, "preprocess size"),
    ({"preprocess": []}, "preprocess must be an object"),
    ({"preprocess": {**PRE, "size": {"nested": 1}}}, "preprocess size"),
    ({"preprocess": {**PRE, "size": 10**6}}, "preprocess size"),
    ({"preprocess": {**PRE, "mean": [0.5, 0.5]}}, "one value per RGB channel"),
    ({"preprocess": {**PRE, "std": [0, 1, 1]}}, "std must be positive"),
    ({"preprocess": {**PRE, "std": ["1", 1, 1]}}, "finite numbers"),
    ({"preprocess": {**PRE, "resize": "squash"}}, "resize"),
    ({"preprocess": {**PRE, "version": 9}}, "preprocess spec version 9"),
    ({"preprocess": {**PRE, "evil": 1}}, "unknown preprocess fields"),
    ({"surprise": 1}, "unknown fields"),
])
def test_bad_fields_are_refused_with_their_name(change, match):
    d = json.loads(spec().to_json())
    d.update(change)
    with pytest.raises(RunSpecError, match=match):
        decode_run_spec(json.dumps(d).encode())


@pytest.mark.parametrize("payload, match", [
    (b"", "not UTF-8 JSON"),
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (b"null", "JSON object"),
    (b'{"version": 1, "lr": NaN}', "NaN"),
    (b'{"version": 1, "lr": Infinity}', "Infinity"),
    (b"[" * 100_000 + b"]" * 100_000, "too|limit|UTF-8 JSON"),
    (b'{"version": 1}', "lacks"),
    (b" " * (MAX_SPEC_BYTES + 1), "limit"),
])
def test_hostile_payloads_are_refused(payload, match):
    with pytest.raises(RunSpecError, match=match):
        decode_run_spec(payload)


def test_differences_name_what_changed():
    a, b = spec(), spec(classes=("cat", "dog"), lr=0.5)
    diff = a.differences(b)
    assert len(diff) == 1 and diff[0].startswith("classes: ['cat', 'dog', 'bird'] -> ")
    assert a.differences(spec(lr=0.5)) == []  # a training setting is not the identity
