"""The edge's paho speed-ups: a socketful read per readable event, PUBACKs written in runs.

End to end, every heartbeat test depends on them (a lost or mangled PUBACK would make the
broker deliver again or drop the connection); here paho reads and writes through a socket
pair, so what it handled, the bytes it wrote and its ``send()`` calls can be checked.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateway import mqtt_packets as packets
from gateway.mqtt_client import coalesce_acks, read_all_ready


@pytest.fixture
def wired() -> Iterator[tuple[paho.Client, socket.socket, list[int]]]:
    """A paho client whose socket is one end of a socket pair; yields the client, the
    other end, and the sizes of the client's ``send()`` calls."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    ours, theirs = socket.socketpair()
    client._sock = ours
    sends: list[int] = []
    send = client._sock_send

    def counted(data: bytes) -> int:
        sends.append(len(data))
        return send(data)

    client._sock_send = counted  # type: ignore[method-assign]
    read_all_ready(client)
    coalesce_acks(client)
    yield client, theirs, sends
    ours.close()
    theirs.close()


def queue(client: paho.Client, command: int, packet: bytes) -> None:
    """Queue ``packet`` as paho's ``_packet_queue`` does (its packet id from its bytes)."""
    mid = int.from_bytes(packet[2:4], "big")
    client._out_packet.append({"command": command, "mid": mid, "qos": 1, "pos": 0,
                               "to_process": len(packet), "packet": packet, "info": None})


def puback(mid: int) -> bytes:
    return bytes([paho.PUBACK, 2]) + mid.to_bytes(2, "big")


def read_all(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return data


def test_a_run_of_pubacks_goes_out_in_one_send(wired: Any) -> None:
    client, theirs, sends = wired
    subscribe = b"\x82\x05\x00\x07\x00\x00\x00"  # any other packet ends the run
    expected = b"".join(puback(mid) for mid in range(1, 501)) + subscribe + puback(501)
    for mid in range(1, 501):
        queue(client, paho.PUBACK, puback(mid))
    queue(client, paho.SUBSCRIBE, subscribe)
    queue(client, paho.PUBACK, puback(501))
    assert client._packet_write() == paho.MQTT_ERR_SUCCESS
    assert read_all(theirs, len(expected)) == expected
    assert sends == [500 * 4, len(subscribe), 4]
    assert not client._out_packet


def test_a_run_longer_than_the_cap_is_split(wired: Any) -> None:
    client, theirs, sends = wired
    for mid in range(1, 2501):
        queue(client, paho.PUBACK, puback(mid))
    client._packet_write()
    assert read_all(theirs, 2500 * 4) == b"".join(puback(mid) for mid in range(1, 2501))
    assert sends == [1024 * 4, 1024 * 4, 452 * 4]


def test_a_partial_write_resumes_where_it_stopped(wired: Any) -> None:
    """The socket takes 7 bytes, then would block: the merged packet is finished over
    later writes, exactly as paho finishes any packet, and PUBACKs queued meanwhile
    follow it (merged in turn, never into the half-sent one)."""
    client, theirs, _ = wired
    send = client._sock_send
    full = [False]

    def trickle(data: bytes) -> int:
        full[0] = not full[0]
        if not full[0]:
            raise BlockingIOError
        return send(data[:7])

    client._sock_send = trickle
    for mid in range(1, 11):
        queue(client, paho.PUBACK, puback(mid))
    assert client._packet_write() == paho.MQTT_ERR_AGAIN
    assert client._out_packet[0]["pos"] == 7
    queue(client, paho.PUBACK, puback(11))
    queue(client, paho.PUBACK, puback(12))
    for _ in range(40):
        client._packet_write()
    expected = b"".join(puback(mid) for mid in range(1, 13))
    assert read_all(theirs, len(expected)) == expected
    assert not client._out_packet


def publish_v5(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 5 QoS 0 PUBLISH with no properties."""
    body = len(topic).to_bytes(2, "big") + topic + b"\x00" + payload
    return bytes([0x30, len(body)]) + body


def receiving(client: paho.Client) -> list[bytes]:
    """Have paho read without blocking; the payloads it hands over, as they come."""
    client._sock.setblocking(False)
    received: list[bytes] = []
    client.on_message = lambda _client, _userdata, message: received.append(message.payload)
    return received


def numbered(count: int, topic: bytes = b"devices/a/heartbeat", prefix: bytes = b"") -> bytes:
    """``count`` PUBLISH packets whose payloads are ``prefix`` and 0, 1, 2..."""
    return b"".join(publish_v5(topic, b"%s%d" % (prefix, n)) for n in range(count))


def test_one_readable_event_reads_a_run_of_packets(wired: Any) -> None:
    """paho alone reads one packet per `loop_read()`; the edge's reads up to 32, and
    returns without blocking when the socket is empty."""
    client, theirs, _ = wired
    received = receiving(client)
    theirs.sendall(numbered(50))
    assert client.loop_read() == paho.MQTT_ERR_SUCCESS
    assert received == [b"%d" % n for n in range(32)]
    assert client.loop_read() == paho.MQTT_ERR_SUCCESS
    assert received == [b"%d" % n for n in range(50)]
    assert client.loop_read() == paho.MQTT_ERR_SUCCESS  # nothing left: returns at once
    assert len(received) == 50


def test_a_socketful_of_packets_costs_one_recv(wired: Any) -> None:
    """paho alone calls ``recv()`` three or four times per packet (header byte, each
    remaining-length byte, the rest); the edge's reads serve them from one call."""
    client, theirs, _ = wired
    received = receiving(client)
    recvs: list[int] = []
    sock = client._sock

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(sock, name)

        def recv(self, size: int) -> bytes:
            recvs.append(size)
            return sock.recv(size)

    client._sock = Counting()
    theirs.sendall(numbered(20))
    assert client.loop_read() == paho.MQTT_ERR_SUCCESS
    assert received == [b"%d" % n for n in range(20)]
    # One recv() brought all 20; the second found the socket empty (would block).
    assert len(recvs) == 2


async def test_packets_left_in_the_buffer_after_a_run_are_read_without_a_socket_event(
    wired: Any,
) -> None:
    """The socket announced 50 packets once; a run reads 32 and the other 18 are already
    in the buffer, where no readable event would ever announce them: the next run is
    scheduled on the event loop."""
    client, theirs, _ = wired
    received = receiving(client)
    theirs.sendall(numbered(50))
    assert client.loop_read() == paho.MQTT_ERR_SUCCESS
    assert len(received) == 32
    await asyncio.sleep(0)
    assert received == [b"%d" % n for n in range(50)]


def test_a_new_socket_never_sees_bytes_buffered_from_the_last_one(wired: Any) -> None:
    """After a reconnect, what was left unread from the old connection is dropped."""
    client, theirs, _ = wired
    received = receiving(client)
    theirs.sendall(numbered(40, b"t", b"old"))
    client.loop_read()
    assert len(received) == 32  # 8 left in the buffer
    fresh, other = socket.socketpair()
    try:
        fresh.setblocking(False)
        client._sock = fresh
        other.sendall(publish_v5(b"t", b"new"))
        client.loop_read()
        assert received[32:] == [b"new"]
    finally:
        fresh.close()
        other.close()


@pytest.mark.parametrize("payload_size", [10, 1_000, 100_000])
def test_a_packet_is_framed_whatever_its_remaining_length(payload_size: int) -> None:
    """`mqtt_packets.frame`, the framing of the heartbeat link and the benchmark's caller:
    a remaining length of one, two or three bytes; None while the packet is incomplete."""
    packet = packets.publish("devices/a/heartbeat", 7, b"x" * payload_size)
    data = b"\x00" * 3 + packet + packets.PINGREQ_PACKET
    body, end = packets.frame(data, 3, len(data)) or (0, 0)
    assert data[3:end] == packet and end - body == len(packet) - (body - 3)
    assert packets.frame(data, end, len(data)) == (end + 2, end + 2)  # PINGREQ: no body
    assert packets.frame(data, 3, end - 1) is None
    assert packets.frame(data, 3, 5) is None  # inside the remaining length
