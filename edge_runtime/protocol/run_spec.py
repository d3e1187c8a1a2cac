"""The run spec: what the hub decides for the whole federation, and every device adopts.

The hub builds it once from its command line, keeps it in its state dir (the run id
survives restarts) and publishes it retained on ``topics.RUN_TOPIC`` as UTF-8 JSON. A
device waits for it before it builds its model: classes (by name, so no device derives a
label map from its own folder order), edge model and initial weights, the input
preprocessing and the training settings all come from here. What stays on the device:
its data, threads, precision, state dir and credentials.

It crosses the network, so ``decode_run_spec`` trusts nothing: a size cap, exactly the
known keys, types and ranges checked, finite numbers, and a version it knows (an unknown
version is refused by name, never guessed at). Never pickle.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any

from edge_runtime.protocol.codecs import FEATURE_CODEC, FEATURE_CODECS, LOGITS_CODEC, LOGITS_CODECS
from edge_runtime.protocol.refresh_policy import DEFAULT_POLICY, RefreshPolicy

RESIZE_METHODS = ("center_crop", "stretch")  # how images of another shape become squares
PREPROCESS_VERSION = 1

RUN_SPEC_VERSION = 1
MAX_SPEC_BYTES = 256 * 1024
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 128
EDGE_MODELS = ("resnet8",)
OPTIMIZERS = ("adam-amsgrad",)  # the device's AmsgradAdam (edge_runtime/learning/optimizer.py)
DATASETS = ("digits", "cifar10", "cifar100", "cinic10")  # academic datasets (learning/data.py)
_RUN_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
MAX_INPUT_SIZE = 512  # the largest feature map the wire accepts (schema.MAX_FEATURE_SIZE)
# What a saved device state depends on: with any of these changed it cannot resume.
IDENTITY = ("run_id", "classes", "edge_model", "model_seed", "preprocess", "dataset")


class RunSpecError(ValueError):
    """A run spec that does not validate; the message names the field and the problem."""


def new_run_id() -> str:
    return f"run-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    classes: tuple[str, ...]  # label i is classes[i]
    preprocess: dict[str, Any]  # edge_runtime.learning.preprocess.Preprocess.to_dict()
    edge_model: str = "resnet8"
    model_seed: int = 0  # every device starts from the same weights
    epochs: int = 1  # local epochs per round
    batch_size: int = 32
    optimizer: str = "adam-amsgrad"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 3.0
    alpha: float = 1.0  # weight of KD against the hub's logits on the device
    codec: str = FEATURE_CODEC  # feature codec devices use unless they pick another of ``codecs``
    codecs: tuple[str, ...] = FEATURE_CODECS  # codecs the hub accepts
    refresh: str = DEFAULT_POLICY  # which feature maps devices upload (refresh_policy.py)
    logits_codec: str = LOGITS_CODEC  # the logits' codec, both ways
    # devices upload their own logits: only a hub that distils from them (server alpha > 0)
    # asks for them; without, a round after warm-up sends ids and labels alone
    device_logits: bool = True
    round_deadline: float = 300.0  # seconds the hub waits for a round's uploads
    upload_deadline: float = 600.0  # seconds a device keeps resending one upload
    # Academic benchmarks: devices load this dataset (--dataset, with their own data root
    # and shard) instead of a folder; ``classes`` are then its class names.
    dataset: str | None = None
    version: int = RUN_SPEC_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def identity(self) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in IDENTITY}

    def differences(self, other: RunSpec, keys: tuple[str, ...] = IDENTITY) -> list[str]:
        """Human-readable 'field: mine -> theirs' for the ``keys`` that differ."""
        out = []
        for k in keys:
            a, b = _jsonable(getattr(self, k)), _jsonable(getattr(other, k))
            if a != b:
                out.append(f"{k}: {_short(a)} -> {_short(b)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: _jsonable(v) for k, v in asdict(self).items()}
        return {"version": d.pop("version"), **d}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=False, allow_nan=False).encode()


def decode_run_spec(data: bytes | str) -> RunSpec:
    """A RunSpec from its JSON bytes; RunSpecError naming the problem for anything else."""
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, (bytes, bytearray)):
        raise RunSpecError(f"run spec must be bytes, got {type(data).__name__}")
    if len(data) > MAX_SPEC_BYTES:
        raise RunSpecError(f"run spec is {len(data)} bytes; the limit is {MAX_SPEC_BYTES}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RunSpecError(f"run spec is not UTF-8 JSON: {err}") from None
    return run_spec_from_dict(obj)


def run_spec_from_dict(obj: Any) -> RunSpec:
    if not isinstance(obj, dict):
        raise RunSpecError(f"run spec must be a JSON object, got {type(obj).__name__}")
    version = obj.get("version")
    if type(version) is not int:
        raise RunSpecError(f"run spec has no integer 'version' (got {_short(version)})")
    if version != RUN_SPEC_VERSION:
        raise RunSpecError(f"run spec version {version} is not supported: this gkt-edge "
                           f"knows version {RUN_SPEC_VERSION}; install the hub's version "
                           "of the package on this device")
    names = {f.name for f in fields(RunSpec)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise RunSpecError(f"run spec has unknown fields {unknown[:8]}")
    missing = sorted(k for k in ("run_id", "classes", "preprocess") if k not in obj)
    if missing:
        raise RunSpecError(f"run spec lacks {missing}")
    kw = dict(obj)
    for k in ("classes", "codecs"):
        if k in kw:
            if not isinstance(kw[k], list):
                raise RunSpecError(f"run spec {k} must be a list, got {_short(kw[k])}")
            kw[k] = tuple(kw[k])
    try:
        return RunSpec(**kw)
    except TypeError as err:  # a field of the wrong kind that _validate did not reach
        raise RunSpecError(f"run spec: {err}") from None


def _no_constant(name: str) -> None:
    raise RunSpecError(f"run spec holds {name}, which JSON does not allow")


def _validate(s: RunSpec) -> None:
    if type(s.version) is not int or s.version != RUN_SPEC_VERSION:
        raise RunSpecError(f"run spec version {s.version!r} is not {RUN_SPEC_VERSION}")
    if not isinstance(s.run_id, str) or not _RUN_ID.fullmatch(s.run_id):
        raise RunSpecError(f"run_id {_short(s.run_id)} must be 1-64 of a-z 0-9 -")
    _check_classes(s.classes)
    _choice("edge_model", s.edge_model, EDGE_MODELS)
    _choice("optimizer", s.optimizer, OPTIMIZERS)
    _choice("codec", s.codec, FEATURE_CODECS)
    if not isinstance(s.codecs, tuple) or not s.codecs:
        raise RunSpecError("codecs must be a non-empty list")
    for c in s.codecs:
        _choice("codecs entry", c, FEATURE_CODECS)
    if s.codec not in s.codecs:
        raise RunSpecError(f"codec {s.codec!r} is not among the allowed codecs {list(s.codecs)}")
    _choice("logits_codec", s.logits_codec, LOGITS_CODECS)
    if type(s.device_logits) is not bool:
        raise RunSpecError(f"device_logits {_short(s.device_logits)} must be true or false")
    if not isinstance(s.refresh, str) or len(s.refresh) > 64:
        raise RunSpecError(f"refresh {_short(s.refresh)} must be a short policy string")
    try:
        RefreshPolicy.parse(s.refresh)
    except ValueError as err:
        raise RunSpecError(str(err)) from None
    if s.dataset is not None:
        _choice("dataset", s.dataset, DATASETS)
    _int("model_seed", s.model_seed, 0, 2**31 - 1)
    _int("epochs", s.epochs, 1, 1000)
    _int("batch_size", s.batch_size, 1, 65536)
    _num("lr", s.lr, 0.0, 10.0, low_open=True)
    _num("weight_decay", s.weight_decay, 0.0, 1.0)
    _num("temperature", s.temperature, 0.0, 100.0, low_open=True)
    _num("alpha", s.alpha, 0.0, 100.0)
    _num("round_deadline", s.round_deadline, 0.0, 7 * 86400.0, low_open=True)
    _num("upload_deadline", s.upload_deadline, 0.0, 7 * 86400.0, low_open=True)
    _check_preprocess(s.preprocess)


def _check_classes(classes: Any) -> None:
    if not isinstance(classes, tuple) or not classes:
        raise RunSpecError("classes must be a non-empty list of names")
    if len(classes) > MAX_CLASSES:
        raise RunSpecError(f"{len(classes)} classes; the limit is {MAX_CLASSES}")
    for c in classes:
        if not isinstance(c, str) or not c or len(c) > MAX_CLASS_NAME or not c.isprintable():
            raise RunSpecError(f"class name {_short(c)} must be 1-{MAX_CLASS_NAME} printable "
                               "characters")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise RunSpecError(f"class names repeat: {dup[:8]}")


def _check_preprocess(p: Any) -> None:
    """The fields edge_runtime.learning.preprocess.Preprocess takes, checked here so that
    the contract needs no image code."""
    if not isinstance(p, dict):
        raise RunSpecError(f"preprocess must be an object, got {_short(p)}")
    if p.get("version", PREPROCESS_VERSION) != PREPROCESS_VERSION:
        raise RunSpecError(f"preprocess spec version {_short(p.get('version'))} is not "
                           f"supported (this toolkit reads version {PREPROCESS_VERSION})")
    unknown = set(p) - {"version", "size", "mean", "std", "resize"}
    if unknown:
        raise RunSpecError(f"unknown preprocess fields {sorted(unknown)[:8]}")
    if type(p.get("size")) is not int or not 1 <= p["size"] <= MAX_INPUT_SIZE:
        raise RunSpecError(f"preprocess size must be an integer in [1, {MAX_INPUT_SIZE}], "
                           f"got {_short(p.get('size'))}")
    for k in ("mean", "std"):
        v = p.get(k)
        if not isinstance(v, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and abs(x) <= 1e3 for x in v):
            raise RunSpecError(f"preprocess {k} must be a list of finite numbers, got "
                               f"{_short(v)}")
        if len(v) != 3:
            raise RunSpecError(f"preprocess {k} needs one value per RGB channel (3), got "
                               f"{_short(v)}")
    if any(x <= 0 for x in p["std"]):
        raise RunSpecError(f"preprocess std must be positive, got {_short(p['std'])}")
    _choice("preprocess resize", p.get("resize", "center_crop"), RESIZE_METHODS)


def _choice(name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed or not isinstance(v, str):
        raise RunSpecError(f"{name} {_short(v)} is not one of {list(allowed)}")


def _int(name: str, v: Any, lo: int, hi: int) -> None:
    if type(v) is not int or not lo <= v <= hi:
        raise RunSpecError(f"{name} must be an integer in [{lo}, {hi}], got {_short(v)}")


def _num(name: str, v: Any, lo: float, hi: float, low_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo < v if low_open else lo <= v) or v > hi:
        bound = "(" if low_open else "["
        raise RunSpecError(f"{name} must be a finite number in {bound}{lo}, {hi}], "
                           f"got {_short(v)}")


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
