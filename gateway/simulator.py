"""A fleet of simulated devices: ``gateway simulate --devices N [--interval S]``.

Each device behaves as firmware following docs/protocol.md would:

- it subscribes to its ``commands`` and ``settings`` topics at QoS 1, then publishes a
  heartbeat every ``interval`` seconds (JSON or MessagePack, ``ts`` in milliseconds and
  always growing, battery and storage drifting, ``settings_version`` reported);
- it applies settings updates (a patch onto the document of ``base_version``, which it
  holds, else it reports version 0 to get the whole document; a full document as is) and
  reports the new version in its next heartbeat;
- it executes commands once (de-duplicated by id, remembered until they expire) and
  acknowledges them in its next heartbeat, again each time they are delivered again;
  ``factory_reset`` wipes its state (battery, storage and settings back to the defaults,
  settings version 0); an unknown command type is acknowledged ``rejected``;
- it reconnects with capped, jittered backoff when the broker goes away.

Devices share a few MQTT 5 connections (``--per-connection``, 500 by default) so that a
cheap fleet of 10,000 runs on one core; with per-device credentials (``--credentials``)
each device has a connection of its own, logged in as itself. The MQTT is spoken with
`gateway.mqtt_packets`, without a client library, for the same reason.

``--register`` registers the devices first (``POST /v1/devices/batch``, the batch form of
``POST /v1/devices``; idempotent), and ``--credentials`` also issues each one a broker
password (``POST /v1/devices/{id}/credentials``), both through `gateway.client`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import heapq
import importlib
import importlib.util
import itertools
import math
import os
import random
import resource
import shutil
import signal
import ssl
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
from gateway_codecs import settings as settings_schema
from gateway_codecs.device import (
    JSON,
    MAX_ACKS,
    MSGPACK,
    Ack,
    CommandBatch,
    Heartbeat,
    RecordingState,
    SettingsFull,
    SettingsPatch,
)
from gateway_codecs.registry import RegisterDevice
from msgspec import UnsetType

from gateway import logs
from gateway import mqtt_packets as packets
from gateway.client import GatewayClient
from gateway.config import MqttEndpoint, redact_url
from gateway.errors import ApiError, ConfigError, GatewayError

__all__ = ["Options", "Simulator", "UsageError", "add_arguments", "main", "options_from",
           "run"]

KEEPALIVE_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 10.0
SUBSCRIBE_CHUNK = 100  # topic filters per SUBSCRIBE packet
TICK_SECONDS = 0.05  # heartbeats due within a tick go out in one write
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
CONNECTS_AT_ONCE = 64  # connection attempts in flight, so that a fleet does not stampede
FIRMWARE = "1.4.2"
DEVICE_TYPE = "sim_v1"
KNOWN_COMMANDS = frozenset({"factory_reset", "reboot", "ping", "start_recording",
                            "stop_recording", "upload_now", "set_led"})


class UsageError(ValueError):
    """Options that cannot be used together, or a value out of range."""


@dataclass(frozen=True, slots=True)
class Options:
    devices: int
    interval: float = 60.0
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = ""
    serial_prefix: str = "SIM-"
    register: bool = False
    credentials: bool = False
    api_key: str | None = field(default=None, repr=False)
    msgpack_share: float = 0.5
    per_connection: int = 500
    status_every: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise UsageError("--devices must be at least 1")
        if not self.interval > 0:
            raise UsageError("--interval must be more than 0 seconds")
        if not 0 <= self.msgpack_share <= 1:
            raise UsageError("--msgpack-share must be between 0 and 1")
        if self.per_connection < 1:
            raise UsageError("--per-connection must be at least 1")
        if (self.register or self.credentials) and not self.api_key:
            raise UsageError("--register and --credentials need an API key "
                             "(--api-key or GATEWAY_API_KEY)")
        try:
            MqttEndpoint.parse(self.mqtt_url)
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc

    def topic(self, name: str) -> str:
        prefix = self.topic_prefix.rstrip("/")
        return f"{prefix}/{name}" if prefix else name

    def serials(self) -> list[str]:
        return [f"{self.serial_prefix}{i:06d}" for i in range(self.devices)]


# ---- counters ------------------------------------------------------------------------------


@dataclass(slots=True)
class Stats:
    """What the fleet did; read by the status line and by tests."""

    devices: int = 0
    connected: int = 0  # devices whose connection is up
    heartbeats: int = 0  # published
    acknowledged: int = 0  # PUBACKed by the broker
    refused: int = 0  # PUBACKed with an error reason (the broker's ACLs, for one)
    commands_done: int = 0  # executed, each once
    commands_rejected: int = 0  # unknown types
    settings_applied: int = 0
    resets: int = 0
    reconnects: int = 0

    def line(self, rate: float) -> str:
        """The status, the most telling first (a terminal may cut the end off)."""
        return (f"{self.connected}/{self.devices} devices connected, {rate:.1f} heartbeats/s, "
                f"{self.commands_done} commands done ({self.commands_rejected} rejected), "
                f"{self.settings_applied} settings applied, {self.heartbeats} heartbeats, "
                f"{self.resets} resets, {self.reconnects} reconnects")


# ---- one device ----------------------------------------------------------------------------


class _Documents:
    """Settings documents shared between devices that hold equal ones: 10,000 devices on
    the defaults hold one document, not 10,000 copies."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._known: dict[bytes, dict[str, Any]] = {}

    def intern(self, document: dict[str, Any]) -> dict[str, Any]:
        key = msgspec.json.encode(document, order="sorted")
        if len(self._known) >= self.LIMIT:
            self._known.clear()
        return self._known.setdefault(key, document)


_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()
_commands = msgspec.json.Decoder(CommandBatch)
_any_json = msgspec.json.Decoder()


def _epoch(timestamp: str) -> float:
    return dt.datetime.fromisoformat(timestamp).timestamp()


class SimDevice:
    """One device's state and behaviour; the connection it lives on does the MQTT."""

    def __init__(self, serial: str, *, msgpack: bool, rng: random.Random,
                 documents: _Documents, stats: Stats, phase: float) -> None:
        self.serial = serial
        self.msgpack = msgpack
        self.phase = phase  # its offset in the fleet's heartbeat schedule, in seconds
        self.password: str | None = None
        self._rng = rng
        self._documents = documents
        self._stats = stats
        self.last_ts = 0
        self.acks: dict[str, Ack] = {}  # for the next heartbeat
        self.done: dict[str, tuple[Ack, float]] = {}  # command id → (ack, expires epoch)
        self.executed = 0
        self._prune_at_ms = 0
        self._wipe()
        # A device in the field is somewhere in its day, not fresh from the factory.
        self.battery = rng.randint(30, 100)
        self.storage_used_mb = rng.randint(0, self.storage_total_mb // 4)
        self.signal_dbm = rng.randint(-95, -55)

    def _wipe(self) -> None:
        self.settings: dict[str, Any] = self._documents.intern(settings_schema.defaults())
        self.settings_version = 0
        self.battery = 100
        self.charging = False
        self.storage_total_mb = 32768
        self.storage_used_mb = 0
        self.signal_dbm = -67
        self.recording = False
        self.pending_recordings = 0
        self.led: str | None = None

    # ---- heartbeats ----------------------------------------------------------------

    def heartbeat(self, now_ms: int) -> bytes:
        """The next heartbeat: the device's state now, and the acks collected since the
        last one. Its state then drifts on until the next."""
        self.last_ts = max(now_ms, self.last_ts + 1)
        acks = list(itertools.islice(self.acks.values(), MAX_ACKS))
        for ack in acks:
            del self.acks[ack.id]
        if self.done and now_ms >= self._prune_at_ms:
            self._forget_expired(now_ms / 1000)
            self._prune_at_ms = now_ms + 600_000
        beat = Heartbeat(
            ts=self.last_ts, firmware_version=FIRMWARE, battery_percent=self.battery,
            storage_used_mb=self.storage_used_mb, storage_total_mb=self.storage_total_mb,
            signal_strength_dbm=self.signal_dbm,
            recording_state=RecordingState(
                device_state="recording" if self.recording else "idle",
                pending_recordings=self.pending_recordings, flags=0,
                connection_type=["wifi"]),
            settings_version=self.settings_version, acks=acks or None,
        )
        self._stats.heartbeats += 1
        self._drift()
        return _msgpack.encode(beat) if self.msgpack else _json.encode(beat)

    def _drift(self) -> None:
        rng = self._rng
        if self.charging:
            self.battery = min(100, self.battery + rng.randint(3, 8))
            self.charging = self.battery < 100
        else:
            self.battery = max(0, self.battery - rng.choice((0, 0, 1, 1, 2)))
            self.charging = self.battery <= 15
        if rng.random() < 0.1:
            self.recording = not self.recording
        if self.recording:
            self.storage_used_mb = min(self.storage_total_mb,
                                       self.storage_used_mb + rng.randint(5, 40))
            self.pending_recordings = min(99, self.pending_recordings + rng.randint(0, 1))
        elif self.pending_recordings and rng.random() < 0.5:  # uploaded over WiFi
            self.pending_recordings -= 1
            self.storage_used_mb = max(0, self.storage_used_mb - rng.randint(20, 80))
        self.signal_dbm = max(-120, min(-30, self.signal_dbm + rng.randint(-3, 3)))

    def _forget_expired(self, now: float) -> None:
        for command_id, (_, expires) in list(self.done.items()):
            if expires < now:
                del self.done[command_id]

    # ---- what the gateway sends ------------------------------------------------------

    def on_commands(self, batch: CommandBatch) -> None:
        """Execute each command once; acknowledge it every time it arrives."""
        for command in batch.commands:
            known = self.done.get(command.id)
            if known is None:
                ack = self._execute(command.type, command.params, command.id)
                known = (ack, _epoch(command.expires_at))
                self.done[command.id] = known
            self.acks[command.id] = known[0]

    def _execute(self, kind: str, params: dict[str, Any], command_id: str) -> Ack:
        if kind not in KNOWN_COMMANDS:
            self._stats.commands_rejected += 1
            return Ack(id=command_id, status="rejected", detail=f"unknown command type {kind}")
        self.executed += 1
        self._stats.commands_done += 1
        if kind == "factory_reset":
            self._wipe()
            self._stats.resets += 1
        elif kind in ("start_recording", "stop_recording"):
            self.recording = kind == "start_recording"
        elif kind == "upload_now":
            self.pending_recordings = 0
            self.storage_used_mb = 0
        elif kind == "set_led":
            self.led = str(params.get("color"))
        return Ack(id=command_id, status="succeeded")

    def on_settings(self, update: SettingsPatch | SettingsFull) -> None:
        if isinstance(update, SettingsFull):
            self.settings = self._documents.intern(update.settings)
        elif update.base_version == self.settings_version:
            merged = settings_schema.merge_patch_apply(self.settings, update.patch)
            self.settings = self._documents.intern(merged)
        else:
            # A patch onto a document this device does not hold: ask for the whole one.
            self.settings_version = 0
            return
        self.settings_version = update.version
        self._stats.settings_applied += 1


def decode_settings(payload: bytes) -> SettingsPatch | SettingsFull:
    document = _any_json.decode(payload)
    if isinstance(document, dict) and document.get("base_version") is None:
        return msgspec.convert(document, SettingsFull)
    return msgspec.convert(document, SettingsPatch)


# ---- MQTT -----------------------------------------------------------------------------------

# CONNACK properties (MQTT 5.0, 3.2.2.3) and their sizes; "s" a string, "p" a string pair,
# "b" binary data. Only Receive Maximum (0x21) is read: the broker's in-flight window.
_CONNACK_PROPERTIES: dict[int, int | str] = {
    0x11: 4, 0x12: "s", 0x13: 2, 0x15: "s", 0x16: "b", 0x1A: "s", 0x1C: "s", 0x1F: "s",
    0x21: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}
RECEIVE_MAXIMUM = 0x21


def receive_maximum(body: bytes) -> int:
    """The broker's Receive Maximum from a CONNACK body (65,535 when absent)."""
    found = packets.read_varint(body, 2)
    if found is None:
        return 65535
    length, at = found
    end = at + length
    while at < end:
        identifier, at = body[at], at + 1
        size = _CONNACK_PROPERTIES.get(identifier)
        if size is None:
            break  # a property CONNACK does not carry: stop reading, assume no limit
        if identifier == RECEIVE_MAXIMUM:
            return max(1, int.from_bytes(body[at:at + 2], "big"))
        if isinstance(size, int):
            at += size
        else:
            for _ in range(2 if size == "p" else 1):
                at += 2 + int.from_bytes(body[at:at + 2], "big")
    return 65535


def _content_type(value: str) -> bytes:
    data = value.encode()
    block = bytes([packets.CONTENT_TYPE]) + struct.pack("!H", len(data)) + data
    return packets.varint(len(block)) + block


_PROPERTIES = {False: _content_type(JSON), True: _content_type(MSGPACK)}


def publish_packet(topic: bytes, packet_id: int, payload: bytes, properties: bytes) -> bytes:
    """A QoS 1 PUBLISH with the given properties block."""
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id) + properties
    return (bytes([packets.PUBLISH | 0x02]) + packets.varint(len(body) + len(payload)) + body
            + payload)


class Refused(Exception):
    """The broker refused the connection or a subscription."""


class _Connection(asyncio.Protocol):
    """The bytes of one MQTT 5 connection: packets in, futures for what was asked."""

    def __init__(self, on_publish: Callable[[str, bytes], None],
                 on_puback: Callable[[int, int], None]) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[bytes] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.subacks: dict[int, asyncio.Future[bytes]] = {}
        self.last_in = self.last_out = time.monotonic()
        self._on_publish = on_publish
        self._on_puback = on_puback
        self._rest = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.connack, *self.subacks.values()):
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.last_out = time.monotonic()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        data = self._rest + data if self._rest else data
        try:
            self._rest = self._packets(data)
        except (packets.ProtocolError, IndexError, ValueError):
            self.abort()  # not the MQTT 5 this client speaks

    def _packets(self, data: bytes) -> bytes:
        """Act on each whole packet in ``data``; what is left of a partial one."""
        at, acks = 0, []
        while True:
            header = packets.read_varint(data, at + 1) if len(data) > at + 1 else None
            if header is None or header[1] + header[0] > len(data):
                break
            length, start = header
            end = start + length
            kind = data[at] & 0xF0
            if kind == packets.PUBLISH:
                packet_id = self._publish(data[at] & 0x06, data[start:end])
                if packet_id:
                    acks.append(packet_id)
            elif kind == packets.PUBACK:
                reason = data[start + 2] if length > 2 else 0
                self._on_puback(int.from_bytes(data[start:start + 2], "big"), reason)
            elif kind == packets.CONNACK and not self.connack.done():
                self.connack.set_result(data[start:end])
            elif kind == packets.SUBACK:
                future = self.subacks.pop(int.from_bytes(data[start:start + 2], "big"), None)
                if future is not None and not future.done():
                    future.set_result(data[start:end])
            at = end
        if acks:
            self.write(packets.pubacks(acks))
        return data[at:]

    def _publish(self, qos: int, body: bytes) -> int:
        """Hand the message on; its packet id when it wants a PUBACK, else 0."""
        at = 2 + int.from_bytes(body[:2], "big")
        topic = body[2:at].decode("utf-8", "replace")
        packet_id = 0
        if qos:
            packet_id = int.from_bytes(body[at:at + 2], "big")
            at += 2
        properties = packets.read_varint(body, at)
        if properties is not None:
            self._on_publish(topic, body[properties[1] + properties[0]:])
        return packet_id


class _Backoff:
    """Capped, jittered waits (0.5 s doubling to 30 s), from the start again once a
    connection lasted."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._delay = BACKOFF_FIRST

    def lasted(self, seconds: float) -> None:
        if seconds > 10:
            self._delay = BACKOFF_FIRST

    def next(self) -> float:
        wait = self._rng.uniform(self._delay / 2, self._delay)
        self._delay = min(self._delay * 2, BACKOFF_MAX)
        return wait


class Link:
    """One MQTT connection and the devices on it: connects (again and again), subscribes
    the devices' topics, and publishes their heartbeats on schedule."""

    def __init__(self, sim: Simulator, index: int, devices: list[SimDevice]) -> None:
        self._sim = sim
        self._options = sim.options
        self._devices = devices
        own = sim.options.credentials
        self.client_id = devices[0].serial if own else f"sim-{sim.tag}-{index}"
        self._by_topic: dict[str, tuple[SimDevice, bool]] = {}  # topic → (device, settings?)
        self._beat_topics: list[bytes] = []
        for device in devices:
            self._by_topic[sim.options.topic(f"devices/{device.serial}/commands")] = (
                device, False)
            self._by_topic[sim.options.topic(f"devices/{device.serial}/settings")] = (
                device, True)
            self._beat_topics.append(
                sim.options.topic(f"devices/{device.serial}/heartbeat").encode())
        self._schedule = [(sim.first_due(device), n) for n, device in enumerate(devices)]
        heapq.heapify(self._schedule)
        self._queue: deque[int] = deque()  # devices whose heartbeat is due, in order
        self._queued: set[int] = set()
        self._in_flight: set[int] = set()
        self._window = 65535
        self._packet_ids = 0
        self._connection: _Connection | None = None
        self._backoff = _Backoff(sim.rng)
        self.up = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        first = True
        while not stop.is_set():
            try:
                async with self._sim.connecting:
                    if stop.is_set():
                        break
                    await self._connect()
            except (OSError, TimeoutError, ConnectionError, Refused) as exc:
                self._sim.say(f"connection {self.client_id} failed: "
                              f"{str(exc) or type(exc).__name__}", key=str(exc))
                await self._pause(stop)
                continue
            if not first:
                self._sim.stats.reconnects += 1
            first = False
            started = time.monotonic()
            self._sim.stats.connected += len(self._devices)
            self.up.set()
            try:
                await self._beat(stop)
            finally:
                self.up.clear()
                self._sim.stats.connected -= len(self._devices)
            self._backoff.lasted(time.monotonic() - started)
            if not stop.is_set():
                self._sim.say(f"connection {self.client_id} lost; reconnecting",
                              key="lost")
                await self._pause(stop)
        await self._close()

    async def _pause(self, stop: asyncio.Event) -> None:
        """Wait out the backoff; heartbeats that fall due meanwhile are skipped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._backoff.next()):
                await stop.wait()

    async def _connect(self) -> None:
        options = self._options
        endpoint = MqttEndpoint.parse(options.mqtt_url)
        username, password = endpoint.username, endpoint.password
        if options.credentials:
            username, password = self._devices[0].serial, self._devices[0].password
        loop = asyncio.get_running_loop()
        tls = ssl.create_default_context() if endpoint.tls else None
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            _, connection = await loop.create_connection(
                lambda: _Connection(self._on_publish, self._on_puback),
                endpoint.host, endpoint.port, ssl=tls)
            try:
                connection.write(packets.connect(
                    self.client_id, keepalive=KEEPALIVE_SECONDS, clean_start=True,
                    session_expiry=0, receive_maximum=65535, maximum_packet_size=1 << 20,
                    username=username, password=password))
                connack = await connection.connack
                if len(connack) > 1 and connack[1] >= 0x80:
                    raise Refused(f"the broker refused {username or 'the connection'}: "
                                  f"{packets.reason_text(connack[1])}")
                self._window = receive_maximum(connack)
                await self._subscribe(connection)
            except BaseException:
                connection.abort()
                raise
        self._connection = connection
        self._in_flight.clear()

    async def _subscribe(self, connection: _Connection) -> None:
        topics = list(self._by_topic)
        waits = []
        for at in range(0, len(topics), SUBSCRIBE_CHUNK):
            packet_id = self._next_packet_id()
            future = asyncio.get_running_loop().create_future()
            connection.subacks[packet_id] = future
            waits.append(future)
            connection.write(packets.subscribe(packet_id, topics[at:at + SUBSCRIBE_CHUNK]))
        for suback in await asyncio.gather(*waits):
            _, at = packets.properties(suback, 2)
            if any(code >= 0x80 for code in suback[at:]):
                raise Refused("the broker refused a subscription to the devices' topics")

    def _next_packet_id(self) -> int:
        self._packet_ids = self._packet_ids % 0xFFFF + 1
        return self._packet_ids

    async def _beat(self, stop: asyncio.Event) -> None:
        """Publish heartbeats as they fall due, until stopped or the connection is lost."""
        connection = self._connection
        assert connection is not None
        wake = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set() and not connection.closed.done():
                now = time.monotonic()
                self._due(now)
                self._send(connection)
                if now - connection.last_out > KEEPALIVE_SECONDS / 2:
                    connection.write(packets.PINGREQ_PACKET)
                if now - connection.last_in > KEEPALIVE_SECONDS * 1.5:
                    connection.abort()  # the broker went silent
                delay = max(TICK_SECONDS, self._schedule[0][0] - time.monotonic())
                await asyncio.wait((wake, connection.closed), timeout=min(delay, 1.0))
        finally:
            wake.cancel()

    def _due(self, now: float) -> None:
        schedule = self._schedule
        while schedule and schedule[0][0] <= now:
            _, n = heapq.heappop(schedule)
            heapq.heappush(schedule, (self._sim.next_due(self._devices[n], now), n))
            if n not in self._queued:
                self._queued.add(n)
                self._queue.append(n)

    def _send(self, connection: _Connection) -> None:
        """Publish queued heartbeats while the broker's in-flight window has room."""
        out = []
        now_ms = time.time_ns() // 1_000_000
        while self._queue and len(self._in_flight) < self._window:
            n = self._queue.popleft()
            self._queued.discard(n)
            device = self._devices[n]
            packet_id = self._next_packet_id()
            self._in_flight.add(packet_id)
            out.append(publish_packet(self._beat_topics[n], packet_id,
                                      device.heartbeat(now_ms), _PROPERTIES[device.msgpack]))
        if out:
            connection.write(b"".join(out))

    def _on_puback(self, packet_id: int, reason: int) -> None:
        if packet_id in self._in_flight:
            self._in_flight.discard(packet_id)
            stats = self._sim.stats
            stats.acknowledged += 1
            if reason >= 0x80:
                stats.refused += 1
                self._sim.say(f"the broker refused a heartbeat on {self.client_id}: "
                              f"{packets.reason_text(reason)}", key="refused")
            if self._queue and self._connection is not None:
                self._send(self._connection)

    def _on_publish(self, topic: str, payload: bytes) -> None:
        target = self._by_topic.get(topic)
        if target is None:
            return
        device, is_settings = target
        try:
            if is_settings:
                device.on_settings(decode_settings(payload))
            else:
                device.on_commands(_commands.decode(payload))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._sim.say(f"{device.serial}: ignored a message on {topic}: {exc}",
                          key="undecodable")

    async def _close(self) -> None:
        """Wait a little for the last PUBACKs, then say goodbye."""
        connection, self._connection = self._connection, None
        if connection is None or connection.closed.done():
            return
        deadline = time.monotonic() + 1.0
        while self._in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 - PUBACKs have no event
            await asyncio.sleep(0.01)
        connection.write(packets.DISCONNECT_PACKET)
        if connection.transport is not None:
            connection.transport.close()


# ---- registering ---------------------------------------------------------------------------


class RegistryError(Exception):
    """Registering failed for good: an item the gateway refused, or an error answer."""


def _reason(exc: GatewayError) -> str:
    if isinstance(exc, ApiError):
        return f"{exc.status} {exc.type}: {exc.message}"
    return str(exc) or type(exc).__name__


# ---- the status line ------------------------------------------------------------------------


class _Status:
    """A live status line on a terminal (rich when installed), else a log line every
    ``every`` seconds; messages in between."""

    def __init__(self, stats: Stats, every: float, stream: Any = None,
                 mode: str | None = None) -> None:
        self._stats = stats
        self._every = every
        self._stream = stream or sys.stderr
        self._mode = mode or self._pick()
        self._live: Any = None
        self._drawn = False
        self._said: dict[str, float] = {}
        self._history: deque[tuple[float, int]] = deque(maxlen=64)

    def _pick(self) -> str:
        if not self._stream.isatty():
            return "log"
        return "rich" if importlib.util.find_spec("rich") is not None else "line"

    def rate(self) -> float:
        """Heartbeats per second over the last few seconds."""
        now, count = time.monotonic(), self._stats.heartbeats
        self._history.append((now, count))
        while len(self._history) > 2 and now - self._history[0][0] > 5:
            self._history.popleft()
        then, before = self._history[0]
        return (count - before) / (now - then) if now > then else 0.0

    def say(self, message: str, key: str | None = None) -> None:
        """A message of its own line; one a minute per ``key`` (repeats are dropped)."""
        now = time.monotonic()
        if key is not None:
            if now - self._said.get(key, -math.inf) < 60:
                return
            self._said[key] = now
        text = f"simulator: {message}"
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
            return
        self._clear()
        print(f"{_now()} {text}", file=self._stream, flush=True)

    def _clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._drawn = False

    async def run(self, stop: asyncio.Event) -> None:
        if self._mode == "rich":
            live = importlib.import_module("rich.live")
            console = importlib.import_module("rich.console").Console(file=self._stream)
            text = importlib.import_module("rich.text").Text
            with live.Live(console=console, refresh_per_second=4, transient=False) as shown:
                self._live = shown
                try:
                    await self._loop(stop, 0.5, lambda line: shown.update(
                        text(line, no_wrap=True, overflow="ellipsis")))
                finally:
                    self._live = None
            return
        if self._mode == "line":
            await self._loop(stop, 0.5, self._draw)
            self._clear()
            return
        await self._loop(stop, self._every, lambda line: self.say(line))

    async def _loop(self, stop: asyncio.Event, every: float,
                    show: Callable[[str], object]) -> None:
        self.rate()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
            show(self._stats.line(self.rate()))

    def _draw(self, line: str) -> None:
        # One line, cut to the terminal's width: a wrapped line could not be redrawn.
        width = shutil.get_terminal_size().columns - 1
        self._stream.write(f"\r\x1b[K{line[:width]}")
        self._stream.flush()
        self._drawn = True


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- the fleet ------------------------------------------------------------------------------


class Simulator:
    """The fleet: its devices, their connections, registration and the status line."""

    def __init__(self, options: Options, *, status_stream: Any = None,
                 status_mode: str | None = None) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.tag = uuid.uuid4().hex[:8]  # client ids of its own, next to other fleets
        self.stats = Stats(devices=options.devices)
        self.status = _Status(self.stats, options.status_every, status_stream, status_mode)
        self.connecting = asyncio.Semaphore(CONNECTS_AT_ONCE)
        self.device_ids: dict[str, str] = {}  # serial → device id, once registered
        self._started = time.monotonic()
        # The first heartbeats come within a few seconds (a second per 2,000 devices),
        # then each device keeps its own phase in the interval.
        self._ramp = min(options.interval, max(1.0, options.devices / 2000))
        documents = _Documents()
        share = options.msgpack_share
        self.devices: dict[str, SimDevice] = {
            serial: SimDevice(serial, msgpack=math.floor((n + 1) * share) > math.floor(n * share),
                              rng=self.rng, documents=documents, stats=self.stats,
                              phase=self.rng.uniform(0, options.interval))
            for n, serial in enumerate(options.serials())
        }

    def say(self, message: str, key: str | None = None) -> None:
        self.status.say(message, key)

    def first_due(self, device: SimDevice) -> float:
        return self._started + device.phase * self._ramp / self.options.interval

    def next_due(self, device: SimDevice, now: float) -> float:
        """The device's next slot in its phase, at least a quarter interval from now."""
        interval = self.options.interval
        slots = math.ceil((now + interval / 4 - self._started - device.phase) / interval)
        return self._started + device.phase + max(slots, 0) * interval

    async def register(self) -> None:
        """Register every device (``POST /v1/devices/batch``, a thousand a call;
        idempotent) and, with ``credentials``, issue each its broker password (``POST
        /v1/devices/{id}/credentials``)."""
        options = self.options
        endpoint = MqttEndpoint.parse(options.mqtt_url)
        # Under the backend's own name, where the broker lets a backend read only its own
        # replies (deploy/mosquitto/dynsec-setup.sh).
        reply_topic = options.topic(
            f"api/v1/replies/{endpoint.username or 'simulator'}/{uuid.uuid4().hex[:12]}")
        self.say(f"registering {len(self.devices)} devices through the registry at "
                 f"{redact_url(options.mqtt_url)}")
        try:
            async with GatewayClient(options.mqtt_url, api_key=options.api_key,
                                     topic_prefix=options.topic_prefix,
                                     reply_topic=reply_topic) as gateway:
                await self._register(gateway)
                if options.credentials:
                    await self._issue(gateway)
        except GatewayError as exc:
            raise RegistryError(_reason(exc)) from exc
        self.say(f"registered {len(self.devices)} devices"
                 + (" and issued their credentials" if options.credentials else ""))

    async def _register(self, gateway: GatewayClient) -> None:
        items = [RegisterDevice(serial_number=serial, device_type=DEVICE_TYPE,
                                firmware_version=FIRMWARE) for serial in self.devices]
        async for batch in gateway.devices.register_batches(items):
            for item, result in zip(batch.items, batch.results, strict=True):
                assert isinstance(item, RegisterDevice)
                if isinstance(result.device, UnsetType):
                    error = result.error
                    text = error.message if not isinstance(error, UnsetType) else ""
                    raise RegistryError(f"registering {item.serial_number}: {result.status} "
                                        f"{text} (try another --serial-prefix)")
                self.device_ids[item.serial_number] = result.device.id
            if len(self.device_ids) < len(items):
                self.say(f"registered {len(self.device_ids)}/{len(items)}")

    async def _issue(self, gateway: GatewayClient) -> None:
        limit = asyncio.Semaphore(64)

        async def issue(device: SimDevice) -> None:
            async with limit:
                issued = await gateway.devices.credentials(self.device_ids[device.serial])
            device.password = issued.password

        await _all(issue(device) for device in self.devices.values())

    def links(self) -> list[Link]:
        devices = list(self.devices.values())
        size = 1 if self.options.credentials else self.options.per_connection
        return [Link(self, n, devices[at:at + size])
                for n, at in enumerate(range(0, len(devices), size))]

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Register (if asked and not yet done), then heartbeat until ``stop`` is set.
        ``ready`` is set once every connection is up for the first time."""
        if self.options.register and not self.device_ids:
            await self.register()
        self._started = time.monotonic()  # the schedule starts now
        links = self.links()
        _enough_files(len(links))
        self.say(f"{len(self.devices)} devices on {len(links)} connection(s) to "
                 f"{redact_url(self.options.mqtt_url)}, a heartbeat every "
                 f"{self.options.interval:g} s, {self.options.msgpack_share:.0%} MessagePack")
        async with asyncio.TaskGroup() as tasks:
            status_stop = asyncio.Event()
            shown = tasks.create_task(self.status.run(status_stop), name="simulator-status")
            running = [tasks.create_task(link.run(stop), name=f"simulator-link-{n}")
                       for n, link in enumerate(links)]
            if ready is not None:
                tasks.create_task(_when_all_up(links, ready, stop))
            await asyncio.gather(*running)
            status_stop.set()
            await shown
        self.say(f"stopped: {self.stats.line(0.0)}")


async def _when_all_up(links: list[Link], ready: asyncio.Event, stop: asyncio.Event) -> None:
    for link in links:
        up = asyncio.ensure_future(link.up.wait())
        halt = asyncio.ensure_future(stop.wait())
        await asyncio.wait((up, halt), return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        halt.cancel()
        if stop.is_set():
            return
    ready.set()


async def _all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run all; the first failure cancels the rest and is raised (not in a group)."""
    try:
        async with asyncio.TaskGroup() as tasks:
            for coroutine in coroutines:
                tasks.create_task(coroutine)
    except ExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _enough_files(connections: int) -> None:
    """Raise the open-file limit when the fleet needs more sockets than it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ---- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--devices", type=int, required=True, metavar="N",
                        help="how many devices")
    parser.add_argument("--interval", type=float, default=60.0, metavar="S",
                        help="seconds between a device's heartbeats (default: 60)")
    parser.add_argument("--mqtt-url", default=env("GATEWAY_MQTT_URL") or "mqtt://127.0.0.1:1883",
                        metavar="URL", help="the broker; user:password@ allowed (default: "
                        "mqtt://127.0.0.1:1883; env GATEWAY_MQTT_URL)")
    parser.add_argument("--topic-prefix", default=env("GATEWAY_TOPIC_PREFIX") or "",
                        metavar="PREFIX", help="prefix of every topic (default: none; env "
                        "GATEWAY_TOPIC_PREFIX)")
    parser.add_argument("--serial-prefix", default="SIM-", metavar="PREFIX",
                        help="serial numbers are PREFIX000000, PREFIX000001, ... "
                             "(default: SIM-)")
    parser.add_argument("--register", action="store_true",
                        help="register the devices first (POST /v1/devices/batch), with an "
                             "API key")
    parser.add_argument("--credentials", action="store_true",
                        help="issue each device its own broker password (POST "
                             "/v1/devices/{id}/credentials; the gateway runs with dynamic "
                             "security) and connect each as itself; implies --register")
    parser.add_argument("--api-key", default=env("GATEWAY_API_KEY"), metavar="KEY",
                        help="API key for --register and --credentials (env GATEWAY_API_KEY)")
    parser.add_argument("--msgpack-share", type=float, default=0.5, metavar="FRACTION",
                        help="fraction of the devices that send MessagePack (default: 0.5)")
    parser.add_argument("--per-connection", type=int, default=500, metavar="N",
                        help="devices sharing one MQTT connection (default: 500)")
    parser.add_argument("--status-every", type=float, default=10.0, metavar="S",
                        help="seconds between status lines when not on a terminal "
                             "(default: 10)")
    parser.add_argument("--seed", type=int, help="seed for a repeatable fleet")


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        devices=args.devices, interval=args.interval, mqtt_url=args.mqtt_url,
        topic_prefix=args.topic_prefix, serial_prefix=args.serial_prefix,
        register=args.register or args.credentials, credentials=args.credentials,
        api_key=args.api_key, msgpack_share=args.msgpack_share,
        per_connection=args.per_connection, status_every=args.status_every, seed=args.seed,
    )


async def run(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    """``gateway simulate``: run the fleet until SIGINT or SIGTERM (or ``stop``)."""
    try:
        options = options_from(args)
    except UsageError as exc:
        print(f"gateway simulate: {exc}", file=sys.stderr)
        return 2
    async with stopping(stop) as stopped:
        simulator = Simulator(options)
        try:
            await simulator.run(stopped)
        except RegistryError as exc:
            print(f"gateway simulate: cannot register the devices: {exc}", file=sys.stderr)
            return 1
    return 0


@contextlib.asynccontextmanager
async def stopping(stop: asyncio.Event | None) -> AsyncIterator[asyncio.Event]:
    """``stop``, or an event set by SIGINT and SIGTERM while the block runs."""
    if stop is not None:
        yield stop
        return
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, event.set)
    try:
        yield event
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def command_main(prog: str, description: str,
                 add: Callable[[argparse.ArgumentParser], None],
                 command: Callable[[argparse.Namespace], Awaitable[int]],
                 argv: Sequence[str] | None) -> int:
    """A tool run on its own (``python -m gateway.simulator``), as `gateway` would:
    warnings of the libraries logged to stderr, stdout left to the tool."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add(parser)
    args = parser.parse_args(argv)
    logs.configure("console", "warning")

    async def call() -> int:
        return await command(args)

    try:
        import uvloop
    except ImportError:
        return asyncio.run(call())
    return uvloop.run(call())


def main(argv: Sequence[str] | None = None) -> int:
    return command_main(
        "gateway simulate", "A fleet of simulated devices: heartbeats, settings updates "
        "applied and reported, commands executed and acknowledged.", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
