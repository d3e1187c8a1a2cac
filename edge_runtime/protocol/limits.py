"""How big a message may be: the one payload rule devices, the hub and the broker follow.

Every party is configured with the same ``max_payload`` (``--max-payload``, default
``DEFAULT_MAX_PAYLOAD``): the largest message it sends. Messages are cut so that rows plus
``HEADER_ROOM`` (our framing and JSON header) fit it; MQTT adds at most ``MQTT_OVERHEAD``
(fixed header, topic, properties), so brokers and links allow packets of
``max_packet_size(max_payload)`` and receivers decode messages up to that size.
"""

from __future__ import annotations

DEFAULT_MAX_PAYLOAD = 256 * 1024
HEADER_ROOM = 8192  # bytes a message leaves for framing and its header
MQTT_OVERHEAD = 4096  # PUBLISH fixed header, topic and properties around a message
MIN_PAYLOAD = 2 * HEADER_ROOM  # a smaller message would be mostly header


def payload_size(text: str) -> int:
    """A ``--max-payload`` value (argparse type): bytes, at least ``MIN_PAYLOAD``."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if n < MIN_PAYLOAD:
        raise argparse.ArgumentTypeError(f"{n} bytes is below the minimum of {MIN_PAYLOAD}")
    return n


def max_packet_size(max_payload: int) -> int:
    """The MQTT packet limit (broker, links) and the largest message a receiver decodes."""
    return max_payload + MQTT_OVERHEAD


def rows_per_message(max_payload: int, bytes_per_row: int) -> int:
    """Rows (samples) of ``bytes_per_row`` that fit one message; ValueError if none does."""
    room = max_payload - HEADER_ROOM
    if bytes_per_row > room:
        raise ValueError(f"one sample ({bytes_per_row} bytes) plus {HEADER_ROOM} bytes of "
                         f"header does not fit a {max_payload}-byte message; raise "
                         "--max-payload or choose a smaller codec")
    return room // bytes_per_row
