"""Presence (protocol §11): the fleet's connectivity counts, and devices found silent.

A device is online while its last applied heartbeat is at most the threshold old (the
connection setting ``gateway.offline_after``, see `create_pool`). The heartbeat write sets
``device_health.online_since`` when a device comes online (and records device.online);
the presence sweep clears it for devices silent past the threshold (and records
device.offline). There is no index on the heartbeat time: it would make every heartbeat
update a non-HOT one. The sweep reads the narrow device_health table sequentially instead,
once per period in the whole deployment (``sweeps``), which at a million devices costs a
fraction of a second.
"""

from __future__ import annotations

import msgspec

from gateway.storage.database import Aggregate
from gateway.storage.devices import record_events

OFFLINE_AFTER_SECONDS = 180.0  # the default threshold (GATEWAY_OFFLINE_AFTER_SECONDS)
SWEEP = "presence"  # its row in `sweeps`, whose result holds the last counts

_SILENT = """
    h.last_heartbeat_at <= now() - current_setting('gateway.offline_after')::interval"""


class Fleet(msgspec.Struct, frozen=True):
    """Live devices by connectivity, as the last sweep counted them."""

    online: int
    offline: int
    unknown: int


# One sequential read: the counts, and how many devices still have to be marked offline.
_COUNT_SQL = f"""
SELECT count(*) FILTER (WHERE h.last_heartbeat_at IS NULL) AS unknown,
       count(*) FILTER (WHERE {_SILENT}) AS offline,
       count(*) FILTER (WHERE h.online_since IS NOT NULL AND {_SILENT}) AS going,
       count(*) AS total
FROM device_health h WHERE NOT h.deleted
"""

# Silent devices still marked online: up to $1 of them, skipping rows a writer holds (a
# heartbeat being written for that device means it is not silent). A row updated after
# this statement's snapshot is checked again once locked, so a device whose heartbeat
# committed meanwhile is left online.
_MARK_OFFLINE_SQL = f"""
WITH silent AS (
    SELECT h.device_id FROM device_health h
    WHERE h.online_since IS NOT NULL AND NOT h.deleted AND {_SILENT}
    LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED
), gone AS (
    UPDATE device_health h SET online_since = NULL
    FROM silent s WHERE h.device_id = s.device_id
    RETURNING h.device_id
)
SELECT COALESCE(array_agg(device_id ORDER BY device_id), '{{}}') FROM gone
"""


class Presence(Aggregate):
    async def sweep(self, chunk: int = 5000, most: int = 50_000) -> tuple[Fleet, int, int]:
        """Count the fleet, store the counts for every process's gauge, and mark up to
        ``most`` silent devices offline (``chunk`` per transaction): (counts, devices
        marked, silent devices left to mark, about)."""
        async with self._db.connection() as conn:
            row = await conn.fetchrow(_COUNT_SQL)
            fleet = Fleet(online=row["total"] - row["offline"] - row["unknown"],
                          offline=row["offline"], unknown=row["unknown"])
            await conn.execute("UPDATE sweeps SET result = $2 WHERE name = $1", SWEEP,
                               msgspec.json.encode(fleet).decode())
        marked = 0
        while row["going"] > marked and marked < most:
            done = await self._mark_offline(chunk)
            marked += done
            if done < chunk:
                return fleet, marked, 0
        return fleet, marked, max(row["going"] - marked, 0)

    async def _mark_offline(self, most: int) -> int:
        async with self._db.transaction() as conn:
            devices: list[str] = await conn.fetchval(_MARK_OFFLINE_SQL, most)
            await record_events(conn, [("device.offline", d) for d in devices])
        return len(devices)

    async def last_counts(self) -> Fleet | None:
        """The counts of the last sweep (by any process), None before the first."""
        async with self._db.connection() as conn:
            result = await conn.fetchval("SELECT result FROM sweeps WHERE name = $1", SWEEP)
        return None if result is None else msgspec.json.decode(result, type=Fleet)
