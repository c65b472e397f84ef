"""Events: the outbox written with each change, the relay's queries, the events API.

`record` inserts events in the caller's transaction, so an event exists if and only if its
change committed; the transaction's NOTIFY wakes the relay at commit. The relay (one
process at a time, see ``gateway.events_relay``) takes unpublished events in `seq`
order, gives them positions (their ids) in that order, publishes them and marks them
published once the broker has acknowledged them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Literal

import asyncpg
import msgspec
from gateway_codecs.events import EventData
from gateway_codecs.registry import Command, Device

from gateway.storage.database import Aggregate, iso

CHANNEL = "gateway_events"
RELAY_LOCK = 7261555  # the session advisory lock the relay holds
ID_PREFIX = "evt_"
_ID_DIGITS = 20
_LAST_POSITION = 2**63 - 1  # a bigint

_data = msgspec.json.Encoder()


def event_id(position: int) -> str:
    """``evt_`` and the position, zero-padded so that ids sort as positions do."""
    return f"{ID_PREFIX}{position:0{_ID_DIGITS}d}"


def position_of(event: str) -> int | None:
    """The position in an event id (``None`` if it is none); ids past the last possible
    position read as that position."""
    digits = event.removeprefix(ID_PREFIX)
    if not event.startswith(ID_PREFIX) or not (digits.isascii() and digits.isdigit()):
        return None
    return min(int(digits), _LAST_POSITION) if len(digits) <= _ID_DIGITS else None


class NewEvent(msgspec.Struct, frozen=True):
    """An event to record: its type and the device or command after the change."""

    type: str
    object: Device | Command

    @property
    def device_id(self) -> str:
        return self.object.id if isinstance(self.object, Device) else self.object.device_id


async def record(conn: asyncpg.Connection, events: Sequence[NewEvent]) -> None:
    """Insert ``events`` in ``conn``'s transaction, in order; the caller holds the device
    rows' locks (device_health) so that one device's events keep their commit order."""
    if not events:
        return
    await conn.execute(
        "WITH recorded AS (INSERT INTO events (type, device_id, data)"
        "   SELECT t, d, x::json FROM unnest($1::text[], $2::text[], $3::text[])"
        "     WITH ORDINALITY AS u(t, d, x, n) ORDER BY n RETURNING 1)"
        " SELECT pg_notify($4, '') WHERE EXISTS (SELECT FROM recorded)",
        [e.type for e in events], [e.device_id for e in events],
        [_data.encode(EventData(e.object)).decode() for e in events], CHANNEL,
    )


async def record_as_now(
    conn: asyncpg.Connection,
    happened: Sequence[tuple[str, str]],
    select: str,
    to_object: Callable[[asyncpg.Record], Device | Command],
) -> None:
    """Record events given as (type, object id), each with its object as it is now in
    this transaction: ``select`` reads the objects whose ids are in the array ``$1``."""
    if not happened:
        return
    rows = await conn.fetch(select, list({object_id for _, object_id in happened}))
    objects = {row["id"]: to_object(row) for row in rows}
    await record(conn, [NewEvent(kind, objects[object_id]) for kind, object_id in happened])


async def lock_devices(
    conn: asyncpg.Connection, device_ids: Sequence[str], *, skip_locked: bool = False
) -> list[str]:
    """Take the device_health row locks that order each device's events (in id order);
    with ``skip_locked``, only those free now. Returns the ids locked."""
    locked: list[str] = await conn.fetchval(
        "SELECT COALESCE(array_agg(device_id), '{}') FROM (SELECT device_id FROM device_health"
        " WHERE device_id = ANY($1::text[]) ORDER BY device_id FOR NO KEY UPDATE"
        + (" SKIP LOCKED" if skip_locked else "") + ") locked",
        list(device_ids),
    )
    return locked


class StoredEvent(msgspec.Struct, kw_only=True):
    """An event as stored: `gateway_codecs.events.Event` with ``data`` kept as the JSON
    text written at the change (the object as it was then), never decoded again."""

    id: str
    object: Literal["event"] = "event"
    type: str
    created_at: str
    device_id: str
    data: msgspec.Raw


class StoredEventList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[StoredEvent]
    has_more: bool


def _event(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(id=event_id(row["position"]), type=row["type"],
                       created_at=iso(row["created_at"]), device_id=row["device_id"],
                       data=msgspec.Raw(row["data"].encode()))


class Outbox(Aggregate):
    async def assign(self, conn: asyncpg.Connection, most: int) -> list[StoredEvent]:
        """Give positions to the oldest events without one (in `seq` order) and return
        every event given a position but not yet published, in position order. ``conn``
        is the relay's own connection; only the relay assigns, so positions grow in the
        order they are assigned, and a reader never finds a new one below one it saw."""
        async with conn.transaction():
            todo = await conn.fetch(
                "SELECT seq FROM events WHERE published_at IS NULL AND position IS NULL"
                " ORDER BY seq LIMIT $1 FOR UPDATE",
                most,
            )
            if todo:
                positions = sorted(await conn.fetchval(
                    "SELECT array_agg(nextval('event_positions')) FROM generate_series(1, $1)",
                    len(todo),
                ))
                await conn.execute(
                    "UPDATE events e SET position = u.position"
                    " FROM unnest($1::bigint[], $2::bigint[]) AS u(seq, position)"
                    " WHERE e.seq = u.seq",
                    [row["seq"] for row in todo], positions,
                )
        rows = await conn.fetch(
            "SELECT position, type, device_id, created_at, data FROM events"
            " WHERE published_at IS NULL AND position IS NOT NULL ORDER BY position LIMIT $1",
            most,
        )
        return [_event(row) for row in rows]

    async def published(self, conn: asyncpg.Connection, ids: Sequence[str]) -> None:
        positions = [position_of(i) for i in ids]
        await conn.execute(
            "UPDATE events SET published_at = now() WHERE position = ANY($1::bigint[])",
            positions,
        )

    async def backlog(self) -> int:
        """Events not published yet."""
        async with self._db.connection() as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM events WHERE published_at IS NULL"
            )
        return count

    async def page(
        self, after: str | None, limit: int, event_type: str | None, device_id: str | None
    ) -> StoredEventList:
        """Events with ids after ``after`` (any id: one gone with retention still marks
        a place), oldest first."""
        since = 0 if after is None else position_of(after) or 0  # checked by EventQuery
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                "SELECT position, type, device_id, created_at, data FROM events"
                " WHERE position > $1 AND ($2::text IS NULL OR type = $2)"
                "   AND ($3::text IS NULL OR device_id = $3)"
                " ORDER BY position LIMIT $4",
                since, event_type, device_id, limit + 1,
            )
        return StoredEventList(data=[_event(row) for row in rows[:limit]],
                               has_more=len(rows) > limit)

    async def prune(self, older_than: dt.timedelta) -> int:
        """Drop published events older than ``older_than``."""
        async with self._db.connection() as conn:
            status = await conn.execute(
                "DELETE FROM events"
                " WHERE created_at < now() - $1::interval AND published_at IS NOT NULL",
                older_than,
            )
        return int(status.split()[-1])

