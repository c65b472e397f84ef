"""Helpers shared by the device sync tests (heartbeats, commands, settings)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
from gateway_codecs import settings as settings_schema
from prometheus_client import REGISTRY

from conftest import Caller

HEALTH_COLUMNS = (
    "firmware_version", "battery_percent", "storage_used_mb", "storage_total_mb",
    "signal_strength_dbm", "recording_state",
)


def now_ms() -> int:
    return int(time.time() * 1000)


def metric(name: str, **labels: str) -> float:
    """The current value of a sample in the process-wide registry (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rejected(reason: str) -> float:
    return metric("gateway_heartbeats_rejected_total", reason=reason)


async def register(api: Caller, serial: str, **fields: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "/v1/devices", {"serial_number": serial, **fields})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def device_row(db: asyncpg.Connection, serial: str) -> dict[str, Any] | None:
    """The stored device row with its settings row's versions, JSON columns decoded."""
    row = await db.fetchrow(
        "SELECT d.*, s.version AS settings_version_current, s.applied_version"
        " FROM devices d LEFT JOIN device_settings s ON s.device_id = d.id"
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
