"""The MQTT 5 packets the heartbeat link speaks, encoded and parsed without a library.

Only what a receive-mostly client needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK,
UNSUBSCRIBE/UNSUBACK, PUBLISH both ways, PUBACK, PINGREQ/PINGRESP and DISCONNECT
(MQTT 5.0, OASIS standard, sections 3.1 to 3.14). Pure functions over bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 0x80, 0x90, 0xA0, 0xB0
PINGREQ, PINGRESP, DISCONNECT = 0xC0, 0xD0, 0xE0

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

# Property identifiers (MQTT 5.0, 2.2.2.2) and how each value is laid out.
CONTENT_TYPE = 0x03
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
RECEIVE_MAXIMUM = 0x21
MAXIMUM_PACKET_SIZE = 0x27
REASON_STRING = 0x1F
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_LAYOUT = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _STRING, 0x13: _TWO, 0x15: _STRING, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _STRING, 0x1C: _STRING, 0x1F: _STRING, 0x21: _TWO,
    0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}


class ProtocolError(Exception):
    """The broker sent bytes that are not the MQTT 5 this client expects."""


def varint(value: int) -> bytes:
    """A Variable Byte Integer (1.5.5)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def read_varint(data: bytes | memoryview, at: int) -> tuple[int, int] | None:
    """(value, next offset), or None when ``data`` ends inside the integer."""
    value = shift = 0
    for index in range(at, min(at + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if len(data) >= at + 4:
        raise ProtocolError("malformed variable byte integer")
    return None


def frame(data: bytes | memoryview, at: int, size: int) -> tuple[int, int] | None:
    """The packet at ``at`` (``at + 2 <= size``): (offset of its body, offset after it), or
    None when the first ``size`` bytes of ``data`` end inside it. A remaining length of one
    or two bytes, nearly every packet's, is read inline."""
    length = data[at + 1]
    body = at + 2
    if length & 0x80:
        if at + 3 <= size and not data[at + 2] & 0x80:
            length = (length & 0x7F) | data[at + 2] << 7
            body = at + 3
        else:
            found = read_varint(data, at + 1)
            if found is None:
                return None
            length, body = found
    end = body + length
    return None if end > size else (body, end)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def _properties(**values: tuple[int, int]) -> bytes:
    """Encoded properties; each value is (identifier, integer)."""
    out = bytearray()
    for identifier, value in values.values():
        layout = _LAYOUT[identifier]
        out.append(identifier)
        out += struct.pack("!H" if layout == _TWO else "!I", value)
    return varint(len(out)) + bytes(out)


def connect(
    client_id: str,
    *,
    keepalive: int,
    clean_start: bool,
    session_expiry: int,
    receive_maximum: int,
    maximum_packet_size: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = 0x02 if clean_start else 0
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    properties = _properties(
        expiry=(SESSION_EXPIRY, session_expiry),
        receive=(RECEIVE_MAXIMUM, receive_maximum),
        size=(MAXIMUM_PACKET_SIZE, maximum_packet_size),
    )
    header = _string("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive)
    return _packet(CONNECT, header + properties + payload)


def subscribe(packet_id: int, topics: list[str]) -> bytes:
    """QoS 1 for each filter, no other subscription options."""
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic in topics:
        body += _string(topic) + b"\x01"
    return _packet(SUBSCRIBE | 0x02, body)


def unsubscribe(packet_id: int, topics: list[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic in topics:
        body += _string(topic)
    return _packet(UNSUBSCRIBE | 0x02, body)


def publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH without properties."""
    return _packet(PUBLISH | 0x02, _string(topic) + struct.pack("!H", packet_id) + b"\x00"
                   + payload)


def pubacks(packet_ids: list[int]) -> bytes:
    """Success PUBACKs for ``packet_ids``, in that order, as one write."""
    return b"".join(b"\x40\x02" + packet_id.to_bytes(2, "big") for packet_id in packet_ids)


@dataclass(slots=True)
class Properties:
    """The properties this client acts on; the others are skipped."""

    content_type: str | None = None
    session_expiry: int | None = None
    assigned_client_id: str | None = None
    server_keep_alive: int | None = None
    reason: str | None = None
    other: list[int] = field(default_factory=list)


def properties(data: bytes | memoryview, at: int) -> tuple[Properties, int]:
    """The property block at ``at``: (what it holds, the offset after it)."""
    found = read_varint(data, at)
    if found is None:
        raise ProtocolError("truncated properties")
    length, at = found
    end = at + length
    result = Properties()
    while at < end:
        identifier = data[at]
        layout = _LAYOUT.get(identifier)
        at += 1
        if layout is None:
            raise ProtocolError(f"unknown property 0x{identifier:02x}")
        if layout == _BYTE:
            at += 1
        elif layout == _TWO:
            value = int.from_bytes(data[at:at + 2], "big")
            if identifier == SERVER_KEEP_ALIVE:
                result.server_keep_alive = value
            at += 2
        elif layout == _FOUR:
            value = int.from_bytes(data[at:at + 4], "big")
            if identifier == SESSION_EXPIRY:
                result.session_expiry = value
            at += 4
        elif layout == _VARINT:
            skipped = read_varint(data, at)
            if skipped is None:
                raise ProtocolError("truncated property")
            at = skipped[1]
        else:
            count = 2 if layout == _PAIR else 1
            for _ in range(count):
                size = int.from_bytes(data[at:at + 2], "big")
                value_bytes = bytes(data[at + 2:at + 2 + size])
                at += 2 + size
            if layout == _STRING:
                text = value_bytes.decode("utf-8", "replace")
                if identifier == CONTENT_TYPE:
                    result.content_type = text
                elif identifier == ASSIGNED_CLIENT_ID:
                    result.assigned_client_id = text
                elif identifier == REASON_STRING:
                    result.reason = text
        if identifier not in (CONTENT_TYPE, SESSION_EXPIRY, ASSIGNED_CLIENT_ID,
                              SERVER_KEEP_ALIVE, REASON_STRING):
            result.other.append(identifier)
    if at != end:
        raise ProtocolError("properties overrun their length")
    return result, end


REASONS = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy",
    0x8A: "banned", 0x8B: "server shutting down", 0x8D: "keep alive timeout",
    0x8E: "session taken over", 0x8F: "topic filter invalid", 0x91: "packet id in use",
    0x93: "receive maximum exceeded", 0x95: "packet too large", 0x97: "quota exceeded",
    0x9C: "use another server", 0x9D: "server moved",
    0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded",
}


def reason_text(code: int) -> str:
    return REASONS.get(code, f"reason code 0x{code:02x}")
