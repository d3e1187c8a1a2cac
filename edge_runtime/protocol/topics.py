"""MQTT topics: a versioned prefix and one subtree per device.

    gkt/v1/dev/{device}/up     device -> hub (hello, feature chunks, extractor, upload_done)
    gkt/v1/dev/{device}/model  device -> hub (model_ack, model_request: model delivery)
    gkt/v1/dev/{device}/down   hub -> device (acks, logits, model chunks)
    gkt/v1/hub/round           hub announcements, retained
    gkt/v1/hub/run             the run spec (protocol/run_spec.py), JSON, retained

With the device id as its MQTT user name, a broker ACL line ``pattern readwrite
gkt/v1/dev/%u/#`` (plus ``pattern read gkt/v1/hub/#``) pins each device to its own
topics, which is why ids may not hold MQTT's special characters.

Model delivery's replies have a topic of their own because hub workers take ``up`` on a
shared subscription (any worker gets any message) while one hub, or rank 0 of the
workers, delivers the models: it alone subscribes to ``MODEL_WILDCARD``, unshared. A hub
still takes ``model_ack`` / ``model_request`` on ``up`` from devices older than this topic.
"""

from __future__ import annotations

import re

from edge_runtime.protocol.errors import WireError

PREFIX = "gkt/v1"
ROUND_TOPIC = f"{PREFIX}/hub/round"
RUN_TOPIC = f"{PREFIX}/hub/run"
UP_WILDCARD = f"{PREFIX}/dev/+/up"
MODEL_WILDCARD = f"{PREFIX}/dev/+/model"
DEVICE_ID_MAX = 64

_DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]+")
_TO_HUB = re.compile(rf"{re.escape(PREFIX)}/dev/([^/]*)/(up|model)")


def validate_device_id(device: str) -> str:
    """``device`` if it is 1-64 characters of A-Z a-z 0-9 _ . -; ValueError naming the
    problem otherwise."""
    if not isinstance(device, str):
        raise ValueError(f"device id must be a string, got {type(device).__name__}")
    if not device:
        raise ValueError("device id is empty")
    if len(device) > DEVICE_ID_MAX:
        raise ValueError(f"device id {device[:16]!r}... is {len(device)} characters; the "
                         f"limit is {DEVICE_ID_MAX}")
    if device.startswith("$"):
        raise ValueError(f"device id {device!r} starts with '$', which MQTT reserves for "
                         "broker topics such as $SYS")
    for ch, why in (("/", "the MQTT level separator"), ("+", "an MQTT wildcard"),
                    ("#", "an MQTT wildcard")):
        if ch in device:
            raise ValueError(f"device id {device!r} contains {ch!r}, {why}")
    if not _DEVICE_ID.fullmatch(device):
        bad = sorted({c for c in device if not _DEVICE_ID.fullmatch(c)})
        raise ValueError(f"device id {device!r} contains {''.join(bad)!r}; use only "
                         "A-Z a-z 0-9 _ . -")
    return device


def up(device: str) -> str:
    """Device -> hub."""
    return f"{PREFIX}/dev/{validate_device_id(device)}/up"


def down(device: str) -> str:
    """Hub -> device."""
    return f"{PREFIX}/dev/{validate_device_id(device)}/down"


def model(device: str) -> str:
    """Device -> hub: model delivery's ``model_ack`` and ``model_request``."""
    return f"{PREFIX}/dev/{validate_device_id(device)}/model"


def device_from_topic(topic: str, leaf: str = "up") -> str:
    """The device of a device -> hub topic ending in ``leaf`` ("up": what the hub receives
    on ``UP_WILDCARD``, "model": on ``MODEL_WILDCARD``); WireError for any other topic."""
    m = _TO_HUB.fullmatch(topic) if isinstance(topic, str) else None
    if m is None or m.group(2) != leaf:
        what = "upload" if leaf == "up" else leaf
        raise WireError("bad_topic", f"not a device {what} topic: {str(topic)[:200]!r}")
    try:
        return validate_device_id(m.group(1))
    except ValueError as err:
        raise WireError("bad_topic", f"topic {topic[:200]!r}: {err}") from None
