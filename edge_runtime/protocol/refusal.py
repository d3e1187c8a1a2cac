"""Errors as data: the hub tells a device why it refused one of its messages.

A ``reject`` message goes to the device's down topic with ``meta = {reason, detail, fatal,
refused}``: a reason code from ``REASONS``, a human line, whether retrying can fix it, and
the refused message's id. The hub sends at most a few per device per period (a device that
floods bad messages gets its counters raised, not a reply to each). ``gkt-edge`` stops
with ``EXIT_REFUSED`` on a fatal reason (a restart would be refused again) and logs and
carries on otherwise. The codes are also the labels of the hub's rejection counters.
"""

from __future__ import annotations

import uuid

from edge_runtime.protocol import wire

# fatal: the device runs another run's settings or holds more than the hub takes
WRONG_RUN = "wrong_run"  # classes or input size differ from the run's
TOO_MANY_SAMPLES = "too_many_samples"  # the hello claims more samples than the hub takes
PROTOCOL = "protocol"  # the hub cannot parse what the device sends (another version)
# not fatal: the next round, a new hello or the hub catching up can fix them
UNKNOWN_DEVICE = "unknown_device"  # say hello again (the hub lost it)
FUTURE_ROUND = "future_round"  # the device follows a round the hub has not opened
FEATURE_SHAPE = "feature_shape"
MAGNITUDE = "magnitude"
EXPANSION = "expansion"
TOO_MANY_CHUNKS = "too_many_chunks"
COUNT_MISMATCH = "count_mismatch"  # more samples than the hello said, or upload_done disagrees
TOO_MANY_DEVICES = "too_many_devices"
QUARANTINED = "quarantined"  # training on the upload failed; it was dropped for the round
SPOOFED = "spoofed"

FATAL = frozenset({WRONG_RUN, TOO_MANY_SAMPLES, PROTOCOL})
REASONS = (WRONG_RUN, TOO_MANY_SAMPLES, PROTOCOL, UNKNOWN_DEVICE, FUTURE_ROUND, FEATURE_SHAPE,
           MAGNITUDE, EXPANSION, TOO_MANY_CHUNKS, COUNT_MISMATCH, TOO_MANY_DEVICES,
           QUARANTINED, SPOOFED)
MAX_DETAIL = 300


def device_reason(reason: str) -> str:
    """The code a device is told for a hub-side rejection reason (wire decoder reasons such
    as ``bad_header`` or ``checksum`` become ``protocol`` only when they are not transient)."""
    if reason in REASONS:
        return reason
    if reason in ("bad_magic", "bad_version", "unknown_kind", "dtype", "schema"):
        return PROTOCOL
    return reason  # truncated, checksum, ...: transient; told as they are


def reject_message(device: str, round_: int, reason: str, detail: str,
                   refused: str = "") -> bytes:
    meta = {"reason": reason[:64], "detail": detail[:MAX_DETAIL], "fatal": reason in FATAL,
            "refused": refused}
    return wire.encode_message("reject", device, max(round_, 0), {},
                               msg_id=f"rej-{uuid.uuid4().hex[:8]}", meta=meta)
