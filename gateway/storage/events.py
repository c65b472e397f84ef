"""Events: the outbox written with each change, the relay's queries, the events API.

`record` inserts events into ``event_outbox`` in the caller's transaction, so an event
exists if and only if its change committed; the transaction's NOTIFY wakes the relay at
commit. The relay (one process at a time, see ``gateway.events_relay``) moves the oldest
outbox rows into ``events``, giving them positions (their ids) in `seq` order, publishes
them, and once the broker has acknowledged them moves ``event_relay.published`` past
them. Rows are only inserted and deleted, never updated.
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
        "WITH recorded AS (INSERT INTO event_outbox (type, device_id, data)"
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


# Move up to $1 of the oldest outbox rows into `events`, numbered after the last position
# given, in `seq` order, and count them as given; returns them in position order.
_MOVE_SQL = """
WITH taken AS (
    DELETE FROM event_outbox WHERE seq = ANY(ARRAY(
        SELECT seq FROM event_outbox ORDER BY seq LIMIT $1 FOR UPDATE))
    RETURNING seq, type, device_id, created_at, data
), numbered AS (
    SELECT (SELECT assigned FROM event_relay) + row_number() OVER (ORDER BY seq) AS position,
           taken.*
    FROM taken
), moved AS (
    INSERT INTO events (position, type, device_id, created_at, data)
    SELECT position, type, device_id, created_at, data FROM numbered
    RETURNING position, type, device_id, created_at, data
), given AS (
    UPDATE event_relay SET assigned = assigned + n
    FROM (SELECT count(*) AS n FROM taken) t WHERE n > 0
)
SELECT position, type, device_id, created_at, data FROM moved ORDER BY position
"""


class Outbox(Aggregate):
    async def next_batch(self, conn: asyncpg.Connection, most: int) -> list[StoredEvent]:
        """The next events to publish, in position order: those given a position but not
        acknowledged yet (left by a relay that stopped), else the oldest outbox rows,
        moved into ``events`` now. ``conn`` is the relay's own connection; only the
        relay moves events, so positions grow in the order they are given."""
        rows = await conn.fetch(
            "SELECT position, type, device_id, created_at, data FROM events"
            " WHERE position > (SELECT published FROM event_relay) ORDER BY position LIMIT $1",
            most,
        )
        if not rows:
            async with conn.transaction():
                rows = await conn.fetch(_MOVE_SQL, most)
        return [_event(row) for row in rows]

    async def published(self, conn: asyncpg.Connection, last: str) -> None:
        """Every event up to the id ``last`` is acknowledged by the broker.

        Committed without waiting for the disk: should a database crash lose this, the
        events after the cursor are published again, with the same ids. (The move into
        ``events`` that gives the ids waits for the disk: an id must never be given
        twice.)"""
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            await conn.execute(
                "UPDATE event_relay SET published = greatest(published, $1)",
                position_of(last),
            )

    async def backlog(self) -> int:
        """Events not published yet: in the outbox, or given a position and not
        acknowledged."""
        async with self._db.connection() as conn:
            count: int = await conn.fetchval(
                "SELECT (SELECT count(*) FROM event_outbox)"
                " + (SELECT assigned - published FROM event_relay)"
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
        return await self._delete(
            "DELETE FROM events WHERE created_at < now() - $1::interval"
            " AND position <= (SELECT published FROM event_relay)",
            older_than,
        )
