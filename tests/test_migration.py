"""`gateway db migrate` upgrades a database made by an earlier schema in place, keeping
every device's registry, health and settings (docs/operations.md, Running it)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
from conftest import PG_ADMIN
from gateway_codecs import settings as settings_schema

from gateway.storage import Storage, migrate

BEFORE = Path(__file__).parent / "data" / "schema-before-device-health.sql"


async def test_health_columns_move_to_device_health_and_nothing_is_lost() -> None:
    """A database with health in `devices` and applied versions in `device_settings`:
    after migrate, the same device reads the same through the registry, its health sits in
    `device_health`, the old columns are gone, and migrating again changes nothing."""
    name = f"gw_migration_{uuid.uuid4().hex[:10]}"
    url = f"{PG_ADMIN}/{name}"
    admin = await asyncpg.connect(f"{PG_ADMIN}/postgres")
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(BEFORE.read_text())
            document = json.dumps(settings_schema.defaults())
            await conn.execute(
                "INSERT INTO devices (id, serial_number, device_type, firmware_version, metadata,"
                " battery_percent, storage_used_mb, storage_total_mb, signal_strength_dbm,"
                " recording_state, last_ts, last_heartbeat_at, end_user_id, deleted_at)"
                " VALUES ('dev_old1', 'SN-OLD-1', 'bota_pin_v1', '1.2.3', '{\"a\": 1}',"
                "  77, 512, 32768, -60, '{\"device_state\": \"idle\"}', 1700000000000,"
                "  '2025-01-15T12:00:00Z', 'eu_1', NULL),"
                " ('dev_old2', 'SN-OLD-2', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
                "  NULL, NULL, NULL, now())"
            )
            await conn.execute(
                "INSERT INTO device_settings (device_id, document, version, applied_version)"
                " VALUES ('dev_old1', $1::json, 3, 2), ('dev_old2', $1::json, 1, 0)",
                document,
            )
        finally:
            await conn.close()
        await migrate(url)
        await migrate(url)  # safe to run again
        conn = await asyncpg.connect(url)
        try:
            columns = {r["column_name"] for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'devices'")}
            health = {r["device_id"]: dict(r) for r in await conn.fetch(
                "SELECT * FROM device_health ORDER BY device_id")}
            applied = await conn.fetchval(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_name = 'device_settings' AND column_name = 'applied_version'")
        finally:
            await conn.close()
        assert not columns & {"battery_percent", "last_ts", "firmware_version",
                              "recording_state", "last_heartbeat_at"}
        assert applied == 0
        old1 = health["dev_old1"]
        assert (old1["serial_number"], old1["battery_percent"], old1["last_ts"],
                old1["firmware_version"], old1["settings_version"], old1["applied_version"],
                old1["deleted"]) == ("SN-OLD-1", 77, 1700000000000, "1.2.3", 3, 2, False)
        assert health["dev_old2"]["deleted"] is True
        async with Storage.open(url, min_size=1, max_size=1) as storage:
            device = await storage.devices.get("dev_old1")
            settings = await storage.settings.get("dev_old1")
        assert (device.battery_percent, device.firmware_version, device.status,
                device.last_heartbeat_at) == (77, "1.2.3", "bound", "2025-01-15T12:00:00.000Z")
        assert device.recording_state is not None
        assert device.recording_state.device_state == "idle"
        assert (settings.version, settings.applied_version) == (3, 2)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
