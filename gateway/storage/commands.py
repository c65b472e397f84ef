"""Commands: queued by backends, delivered with heartbeats, finished by acks, expiry or cancel.

An open command past ``expires_at`` reads as expired before the sweep persists it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import msgspec
from gateway_codecs.registry import MAX_OPEN_COMMANDS, Command, CommandResult

from gateway.errors import Conflict, NotFound, RateLimited
from gateway.storage import events
from gateway.storage.database import Aggregate, found, iso, iso_or_none
from gateway.storage.events import NewEvent

_object = msgspec.json.Decoder(dict[str, Any])
_result = msgspec.json.Decoder(CommandResult)

# The effective status: an open command past its expiry reads as expired.
_EFFECTIVE_STATUS = (
    "CASE WHEN c.status IN ('pending', 'delivered') AND c.expires_at <= now() "
    "THEN 'expired' ELSE c.status END"
)
SELECT = f"""
    SELECT c.id, c.device_id, c.type, c.params, c.attempts, c.result, c.created_at,
           c.delivered_at, c.expires_at, c.seq, {_EFFECTIVE_STATUS} AS status,
           CASE WHEN c.status IN ('pending', 'delivered') AND c.expires_at <= now()
                THEN c.expires_at ELSE c.completed_at END AS completed_at
    FROM commands c
"""


class Finished(msgspec.Struct, frozen=True):
    """A command that reached a terminal state (an ack, or the expiry sweep)."""

    id: str
    device_id: str
    type: str
    status: str


def command(row: Mapping[str, Any]) -> Command:
    result = row["result"]
    return Command(
        id=row["id"],
        device_id=row["device_id"],
        type=row["type"],
        params=_object.decode(row["params"]),
        status=row["status"],
        attempts=row["attempts"],
        created_at=iso(row["created_at"]),
        delivered_at=iso_or_none(row["delivered_at"]),
        completed_at=iso_or_none(row["completed_at"]),
        expires_at=iso(row["expires_at"]),
        result=None if result is None else _result.decode(result),
    )


async def expire_overdue(conn: asyncpg.Connection, device_id: str) -> None:
    """Persist the expiry of the device's overdue open commands (before counting them);
    the caller holds the device's health row lock (``events.lock_devices``)."""
    expired = await conn.fetch(
        "UPDATE commands SET status = 'expired', completed_at = expires_at"
        " WHERE device_id = $1 AND status IN ('pending', 'delivered') AND expires_at <= now()"
        " RETURNING id",
        device_id,
    )
    await record_events(conn, [("command.expired", row["id"]) for row in expired])


async def record_events(conn: asyncpg.Connection, happened: Sequence[tuple[str, str]]) -> None:
    """Record events (type, command id) in the caller's transaction; the caller holds the
    devices' health row locks."""
    await events.record_as_now(conn, happened, SELECT + " WHERE c.id = ANY($1::text[])",
                               command)


class Commands(Aggregate):
    async def create(
        self,
        device_id: str,
        command_id: str,
        command_type: str,
        params: dict[str, Any],
        ttl: dt.timedelta,
        idempotency_key: str | None,
    ) -> tuple[Command, bool]:
        """(command, created). The device row lock serialises the quota check."""
        async with self._db.transaction() as conn:
            found(await conn.fetchval(
                "SELECT id FROM devices WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                device_id,
            ))
            await events.lock_devices(conn, [device_id])
            if idempotency_key is not None:
                existing = await conn.fetchrow(
                    SELECT + " WHERE c.device_id = $1 AND c.idempotency_key = $2",
                    device_id, idempotency_key,
                )
                if existing is not None:
                    # JSON equality, not Python's: true == 1 in Python but not in JSON.
                    same_params = await conn.fetchval(
                        "SELECT $1::jsonb = $2::jsonb", existing["params"], params
                    )
                    if existing["type"] != command_type or not same_params:
                        raise Conflict("The idempotency key was used for a different command")
                    return command(existing), False
            await expire_overdue(conn, device_id)
            open_count = await conn.fetchval(
                "SELECT count(*) FROM commands WHERE device_id = $1"
                " AND status IN ('pending', 'delivered')",
                device_id,
            )
            if open_count >= MAX_OPEN_COMMANDS:
                raise RateLimited(
                    f"The device has {MAX_OPEN_COMMANDS} open commands; wait for acks or cancel"
                )
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO commands"
                        " (id, device_id, type, params, expires_at, idempotency_key)"
                        " VALUES ($1, $2, $3, $4, now() + $5, $6)",
                        command_id, device_id, command_type, params, ttl, idempotency_key,
                    )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict("A factory_reset is already open for this device") from exc
            row = await conn.fetchrow(SELECT + " WHERE c.id = $1", command_id)
            created = command(row)
            await events.record(conn, [NewEvent("command.created", created)])
        return created, True

    async def get(self, command_id: str) -> Command:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                SELECT + " JOIN devices d ON d.id = c.device_id"
                " WHERE c.id = $1 AND d.deleted_at IS NULL",
                command_id,
            )
        return command(found(row))

    async def page(
        self, device_id: str, limit: int, starting_after: str | None, status: str | None
    ) -> tuple[list[Command], bool]:
        """A page of the device's commands, newest first: (commands, has_more)."""
        async with self._db.connection() as conn:
            found(await conn.fetchval(
                "SELECT id FROM devices WHERE id = $1 AND deleted_at IS NULL", device_id
            ))
            after_seq = None
            if starting_after is not None:
                after_seq = await conn.fetchval(
                    "SELECT seq FROM commands WHERE id = $1 AND device_id = $2",
                    starting_after, device_id,
                )
                if after_seq is None:
                    raise NotFound(f"No such command: {starting_after}")
            rows = await conn.fetch(
                SELECT
                + " WHERE c.device_id = $1 AND ($2::bigint IS NULL OR c.seq < $2)"
                f"  AND ($3::text IS NULL OR {_EFFECTIVE_STATUS} = $3)"
                " ORDER BY c.seq DESC LIMIT $4",
                device_id, after_seq, status, limit + 1,
            )
        return [command(row) for row in rows[:limit]], len(rows) > limit

    async def cancel(self, command_id: str) -> Command:
        """Cancel an open command; 409 when it is already terminal."""
        async with self._db.transaction() as conn:
            device_id = found(await conn.fetchval(
                "SELECT c.device_id FROM commands c JOIN devices d ON d.id = c.device_id"
                " WHERE c.id = $1 AND d.deleted_at IS NULL",
                command_id,
            ))
            # The device's health row before its commands, as every writer takes them.
            await events.lock_devices(conn, [device_id])
            await expire_overdue(conn, device_id)
            canceled = await conn.fetchval(
                "UPDATE commands SET status = 'canceled', completed_at = now()"
                " WHERE id = $1 AND status IN ('pending', 'delivered') RETURNING id",
                command_id,
            )
            current = command(await conn.fetchrow(SELECT + " WHERE c.id = $1", command_id))
            if canceled is not None:
                await events.record(conn, [NewEvent("command.canceled", current)])
        if canceled is None:
            raise Conflict(f"Command is already {current.status}")
        return current

    async def expire(self, most: int = 5000) -> list[Finished]:
        """Persist the expiry of open commands past ``expires_at``, for up to ``most``
        devices whose health row is not locked by a writer right now (the others are
        left for the next sweep); returns what expired."""
        async with self._db.transaction() as conn:
            devices = await conn.fetchval(
                "SELECT array_agg(device_id) FROM (SELECT DISTINCT device_id FROM commands"
                "  WHERE status IN ('pending', 'delivered') AND expires_at <= now()"
                "  LIMIT $1) overdue",
                most,
            )
            if not devices:
                return []
            locked = await events.lock_devices(conn, devices, skip_locked=True)
            rows = await conn.fetch(
                "UPDATE commands SET status = 'expired', completed_at = expires_at"
                " WHERE status IN ('pending', 'delivered') AND expires_at <= now()"
                "   AND device_id = ANY($1::text[])"
                " RETURNING id, device_id, type, status",
                locked,
            )
            await record_events(conn, [("command.expired", row["id"]) for row in rows])
        return [Finished(*row) for row in rows]
