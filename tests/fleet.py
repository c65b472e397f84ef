"""A cheap fleet for tests that need load: devices heartbeating over raw MQTT 3.1.1
connections, and the database helpers that seed them and check they converged.

The fleet records every heartbeat the broker acknowledged (PUBACK): those are the ones the
broker took responsibility for, so a test can count what the gateway lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable

import asyncpg
from conftest import wait_for
from gateway_codecs import settings as settings_schema
from processes import Mosquitto, Postgres, connect_packet, publish_packet

from gateway.storage import migrate

INTERVAL = float(os.environ.get("GATEWAY_FAULT_INTERVAL", "1.0"))  # seconds between heartbeats
TICKS = 10  # a fleet connection sends a tenth of its devices every tenth of an interval


# ---- a cheap fleet ------------------------------------------------------------------------


def heartbeat(ts: int) -> bytes:
    """A full heartbeat; ``battery_percent`` is derived from ``ts`` so a stored row shows
    that its health and its ``last_ts`` came from the same message."""
    return (
        b'{"ts":%d,"battery_percent":%d,"firmware_version":"1.4.2","storage_used_mb":512,'
        b'"storage_total_mb":32768,"signal_strength_dbm":-67,"recording_state":'
        b'{"device_state":"idle","pending_recordings":0,"flags":0,"connection_type":["wifi"]},'
        b'"settings_version":1}' % (ts, ts % 101)
    )


class _Link(asyncio.Protocol):
    """One fleet connection. The broker only ever sends it 4-byte CONNACK and PUBACKs."""

    def __init__(self, on_ack: Callable[[str, int], None]) -> None:
        self.on_ack = on_ack
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False
        self.inflight: dict[int, tuple[str, int]] = {}
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        end = len(buf) - len(buf) % 4
        for pos in range(0, end, 4):
            kind, packet_id = buf[pos], int.from_bytes(buf[pos + 2:pos + 4], "big")
            if kind == 0x40:
                entry = self.inflight.pop(packet_id, None)
                if entry is not None:
                    self.on_ack(*entry)
            elif kind == 0x20 and not self.connack.done():
                self.connack.set_result(None)
        self.buf = buf[end:]


class Fleet:
    """Devices heartbeating once per ``interval`` over a few raw MQTT 3.1.1 connections.

    It records every heartbeat the broker acknowledged (PUBACK): those are the ones the
    broker took responsibility for. Heartbeats in flight when a connection drops are not
    counted; the fleet reconnects and carries on, as devices do.
    """

    def __init__(self, port: int, prefix: str, serials: list[str], *,
                 interval: float = INTERVAL, connections: int = 4,
                 payload: Callable[[str, int], bytes] | None = None) -> None:
        """``payload(serial, ts)`` makes each heartbeat (default: `heartbeat(ts)`)."""
        self.port = port
        self.payload = payload or (lambda serial, ts: heartbeat(ts))
        self.tag = os.urandom(4).hex()  # client ids of its own, next to other fleets
        self.prefix = prefix
        self.interval = interval
        self.groups = [serials[i::connections] for i in range(connections)]
        self.acked: list[tuple[str, int, float]] = []  # (serial, ts, monotonic ack time)
        self.latest: dict[str, int] = {}  # newest acknowledged ts per serial
        self.sent = 0
        self.drops = 0
        self.connected_at: list[float] = []
        self._last_ts: dict[str, int] = {}
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def _on_ack(self, serial: str, ts: int) -> None:
        self.acked.append((serial, ts, time.monotonic()))
        if ts > self.latest.get(serial, 0):
            self.latest[serial] = ts

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._connection(n, group), name=f"fleet-{n}")
                       for n, group in enumerate(self.groups)]

    async def stop(self) -> None:
        """Stop sending, wait for the outstanding PUBACKs, hang up."""
        self._stopping = True
        await asyncio.gather(*self._tasks)

    async def _connection(self, index: int, serials: list[str]) -> None:
        loop = asyncio.get_running_loop()
        topics = [f"{self.prefix}/devices/{s}/heartbeat".encode() for s in serials]
        per_tick = -(-len(serials) // TICKS)
        cursor = packet_id = 0
        while not self._stopping:
            link = _Link(self._on_ack)
            try:
                await loop.create_connection(lambda link=link: link, "127.0.0.1", self.port)
                assert link.transport is not None
                link.transport.write(connect_packet(f"fleet-{self.tag}-{index}", 0))
                await asyncio.wait_for(link.connack, 5)
            except (OSError, TimeoutError):
                if link.transport is not None:
                    link.transport.abort()
                await asyncio.sleep(0.1)  # a device's pause before it tries again
                continue
            assert link.transport is not None
            self.connected_at.append(time.monotonic())
            next_tick = time.monotonic()
            while not self._stopping and not link.lost:
                now_ms = time.time_ns() // 1_000_000
                packets = []
                for _ in range(per_tick):
                    serial, topic = serials[cursor], topics[cursor]
                    cursor = (cursor + 1) % len(serials)
                    ts = max(now_ms, self._last_ts.get(serial, 0) + 1)
                    self._last_ts[serial] = ts
                    packet_id = packet_id % 65535 + 1
                    link.inflight[packet_id] = (serial, ts)
                    packets.append(publish_packet(topic, packet_id, self.payload(serial, ts)))
                link.transport.write(b"".join(packets))
                self.sent += len(packets)
                next_tick += self.interval / TICKS
                # The fleet's pace: each device heartbeats once per interval.
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            if link.lost:
                self.drops += 1
                continue
            deadline = time.monotonic() + 5
            while link.inflight and not link.lost and time.monotonic() < deadline:  # noqa: ASYNC110 - the protocol has no event for it
                await asyncio.sleep(0.01)
            link.transport.write(b"\xe0\x00")  # DISCONNECT
            link.transport.close()

    async def running(self, conn: asyncpg.Connection, after: float | None = None) -> None:
        """Wait until every device has had a heartbeat acknowledged (after the monotonic
        ``after``, when given) and stored: the fleet's load is flowing through the gateway."""
        since = time.monotonic() if after is None else after

        async def stored() -> bool:
            acked = self.acked_after(since)
            return (len(acked) == sum(map(len, self.groups))
                    and not await behind(conn, acked))

        await wait_for(stored, 10 + 3 * self.interval, interval=0.05)

    def last_acked(self) -> list[tuple[str, int, float]]:
        """Each connection's last acknowledged heartbeat."""
        last: dict[int, tuple[str, int, float]] = {}
        group = {serial: n for n, serials in enumerate(self.groups) for serial in serials}
        for acked in self.acked:  # in order of acknowledgement
            last[group[acked[0]]] = acked
        return list(last.values())

    def acked_after(self, moment: float) -> dict[str, int]:
        """The first heartbeat acknowledged after ``moment``, per serial."""
        first: dict[str, int] = {}
        for serial, ts, at in self.acked:
            if at > moment and serial not in first:
                first[serial] = ts
        return first


# ---- database helpers ---------------------------------------------------------------------


def serials_for(n: int, prefix: str = "SIM-") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


async def seed(conn: asyncpg.Connection, serials: list[str]) -> None:
    """Register ``serials`` directly, as `POST /v1/devices` would (settings version 1)."""
    document = json.dumps(settings_schema.defaults())
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO devices (id, serial_number, device_type)"
            " SELECT 'dev_' || substr(md5(s), 1, 20), s, 'sim_v1' FROM unnest($1::text[]) s",
            serials,
        )
        for table in ("device_settings", "device_settings_history"):
            await conn.execute(
                f"INSERT INTO {table} (device_id, document, version)"
                " SELECT id, $1::text::json, 1 FROM devices WHERE serial_number = ANY($2)",
                document, serials,
            )
        await conn.execute(
            "INSERT INTO device_health (device_id, serial_number)"
            " SELECT id, serial_number FROM devices WHERE serial_number = ANY($1)",
            serials,
        )


async def start_own_services(pg: Postgres, broker: Mosquitto,
                             serials: list[str]) -> tuple[str, str]:
    """Start the test's own PostgreSQL cluster and Mosquitto, migrate, seed ``serials``.
    Returns the database URL and the device id of the first serial."""
    await asyncio.to_thread(pg.init)
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(broker.start)
    url = pg.url("gateway")
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await seed(conn, serials)
        device_id = await conn.fetchval(
            "SELECT id FROM devices WHERE serial_number = $1", serials[0])
    finally:
        await conn.close()
    return url, device_id


async def behind(conn: asyncpg.Connection, want: dict[str, int]) -> list[str]:
    """Serials whose stored heartbeat is older than ``want[serial]``, or whose health does
    not belong to their stored ``ts``."""
    rows = await conn.fetch(
        "SELECT serial_number, last_ts, battery_percent FROM device_health"
        " WHERE serial_number = ANY($1)", list(want),
    )
    stored = {r["serial_number"]: (r["last_ts"], r["battery_percent"]) for r in rows}
    late = []
    for serial, ts in want.items():
        got_ts, battery = stored.get(serial, (None, None))
        if got_ts is None or got_ts < ts or battery != got_ts % 101:
            late.append(serial)
    return late


async def wait_converged(conn: asyncpg.Connection, want: dict[str, int],
                         within: float) -> tuple[float | None, list[str]]:
    """(seconds until no device is behind ``want`` or None, the devices still behind)."""
    started = time.monotonic()
    while True:
        late = await behind(conn, want)
        if not late:
            return time.monotonic() - started, []
        if time.monotonic() - started > within:
            return None, late
        await asyncio.sleep(0.05)
