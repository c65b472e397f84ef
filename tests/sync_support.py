"""Helpers shared by the device sync tests (heartbeats, commands, settings)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
from conftest import Caller, device, wait_for
from gateway_codecs import settings as settings_schema
from prometheus_client import REGISTRY

HEALTH_COLUMNS = (
    "firmware_version", "battery_percent", "storage_used_mb", "storage_total_mb",
    "signal_strength_dbm", "recording_state",
)


# conftest's simulated device (it already sets TCP_NODELAY), under this module's name.
sim_device = device


def now_ms() -> int:
    return int(time.time() * 1000)


def metric(name: str, **labels: str) -> float:
    """The current value of a sample in the process-wide registry (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rejected(reason: str) -> float:
    return metric("gateway_heartbeats_rejected_total", reason=reason)


def handled() -> float:
    """Heartbeats the in-process gateway is done with: applied, stale, superseded or
    rejected (received = applied + stale + superseded + rejected).

    A barrier for what a heartbeat did not cause: the gateway counts a written heartbeat
    and queues its answer for the broker in one call (`DeviceReplies.written`), so once a
    heartbeat is counted here, any answer it got is already on its way, ahead of every
    answer to a later heartbeat.
    """
    total = sum(metric(f"gateway_heartbeats_{outcome}_total")
                for outcome in ("applied", "stale", "superseded"))
    for family in REGISTRY.collect():
        if family.name == "gateway_heartbeats_rejected":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def settled(before: float, count: int = 1) -> None:
    """Wait until ``count`` heartbeats more than ``before`` (a `handled()` reading) are
    handled."""
    await wait_for(lambda: handled() >= before + count)


async def register(api: Caller, serial: str, **fields: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "/v1/devices", {"serial_number": serial, **fields})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def device_row(db: asyncpg.Connection, serial: str) -> dict[str, Any] | None:
    """The stored device row with its health and its settings row's version, JSON columns
    decoded."""
    row = await db.fetchrow(
        "SELECT d.*, h.firmware_version, h.battery_percent, h.storage_used_mb,"
        " h.storage_total_mb, h.signal_strength_dbm, h.recording_state, h.last_ts,"
        " h.last_heartbeat_at, h.applied_version, s.version AS settings_version_current"
        " FROM devices d LEFT JOIN device_health h ON h.device_id = d.id"
        " LEFT JOIN device_settings s ON s.device_id = d.id"
        " WHERE d.serial_number = $1",
        serial,
    )
    if row is None:
        return None
    out = dict(row)
    for name in ("recording_state", "metadata"):
        if isinstance(out[name], str):
            out[name] = msgspec.json.decode(out[name])
    return out


async def command_row(db: asyncpg.Connection, command_id: str) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)
    assert row is not None
    out = dict(row)
    for name in ("params", "result"):
        if isinstance(out[name], str):
            out[name] = msgspec.json.decode(out[name])
    return out


async def insert_devices(db: asyncpg.Connection, serials: Sequence[str]) -> list[str]:
    """Register many devices at once, as ``Storage.register_device`` does (settings v1)."""
    ids = [f"dev_burst{n:015d}" for n in range(len(serials))]
    document = msgspec.json.encode(settings_schema.defaults()).decode()
    async with db.transaction():
        await db.execute(
            "INSERT INTO devices (id, serial_number) SELECT * FROM unnest($1::text[], $2::text[])",
            ids, list(serials),
        )
        await db.execute(
            "INSERT INTO device_health (device_id, serial_number)"
            " SELECT * FROM unnest($1::text[], $2::text[])",
            ids, list(serials),
        )
        await db.execute(
            "INSERT INTO device_settings (device_id, document, version)"
            " SELECT id, $2::json, 1 FROM unnest($1::text[]) AS t(id)",
            ids, document,
        )
        await db.execute(
            "INSERT INTO device_settings_history (device_id, version, document)"
            " SELECT id, 1, $2::json FROM unnest($1::text[]) AS t(id)",
            ids, document,
        )
    return ids


def _mqtt_string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _mqtt_packet(first_byte: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (128 if length else 0))
        if not length:
            return bytes([first_byte]) + bytes(encoded) + body


async def publish_burst(host: str, port: int, messages: Sequence[tuple[str, bytes]]) -> float:
    """Publish QoS 1 ``messages`` in order on one MQTT 3.1.1 connection, all in flight at
    once; return the seconds until the last PUBACK.

    aiomqtt awaits every PUBACK in a future of its own (about 1,000 msg/s on this
    machine) and paho rescans its queue on every PUBACK (a few thousand msg/s, and in
    this process it would starve the gateway's event loop): neither measures the gateway.
    Plain packets on a socket cost almost nothing.
    """
    if len(messages) > 65_535:
        raise ValueError("packet ids must stay unique among the messages in flight")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        client_id = f"burst-{uuid.uuid4().hex[:12]}".encode()
        writer.write(_mqtt_packet(0x10, _mqtt_string(b"MQTT") + bytes([4, 0x02, 0, 60])
                                  + _mqtt_string(client_id)))
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00", "CONNACK refused"
        packets = [
            _mqtt_packet(0x32, _mqtt_string(topic.encode()) + n.to_bytes(2, "big") + payload)
            for n, (topic, payload) in enumerate(messages, start=1)
        ]
        start = time.perf_counter()
        writer.write(b"".join(packets))
        acks = await reader.readexactly(4 * len(messages))
        elapsed = time.perf_counter() - start
        assert acks[0::4] == b"\x40" * len(messages), "expected only PUBACKs"
        writer.write(b"\xe0\x00")  # DISCONNECT
        await writer.drain()
        return elapsed
    finally:
        writer.close()
