"""Heartbeat batches: health, acks, and what each device must be sent back, in one transaction.

The batch is written column-wise (``unnest`` of one array per field) in one statement per
round, which also marks the open commands delivered and returns each device's commands
(decoded into ``gateway_codecs.device.Command``) and its settings gap, so replying costs
no query per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from gateway_codecs.device import Command
from gateway_codecs.registry import COMMANDS_PER_MESSAGE

from gateway.errors import BatchFailed
from gateway.storage.commands import Finished
from gateway.storage.commands import record_events as record_command_events
from gateway.storage.database import Aggregate
from gateway.storage.devices import record_events as record_device_events
from gateway.storage.settings import HISTORY_KEEP

_document = msgspec.json.Decoder(dict[str, Any])
_commands = msgspec.json.Decoder(list[Command])

# The batch statements' cost depends on the batch size, which a generic plan cannot see:
# it estimates unnest($1) at 10 rows and rescans a CTE per input row, quadratic in the
# batch. JIT compiling costs tens of milliseconds per batch, more than it saves here.
# Only in this transaction: the registry's small lookups keep their cached plans.
_BATCH_SETTINGS = "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL jit = off"
# A heartbeat batch need not wait for its WAL to reach the disk (docs/performance.md): a
# crash of PostgreSQL can lose its last fraction of a second of heartbeats, which every
# device's next heartbeat repairs; registry writes stay synchronous.
_ASYNC_COMMIT = "; SET LOCAL synchronous_commit = off"

_RETRYABLE = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.LockNotAvailableError,
)


@dataclass(frozen=True, slots=True)
class HeartbeatColumns:
    """One round of a heartbeat batch, column-wise, at most one row per serial."""

    serials: list[str]
    ts: list[int | None]
    firmware: list[str | None]
    battery: list[int | None]
    storage_used: list[int | None]
    storage_total: list[int | None]
    signal: list[int | None]
    recording_state: list[str | None]  # JSON text
    settings_version: list[int | None]
    received: list[float]  # gateway receive time, epoch seconds: last_heartbeat_at
    # False where the same device has a later heartbeat in a later round of the batch:
    # its open commands go out once, with the last one.
    deliver: list[bool]


@dataclass(frozen=True, slots=True)
class AckColumns:
    serials: list[str]
    ids: list[str]
    statuses: list[str]
    details: list[str | None]


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """A heartbeat of the batch that needs attention: one applied whose device must be
    sent something, or one not applied (stale, or an unknown or deleted device)."""

    serial: str
    device_id: str | None  # None: no device has this serial
    deleted: bool
    applied: bool  # False: deleted, unknown, or not newer than the stored ts
    commands: list[Command]  # the device's open commands, sent now, oldest first
    settings_version: int | None  # the current version, when the device is behind
    current_settings: dict[str, Any] | None
    base_settings: dict[str, Any] | None  # the version the device has, if still kept
    reported_version: int | None


class Written(msgspec.Struct, kw_only=True):
    """What a batch did: the heartbeats needing attention, how many were applied in all,
    and the commands the batch's acks finished."""

    outcomes: list[Outcome]
    applied: int
    finished: list[Finished]


def _outcome(row: asyncpg.Record) -> Outcome:
    current, base, commands = row["current_settings"], row["base_settings"], row["commands"]
    return Outcome(
        serial=row["serial"],
        device_id=row["device_id"],
        deleted=row["deleted"],
        applied=row["applied"],
        commands=[] if commands is None else _commands.decode(commands),
        settings_version=row["version"],
        current_settings=None if current is None else _document.decode(current),
        base_settings=None if base is None else _document.decode(base),
        reported_version=row["reported_version"],
    )


class Heartbeats(Aggregate):
    # Whether a batch waits for its WAL flush (GATEWAY_HEARTBEAT_SYNC_COMMIT; off by default).
    synchronous_commit = False

    async def apply(
        self, rounds: Sequence[HeartbeatColumns], acks: AckColumns | None
    ) -> Written:
        """Apply a heartbeat batch in one transaction: acks first, then each round.

        Raises ``BatchFailed`` when PostgreSQL refuses the batch.
        """
        try:
            async with self._db.transaction() as conn:
                await conn.execute(
                    _BATCH_SETTINGS if self.synchronous_commit else _BATCH_SETTINGS + _ASYNC_COMMIT
                )
                finished: list[Finished] = []
                happened = _Happened()
                if acks is not None:
                    # Lock the acking devices' health rows first: every other writer of a
                    # device's commands takes that row before them, so this order cannot
                    # deadlock with them (and it orders the device's events).
                    await conn.execute(_LOCK_DEVICES_SQL, acks.serials)
                    finished = [
                        Finished(*row) for row in await conn.fetch(
                            _ACK_SQL, acks.serials, acks.ids, acks.statuses, acks.details
                        )
                    ]
                    happened.commands.extend((f"command.{f.status}", f.id) for f in finished)
                written = Written(outcomes=[], applied=0, finished=finished)
                for columns in rounds:
                    rows = await conn.fetch(
                        _HEARTBEAT_SQL,
                        columns.serials, columns.ts, columns.firmware, columns.battery,
                        columns.storage_used, columns.storage_total, columns.signal,
                        columns.recording_state, columns.settings_version,
                        columns.received, columns.deliver, COMMANDS_PER_MESSAGE, HISTORY_KEEP,
                    )
                    for row in rows:
                        if row["serial"] is None:
                            written.applied += row["version"]
                            continue
                        happened.add(row)
                        if row["applied"] is False or row["commands"] or row["version"]:
                            written.outcomes.append(_outcome(row))
                await happened.record(conn)
        except asyncpg.PostgresError as exc:
            raise BatchFailed(
                f"{type(exc).__name__}: {exc}", retryable=isinstance(exc, _RETRYABLE)
            ) from exc
        return written


class _Happened:
    """The events a batch causes, recorded in its transaction once the batch is written:
    devices coming online or reporting their current settings, first deliveries of
    commands, and commands the acks finished."""

    def __init__(self) -> None:
        self.devices: list[tuple[str, str]] = []  # (event type, device id)
        self.commands: list[tuple[str, str]] = []  # (event type, command id)

    def add(self, row: asyncpg.Record) -> None:
        if row["came_online"]:
            self.devices.append(("device.online", row["device_id"]))
        if row["settings_applied"]:
            self.devices.append(("device.settings_applied", row["device_id"]))
        self.commands.extend(("command.delivered", c) for c in row["first_delivered"] or ())

    async def record(self, conn: asyncpg.Connection) -> None:
        await record_device_events(conn, self.devices)
        await record_command_events(conn, self.commands)


# NO KEY UPDATE, not UPDATE: it still serialises with the other writers of a device's
# health row, but not with the KEY SHARE lock of a foreign-key check.
_LOCK_DEVICES_SQL = """
SELECT 1 FROM device_health WHERE serial_number = ANY($1::text[]) ORDER BY device_id
FOR NO KEY UPDATE
"""

# Acks from a batch: only open, unexpired commands of the acking (live) device change.
_ACK_SQL = """
UPDATE commands c
SET status = a.status, completed_at = now(), result = jsonb_build_object('detail', a.detail)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS a(serial, id, status, detail)
JOIN devices d ON d.serial_number = a.serial AND d.deleted_at IS NULL
WHERE c.id = a.id AND c.device_id = d.id
  AND c.status IN ('pending', 'delivered') AND c.expires_at > now()
RETURNING c.id, c.device_id, c.type, c.status
"""

# One round of heartbeats (one row per serial) in one statement: the ts-guarded health
# write (with the settings version the device reports), then, only for the devices that
# need it (and only with a device's last heartbeat of the batch, `deliver`), its open
# commands (marked delivered) and its settings gap. `commands` is
# built here, as JSON that decodes into gateway_codecs.device.Command (timestamps to the
# millisecond). Heartbeats not applied (stale, unknown or deleted device) are looked up
# again only to tell which.
_HEARTBEAT_SQL = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::smallint[], $5::bigint[],
                         $6::bigint[], $7::smallint[], $8::text[], $9::int[], $10::float8[],
                         $11::bool[])
        AS t(serial, ts, firmware, battery, used, total, signal, rec, sv, received, deliver)
), upd AS (
    UPDATE device_health h SET
        last_ts = COALESCE(i.ts, h.last_ts),
        firmware_version = COALESCE(i.firmware, h.firmware_version),
        battery_percent = COALESCE(i.battery, h.battery_percent),
        storage_used_mb = COALESCE(i.used, h.storage_used_mb),
        storage_total_mb = COALESCE(i.total, h.storage_total_mb),
        signal_strength_dbm = COALESCE(i.signal, h.signal_strength_dbm),
        recording_state = COALESCE(i.rec::jsonb, h.recording_state),
        applied_version = COALESCE(i.sv, h.applied_version),
        last_heartbeat_at = to_timestamp(i.received),
        -- Set values that tell, in RETURNING, what this heartbeat changed.
        online_since = COALESCE(h.online_since, to_timestamp(i.received)),
        applied_at = CASE WHEN i.sv IS DISTINCT FROM h.applied_version AND i.sv IS NOT NULL
                          THEN to_timestamp(i.received) ELSE h.applied_at END
    FROM input i
    WHERE h.serial_number = i.serial AND NOT h.deleted
      AND (i.ts IS NULL OR h.last_ts IS NULL OR i.ts > h.last_ts)
    RETURNING h.device_id, h.serial_number, i.sv, i.deliver, h.settings_version,
              h.online_since = to_timestamp(i.received) AS came_online,
              h.applied_at = to_timestamp(i.received) AND i.sv = h.settings_version
                  AS settings_applied
), due AS (
    SELECT o.id FROM upd u CROSS JOIN LATERAL (
        SELECT c.id FROM commands c
        WHERE c.device_id = u.device_id AND c.status IN ('pending', 'delivered')
          AND c.expires_at > now()
        ORDER BY c.seq LIMIT $12
    ) o
    WHERE u.deliver
), sent AS (
    -- The status test is not redundant with `due`: when a cancel (or the expiry sweep)
    -- commits while this waits for the row lock, PostgreSQL re-checks only this WHERE
    -- against the new row, and a terminal command must stay terminal and unsent.
    UPDATE commands c SET status = 'delivered', attempts = c.attempts + 1, delivered_at = now()
    FROM due WHERE c.id = due.id AND c.status IN ('pending', 'delivered')
    RETURNING c.device_id, c.seq, c.id, c.type, c.params, c.created_at, c.expires_at,
              c.attempts
), sent_by_device AS (
    SELECT device_id, json_agg(json_build_object(
        'id', id, 'type', type, 'params', params,
        'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'expires_at', to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
    ) ORDER BY seq)::text AS commands,
    array_agg(id ORDER BY seq) FILTER (WHERE attempts = 1) AS first_delivered
    FROM sent GROUP BY device_id
), gap AS (
    -- Any version but the current one needs an update: an older one a patch from history
    -- (or the full document once out of the kept window), one never issued (newer than
    -- current) the full document.
    SELECT u.device_id, s.version, s.document AS current_settings, h.document AS base_settings
    FROM upd u JOIN device_settings s ON s.device_id = u.device_id
    LEFT JOIN device_settings_history h
        ON h.device_id = s.device_id AND h.version = u.sv AND h.version > s.version - $13
    WHERE u.deliver AND u.sv IS NOT NULL AND u.sv <> u.settings_version
), missing AS (
    SELECT i.serial, h.device_id, h.deleted FROM input i
    LEFT JOIN device_health h ON h.serial_number = i.serial
    WHERE NOT EXISTS (SELECT 1 FROM upd u WHERE u.serial_number = i.serial)
)
-- Rows only for what needs the gateway's attention: applied heartbeats with something to
-- send or an event to record, heartbeats not applied; then one row counting every
-- heartbeat applied.
SELECT u.serial_number AS serial, u.device_id, false AS deleted, true AS applied, sb.commands,
       g.version, g.current_settings, g.base_settings, u.sv AS reported_version,
       u.came_online, u.settings_applied, sb.first_delivered
FROM upd u
LEFT JOIN sent_by_device sb ON sb.device_id = u.device_id
LEFT JOIN gap g ON g.device_id = u.device_id
WHERE sb.commands IS NOT NULL OR g.version IS NOT NULL OR u.came_online OR u.settings_applied
UNION ALL
SELECT m.serial, m.device_id, COALESCE(m.deleted, false), false, NULL, NULL, NULL, NULL, NULL,
       false, false, NULL
FROM missing m
UNION ALL
SELECT NULL, NULL, false, true, NULL, (SELECT count(*) FROM upd)::int, NULL, NULL, NULL,
       false, false, NULL
"""
