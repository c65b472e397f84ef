"""The fence around aiomqtt's and paho's internals (gateway/mqtt_client.py)."""

from __future__ import annotations

import asyncio
import contextlib
from importlib import metadata

import aiomqtt
import pytest

from gateway import mqtt_client


def test_the_installed_mqtt_libraries_are_the_versions_the_fence_was_written_for() -> None:
    """gateway/mqtt_client.py patches private parts of aiomqtt and paho-mqtt. Another
    version may have changed them silently: this fails, naming what to re-check."""
    installed = {name: metadata.version(name) for name in mqtt_client.WRITTEN_FOR}
    assert installed == mqtt_client.WRITTEN_FOR, (
        f"gateway/mqtt_client.py was written for {mqtt_client.WRITTEN_FOR}, but "
        f"{installed} is installed. Read every private attribute it uses against the new "
        "versions (and the test_paho_speedups tests), then update WRITTEN_FOR and the pins "
        "in pyproject.toml together."
    )


def test_nothing_outside_the_fence_touches_the_libraries_internals() -> None:
    """Only gateway/mqtt_client.py reaches into aiomqtt's or paho's private attributes."""
    from pathlib import Path

    root = Path(mqtt_client.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "mqtt_client.py":
            continue
        text = path.read_text()
        for needle in ("._client._", "_out_messages", "_out_packet", "._lock", "._connected",
                       "_packet_read", "_packet_write", "manual_ack_set", "loop_read"):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == []


# ---- the broker's Receive Maximum -----------------------------------------------------------


class _ScriptedBroker:
    """Just enough of an MQTT 5 broker on a free port: a CONNACK that states Receive
    Maximum ``window``, then it records each PUBLISH's packet id and acknowledges only
    when told to."""

    def __init__(self, window: int | None) -> None:
        self.window = window
        self.published: list[int] = []
        self.arrived = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> _ScriptedBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
        self._server.close()

    async def _packet(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return first, await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        await self._packet(reader)  # CONNECT
        props = b"" if self.window is None else b"\x21" + self.window.to_bytes(2, "big")
        writer.write(bytes([0x20, 3 + len(props), 0, 0, len(props)]) + props)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, body = await self._packet(reader)
                if kind >> 4 == 3:  # PUBLISH, QoS 1: topic, then the packet id
                    topic_length = int.from_bytes(body[:2], "big")
                    self.published.append(int.from_bytes(body[2 + topic_length:4 + topic_length],
                                                         "big"))
                    self.arrived.set()

    def acknowledge(self, packet_id: int) -> None:
        assert self._writer is not None
        self._writer.write(bytes([0x40, 2]) + packet_id.to_bytes(2, "big"))

    async def settle(self) -> None:
        """Until no PUBLISH has arrived for 0.3 s."""
        while True:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 0.3)
            except TimeoutError:
                return


@pytest.mark.parametrize(("window", "in_flight"), [(5, 5), (None, 40)])
async def test_publishes_in_flight_stay_within_the_brokers_receive_maximum(
    window: int | None, in_flight: int
) -> None:
    """A broker whose CONNACK says Receive Maximum 5 gets at most 5 unacknowledged QoS 1
    publishes, the next one after each PUBACK; one that states none gets them all."""
    async with _ScriptedBroker(window) as broker:
        client = mqtt_client.make_client(
            route=lambda message: None, host="127.0.0.1", port=broker.port, tls=False,
            identifier="receive-maximum", protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=0)
        await client.connect()
        try:
            for n in range(40):
                assert client.publish_nowait("t", b"%d" % n)
            await broker.settle()
            assert len(broker.published) == in_flight
            if window is not None:
                broker.acknowledge(broker.published[0])
                await broker.settle()
                assert len(broker.published) == in_flight + 1
        finally:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.disconnect()
