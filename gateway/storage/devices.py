"""Devices: registration, the Telemetron upsert, reads, binding, reset, delete and restore."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import asyncpg
import msgspec
from gateway_codecs.device import RecordingState
from gateway_codecs.registry import Device, model_of
from gateway_codecs.settings import Settings, defaults

from gateway.errors import Conflict, NotFound
from gateway.storage import events
from gateway.storage.coalesce import Coalesced
from gateway.storage.commands import expire_overdue
from gateway.storage.commands import record_events as record_command_events
from gateway.storage.database import Aggregate, Database, found, iso, iso_or_none

_settings = msgspec.json.Decoder(Settings)
_recording_state = msgspec.json.Decoder(RecordingState)
_object = msgspec.json.Decoder(dict[str, Any])

# Devices read by id in one statement at most, and such statements at once (`Coalesced`).
READ_BATCH = 64
READ_CONCURRENCY = 4

# Presence (protocol §11), from the last applied heartbeat of device_health `h`. The
# threshold is the connection's `gateway.offline_after` setting (`create_pool`).
CONNECTIVITY = """
    CASE WHEN h.last_heartbeat_at IS NULL THEN 'unknown'
         WHEN h.last_heartbeat_at > now() - current_setting('gateway.offline_after')::interval
         THEN 'online' ELSE 'offline' END"""

# Every device route answers with this row: the registry, its health, its settings.
SELECT = f"""
    SELECT d.id, d.serial_number, d.device_type, h.firmware_version, d.end_user_id,
           d.bound_at, h.battery_percent, h.storage_used_mb, h.storage_total_mb,
           h.signal_strength_dbm, h.last_heartbeat_at, {CONNECTIVITY} AS connectivity,
           h.recording_state, d.metadata, s.document AS settings, d.created_at,
           d.updated_at, d.deleted_at
    FROM devices d JOIN device_health h ON h.device_id = d.id
    JOIN device_settings s ON s.device_id = d.id
"""


def device(row: Mapping[str, Any]) -> Device:
    """The device object from a row of `SELECT`."""
    device_type = row["device_type"]
    end_user_id = row["end_user_id"]
    recording_state = row["recording_state"]
    metadata = row["metadata"]
    return Device(
        id=row["id"],
        serial_number=row["serial_number"],
        device_type=device_type,
        model=model_of(device_type),
        firmware_version=row["firmware_version"],
        status="unbound" if end_user_id is None else "bound",
        end_user_id=end_user_id,
        bound_at=iso_or_none(row["bound_at"]),
        battery_percent=row["battery_percent"],
        storage_used_mb=row["storage_used_mb"],
        storage_total_mb=row["storage_total_mb"],
        signal_strength_dbm=row["signal_strength_dbm"],
        last_heartbeat_at=iso_or_none(row["last_heartbeat_at"]),
        connectivity=row["connectivity"],
        recording_state=None if recording_state is None else _recording_state.decode(
            recording_state
        ),
        metadata=None if metadata is None else _object.decode(metadata),
        settings=_settings.decode(row["settings"]),
        created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]),
    )


async def record_events(conn: asyncpg.Connection, happened: Sequence[tuple[str, str]]) -> None:
    """Record events (type, device id) in the caller's transaction, which holds the
    devices' health row locks (or created the devices)."""
    await events.record_as_now(conn, happened, SELECT + " WHERE d.id = ANY($1::text[])",
                               device)


# A device's change from PATCH: (firmware, metadata) to write, or None for no change.
DeviceChange = Callable[[Device], "tuple[str | None, dict[str, Any] | None] | None"]
# A registration's outcome: the device, and whether this call created it.
Registered = tuple[Device, bool]


class NewDevice(NamedTuple):
    """A device to register, with the id it gets if its serial is new."""

    id: str
    serial: str
    device_type: str | None = None
    firmware: str | None = None
    metadata: dict[str, Any] | None = None


class Devices(Aggregate):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        # GET /v1/devices/{id} is the registry's hot path: reads asked for at the same
        # time share one statement.
        self._by_id: Coalesced[str, asyncpg.Record] = Coalesced(
            self._read, most=READ_BATCH, concurrency=READ_CONCURRENCY)

    async def register(
        self,
        device_id: str,
        serial: str,
        device_type: str | None,
        firmware: str | None,
        metadata: dict[str, Any] | None,
    ) -> Registered:
        """Insert a device at settings version 1: (device, created). 409 if deleted."""
        [outcome] = await self.register_batch(
            [NewDevice(device_id, serial, device_type, firmware, metadata)]
        )
        if isinstance(outcome, Conflict):
            raise outcome
        return outcome

    async def register_batch(self, batch: Sequence[NewDevice]) -> list[Registered | Conflict]:
        """Register devices together, each as `register` would: one outcome per item, in
        order, either (device, created) or the Conflict of a deleted device's serial.

        One statement for the whole batch (`_REGISTER_SQL`): the devices rows, and for
        each new one its device_health, device_settings and first settings history rows.
        A serial given twice is registered by its first item; the later ones read the
        device as already registered, as sequential registrations would.
        """
        firsts: dict[str, NewDevice] = {}
        for new in batch:
            firsts.setdefault(new.serial, new)
        items = list(firsts.values())
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                _REGISTER_SQL,
                [new.id for new in items], [new.serial for new in items],
                [new.device_type for new in items], [new.firmware for new in items],
                [new.metadata for new in items], defaults(),
            )
            by_serial = {row["serial_number"]: row for row in rows}
            # The rows are the devices as stored: their events need no second read.
            objects = {row["id"]: device(row) for row in rows}
            await events.record(conn, [events.NewEvent("device.registered", objects[new.id])
                                       for new in items if new.id in objects])
            missing = [serial for serial in firsts if serial not in by_serial]
            if missing:
                # Registered by a transaction that committed after this statement's
                # snapshot was taken (it waited for that one's insert): read them now.
                rows = await conn.fetch(SELECT + " WHERE d.serial_number = ANY($1)", missing)
                by_serial.update((row["serial_number"], row) for row in rows)
                objects.update((row["id"], device(row)) for row in rows)
        outcomes: list[Registered | Conflict] = []
        for new in batch:
            row = by_serial[new.serial]
            if row["deleted_at"] is not None:
                outcomes.append(Conflict(f"Serial number {new.serial} belongs to a deleted "
                                         "device"))
            else:  # created by this batch when it has the id proposed by this very item
                outcomes.append((objects[row["id"]], row["id"] == new.id))
        return outcomes

    async def upsert(
        self,
        device_id: str,
        serial: str,
        device_type: str | None,
        properties: dict[str, Any] | None,
    ) -> tuple[Device | None, bool]:
        """Telemetron upsert: (device, created); (None, False) when it is new but untyped.

        Properties merge into the metadata key by key. 409 for a deleted device.
        """
        async with self._db.transaction() as conn:
            if device_type is None:
                row = await conn.fetchrow(_UPSERT_UPDATE_SQL, serial, properties)
            else:
                row = await conn.fetchrow(
                    _UPSERT_INSERT_SQL, device_id, serial, device_type, properties
                )
            if row is None:
                deleted = await conn.fetchval(
                    "SELECT deleted_at IS NOT NULL FROM devices WHERE serial_number = $1", serial
                )
                if deleted:
                    raise Conflict(f"Device {serial} was deleted")
                return None, False
            if row["created"]:
                await _insert_health(conn, row["id"], serial, None)
                await _insert_settings(conn, row["id"])
            else:
                await events.lock_devices(conn, [row["id"]])
            current = await _changed(
                conn, row["id"], "device.registered" if row["created"] else "device.updated"
            )
        return current, row["created"]

    async def get(self, device_id: str) -> Device:
        """The device, unless deleted (NotFound); at once ``StorageUnavailable`` while the
        database is known to be down."""
        self._db.check_available()
        return device(found(await self._by_id.get(device_id)))

    async def _read(self, device_ids: list[str]) -> dict[str, asyncpg.Record]:
        # Bounded as a whole, so that reads queued behind it wait at most one timeout.
        return await self._db.within_timeout(self._fetch(device_ids))

    async def _fetch(self, device_ids: list[str]) -> dict[str, asyncpg.Record]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                SELECT + " WHERE d.id = ANY($1::text[]) AND d.deleted_at IS NULL", device_ids)
        return {row["id"]: row for row in rows}

    async def page(
        self,
        limit: int,
        starting_after: str | None,
        bound: bool | None,
        end_user_id: str | None,
        serial: str | None,
        connectivity: str | None = None,
    ) -> tuple[list[Device], bool]:
        """A page, newest first: (devices, has_more)."""
        async with self._db.connection() as conn:
            after_seq = None
            if starting_after is not None:
                after_seq = await conn.fetchval(
                    "SELECT seq FROM devices WHERE id = $1", starting_after
                )
                if after_seq is None:
                    raise NotFound(f"No such device: {starting_after}")
            rows = await conn.fetch(
                SELECT
                + " WHERE d.deleted_at IS NULL"
                "   AND ($1::bigint IS NULL OR d.seq < $1)"
                "   AND ($2::boolean IS NULL OR (d.end_user_id IS NOT NULL) = $2)"
                "   AND ($3::text IS NULL OR d.end_user_id = $3)"
                "   AND ($4::text IS NULL OR d.serial_number = $4)"
                f"  AND ($6::text IS NULL OR {CONNECTIVITY} = $6)"
                " ORDER BY d.seq DESC LIMIT $5",
                after_seq, bound, end_user_id, serial, limit + 1, connectivity,
            )
        return [device(row) for row in rows[:limit]], len(rows) > limit

    async def update(self, device_id: str, change: DeviceChange) -> Device:
        """Lock the device, let ``change`` compute (firmware, metadata), write if changed."""
        async with self._db.transaction() as conn:
            row = found(await conn.fetchrow(
                SELECT + " WHERE d.id = $1 AND d.deleted_at IS NULL FOR UPDATE OF d", device_id
            ))
            new = change(device(row))
            if new is None:
                return device(row)
            await conn.execute(
                "UPDATE devices SET metadata = $2, updated_at = now() WHERE id = $1",
                device_id, new[1],
            )
            await conn.execute(
                "UPDATE device_health SET firmware_version = $2 WHERE device_id = $1",
                device_id, new[0],
            )
            return await _changed(conn, device_id, "device.updated")

    async def delete(self, device_id: str) -> None:
        """Soft-delete; the device's broker credentials are marked for revocation."""
        async with self._db.transaction() as conn:
            # updated_at is left alone, here and in restore: a restored device reads
            # exactly as it did before the delete.
            found(await conn.fetchval(
                "UPDATE devices SET deleted_at = now()"
                " WHERE id = $1 AND deleted_at IS NULL RETURNING id",
                device_id,
            ))
            await conn.execute(
                "UPDATE device_health SET deleted = true WHERE device_id = $1", device_id
            )
            await conn.execute(
                "UPDATE device_credentials SET revoked_at = now()"
                " WHERE device_id = $1 AND revoked_at IS NULL",
                device_id,
            )
            await record_events(conn, [("device.deleted", device_id)])

    async def restore(self, device_id: str) -> Device:
        async with self._db.transaction() as conn:
            found(await conn.fetchval("SELECT id FROM devices WHERE id = $1", device_id))
            restored = await conn.fetchval(
                "UPDATE devices SET deleted_at = NULL WHERE id = $1 AND deleted_at IS NOT NULL"
                " RETURNING id",
                device_id,
            )
            await events.lock_devices(conn, [device_id])
            await conn.execute(
                "UPDATE device_health SET deleted = false WHERE device_id = $1 AND deleted",
                device_id,
            )
            if restored is None:  # it was not deleted: nothing changed
                return device(await conn.fetchrow(SELECT + " WHERE d.id = $1", device_id))
            return await _changed(conn, device_id, "device.restored")

    async def bind(self, device_id: str, end_user_id: str) -> Device:
        async with self._db.transaction() as conn:
            current = found(await conn.fetchrow(
                "SELECT end_user_id FROM devices WHERE id = $1 AND deleted_at IS NULL"
                " FOR UPDATE",
                device_id,
            ))["end_user_id"]
            if current is not None and current != end_user_id:
                raise Conflict("Device is bound to another end user")
            if current is not None:  # bound to this end user already: nothing changes
                return device(await conn.fetchrow(SELECT + " WHERE d.id = $1", device_id))
            await conn.execute(
                "UPDATE devices SET end_user_id = $2, bound_at = now(), updated_at = now()"
                " WHERE id = $1",
                device_id, end_user_id,
            )
            await events.lock_devices(conn, [device_id])
            return await _changed(conn, device_id, "device.bound")

    async def unbind(self, device_id: str) -> Device:
        async with self._db.transaction() as conn:
            if not await _unbind(conn, device_id):
                return device(await conn.fetchrow(SELECT + " WHERE d.id = $1", device_id))
            return await _changed(conn, device_id, "device.unbound")

    async def reset(self, device_id: str, command_id: str, ttl: dt.timedelta) -> Device:
        """Unbind and queue one factory_reset (never two open at once)."""
        async with self._db.transaction() as conn:
            unbound = await _unbind(conn, device_id)
            await expire_overdue(conn, device_id)
            queued = await conn.fetchval(
                "INSERT INTO commands (id, device_id, type, params, expires_at)"
                " VALUES ($1, $2, 'factory_reset', '{}'::jsonb, now() + $3)"
                " ON CONFLICT (device_id) WHERE type = 'factory_reset'"
                "   AND status IN ('pending', 'delivered') DO NOTHING RETURNING id",
                command_id, device_id, ttl,
            )
            await record_events(conn, [*([("device.unbound", device_id)] if unbound else []),
                                       ("device.reset", device_id)])
            if queued is not None:
                await record_command_events(conn, [("command.created", queued)])
            return device(await conn.fetchrow(SELECT + " WHERE d.id = $1", device_id))


async def _insert_health(
    conn: asyncpg.Connection, device_id: str, serial: str, firmware: str | None
) -> None:
    await conn.execute(
        "INSERT INTO device_health (device_id, serial_number, firmware_version)"
        " VALUES ($1, $2, $3)",
        device_id, serial, firmware,
    )


async def _unbind(conn: asyncpg.Connection, device_id: str) -> bool:
    """Unbind the device (404 if there is none); True if it was bound. Takes the device's
    row and then its health row, as every writer of events does."""
    was_bound = found(await conn.fetchval(
        "UPDATE devices d SET end_user_id = NULL, bound_at = NULL,"
        " updated_at = CASE WHEN old.end_user_id IS NULL THEN d.updated_at ELSE now() END"
        " FROM (SELECT id, end_user_id FROM devices WHERE id = $1 AND deleted_at IS NULL"
        "       FOR UPDATE) old"
        " WHERE d.id = old.id RETURNING old.end_user_id IS NOT NULL",
        device_id,
    ))
    await events.lock_devices(conn, [device_id])
    return bool(was_bound)


async def _changed(conn: asyncpg.Connection, device_id: str, event_type: str) -> Device:
    """The device as it now is, with the event of its change recorded."""
    current = device(await conn.fetchrow(SELECT + " WHERE d.id = $1", device_id))
    await events.record(conn, [events.NewEvent(event_type, current)])
    return current


async def _insert_settings(conn: asyncpg.Connection, device_id: str) -> None:
    """A new device's settings: the defaults, at version 1."""
    document = defaults()
    await conn.execute(
        "INSERT INTO device_settings (device_id, document, version) VALUES ($1, $2, 1)",
        device_id, document,
    )
    await conn.execute(
        "INSERT INTO device_settings_history (device_id, version, document) VALUES ($1, 1, $2)",
        device_id, document,
    )


_UPSERT_UPDATE_SQL = """
UPDATE devices SET
    metadata = CASE WHEN $2::jsonb IS NULL THEN metadata
                    ELSE COALESCE(metadata, '{}'::jsonb) || $2::jsonb END,
    updated_at = now()
WHERE serial_number = $1 AND deleted_at IS NULL
RETURNING id, false AS created
"""

# `xmax = 0` tells a row this statement inserted from one it updated.
_UPSERT_INSERT_SQL = """
INSERT INTO devices (id, serial_number, device_type, metadata) VALUES ($1, $2, $3, $4)
ON CONFLICT (serial_number) DO UPDATE SET
    device_type = EXCLUDED.device_type,
    metadata = CASE WHEN $4::jsonb IS NULL THEN devices.metadata
                    ELSE COALESCE(devices.metadata, '{}'::jsonb) || $4::jsonb END,
    updated_at = now()
WHERE devices.deleted_at IS NULL
RETURNING id, (xmax = 0) AS created
"""

# Registration of a batch, in one statement. The first part inserts what is new; the
# final SELECT answers every serial: new devices from what was inserted (the statement
# cannot read its own inserts), the others as they were when it started.
_REGISTER_SQL = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
        WITH ORDINALITY AS i (id, serial_number, device_type, firmware_version, metadata, n)
), numbered AS MATERIALIZED (
    -- Positions in input order, so that the list (newest first) has them in that order.
    SELECT i.*, nextval(pg_get_serial_sequence('devices', 'seq')) AS seq
    FROM input i ORDER BY n
), inserted AS (
    INSERT INTO devices (id, seq, serial_number, device_type, metadata)
    SELECT id, seq, serial_number, device_type, metadata FROM numbered
    -- In serial order: batches in flight together then wait for each other's serials in
    -- one order, never in a cycle (a deadlock).
    ORDER BY serial_number
    ON CONFLICT (serial_number) DO NOTHING
    RETURNING id, serial_number, device_type, metadata, created_at, updated_at
), health AS (
    INSERT INTO device_health (device_id, serial_number, firmware_version)
    SELECT ins.id, ins.serial_number, i.firmware_version
    FROM inserted ins JOIN input i USING (id)
), settings AS (
    INSERT INTO device_settings (device_id, document, version)
    SELECT id, $6::json, 1 FROM inserted
), history AS (
    INSERT INTO device_settings_history (device_id, version, document)
    SELECT id, 1, $6::json FROM inserted
)
SELECT ins.id, ins.serial_number, ins.device_type, i.firmware_version,
       NULL::text AS end_user_id, NULL::timestamptz AS bound_at,
       NULL::smallint AS battery_percent, NULL::bigint AS storage_used_mb,
       NULL::bigint AS storage_total_mb, NULL::smallint AS signal_strength_dbm,
       NULL::timestamptz AS last_heartbeat_at, 'unknown' AS connectivity,
       NULL::jsonb AS recording_state,
       ins.metadata, $6::json AS settings, ins.created_at, ins.updated_at,
       NULL::timestamptz AS deleted_at
FROM inserted ins JOIN input i USING (id)
UNION ALL
{SELECT} WHERE d.serial_number = ANY($2::text[])
"""
