"""MQTT topics: a versioned prefix and one subtree per device (so an ACL can pin a device
to its own topics with the pattern ``gkt/v1/dev/%u/#``)."""

from __future__ import annotations

import re

PREFIX = "gkt/v1"
ROUND_TOPIC = f"{PREFIX}/hub/round"  # hub announcements, retained
UP_WILDCARD = f"{PREFIX}/dev/+/up"

_DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_UP = re.compile(rf"{re.escape(PREFIX)}/dev/([^/]+)/up")


def validate_device_id(device: str) -> str:
    if not _DEVICE_ID.fullmatch(device or ""):
        raise ValueError(f"bad device id {device!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return device


def up(device: str) -> str:
    """Device -> hub: hello, feature chunks, extractor weights, upload_done, requests."""
    return f"{PREFIX}/dev/{validate_device_id(device)}/up"


def down(device: str) -> str:
    """Hub -> device: acknowledgements and logits."""
    return f"{PREFIX}/dev/{validate_device_id(device)}/down"


def device_from_topic(topic: str) -> str:
    from .wire import WireError

    m = _UP.fullmatch(topic)
    if not m or not _DEVICE_ID.fullmatch(m.group(1)):
        raise WireError("bad_topic", f"not a device upload topic: {topic!r}")
    return m.group(1)
