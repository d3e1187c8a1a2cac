"""paho's PUBLISH decoder without its copies, installed by ``install()``.

paho 2.x decodes each received PUBLISH with ``struct.unpack`` formats as long as the packet,
~3 ms per MB (half the receive cost of a 1 MB message); ``install`` swaps in a decoder that
returns the same result with one copy. ``MqttLink`` calls it; it is idempotent.
"""

from __future__ import annotations

from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

try:  # paho >= 2.2 decodes packets in _packet
    from paho.mqtt import _packet

    _convert_exception = _packet.convert_exception
    _paho_decode_publish = _packet.decode_publish  # paho's own, for comparison in tests
except ImportError:  # older paho: keep its decoder
    _packet = None

    def _convert_exception(f):
        return f


@_convert_exception  # index and struct errors become paho's MalformedPacket
def _decode_publish(header: int, packet: bytes | bytearray,
                    protocol: MQTTProtocolVersion) -> _packet.PublishPacket:
    """Same contract and result as paho's ``_packet.decode_publish``, with one copy of
    the payload instead of four plus one per property. Stricter on one point: a
    property that overruns the declared properties length is malformed (paho reads
    on into the payload)."""
    view = memoryview(packet)
    qos = (header & 0x06) >> 1
    pos = 2 + int.from_bytes(view[0:2], "big")
    if len(view) < pos + (2 if qos else 0):
        raise _packet.MalformedPacket("PUBLISH shorter than its topic and packet id")
    topic = bytes(view[2:pos])
    if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
        raise _packet.MalformedPacket("topic can't be empty in MQTTv3")
    mid = 0
    if qos:
        mid = int.from_bytes(view[pos:pos + 2], "big")
        pos += 2
    properties = None
    if protocol == MQTTProtocolVersion.MQTTv5:
        length, shift, end = 0, 0, pos
        for _ in range(4):  # variable byte integer: the properties' length
            byte = view[end]
            length |= (byte & 0x7F) << shift
            shift += 7
            end += 1
            if not byte & 0x80:
                break
        end += length
        if end > len(view):
            raise _packet.MalformedPacket("PUBLISH properties longer than the packet")
        properties = Properties(PacketTypes.PUBLISH)
        properties.unpack(bytes(view[pos:end]))
        pos = end
    return _packet.PublishPacket(dup=bool(header & 0x08), qos=qos,
                                 retain=bool(header & 0x01), topic=topic, mid=mid,
                                 properties=properties, payload=bytes(view[pos:]))


def install() -> bool:
    """Make paho decode PUBLISH packets with ``_decode_publish``; False where this paho has
    no ``_packet`` module (older versions keep their own decoder). Idempotent."""
    if _packet is None:
        return False
    _packet.decode_publish = _decode_publish  # paho's client looks it up at each packet
    return True
