"""The gateway processes serving one database: who holds which client id, with which
share group, so that a process that would double work or knock another off is refused.

A live process holds a session advisory lock keyed by its client id on a connection of
its own for as long as it runs; PostgreSQL releases it the moment that connection ends
(the process exits, is killed, or loses its host), so a row is current exactly while its
lock is held.
"""

from __future__ import annotations

import os
import socket

import asyncpg
import msgspec

from gateway.errors import ProcessConflict, StorageUnavailable
from gateway.storage.database import UNAVAILABLE

_KEY = "hashtextextended('gateway_client_id:' || $1::text, 0)"

# Rows of live processes (their lock is held) other than $1 on topic prefix $2.
_NEIGHBOURS_SQL = """
SELECT p.client_id, p.host, p.pid, p.share_group, p.started_at
FROM gateway_processes p
WHERE p.client_id <> $1 AND p.topic_prefix = $2 AND EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.classid::bigint = (hashtextextended('gateway_client_id:' || p.client_id, 0) >> 32)
                              & 4294967295
      AND l.objid::bigint = hashtextextended('gateway_client_id:' || p.client_id, 0)
                            & 4294967295)
"""


class Neighbour(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    host: str
    pid: int
    share_group: str | None


def _describe(other: Neighbour) -> str:
    return f"{other.client_id} (host {other.host}, pid {other.pid})"


class Membership:
    """This process's registration: taken in `join`, held until `leave`."""

    def __init__(self, dsn: str, client_id: str, topic_prefix: str,
                 share_group: str | None) -> None:
        self._dsn = dsn
        self.client_id = client_id
        self._topic_prefix = topic_prefix
        self._share_group = share_group
        self._conn: asyncpg.Connection | None = None

    async def join(self) -> None:
        """Take the client id and check the neighbours; ``ProcessConflict`` names what is
        wrong and how to fix it."""
        try:
            conn = await asyncpg.connect(self._dsn, timeout=10)
        except UNAVAILABLE as exc:
            raise StorageUnavailable(f"cannot register the process: {exc}") from exc
        try:
            if not await conn.fetchval(f"SELECT pg_try_advisory_lock({_KEY})", self.client_id):
                holder = await conn.fetchrow(
                    "SELECT client_id, host, pid, share_group FROM gateway_processes"
                    " WHERE client_id = $1", self.client_id)
                who = _describe(Neighbour(**holder)) if holder else "another process"
                raise ProcessConflict(
                    f"the client id {self.client_id!r} is in use by {who}; give every "
                    "gateway process its own GATEWAY_CLIENT_ID, or run several as "
                    "`gateway run --workers N`"
                )
            for row in await conn.fetch(_NEIGHBOURS_SQL, self.client_id, self._topic_prefix):
                other = Neighbour(client_id=row["client_id"], host=row["host"], pid=row["pid"],
                                  share_group=row["share_group"])
                if other.share_group is None or other.share_group != self._share_group:
                    raise ProcessConflict(self._mismatch(other))
            await conn.execute(
                "INSERT INTO gateway_processes (client_id, host, pid, topic_prefix, share_group)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id) DO UPDATE SET"
                " host = EXCLUDED.host, pid = EXCLUDED.pid, topic_prefix = EXCLUDED.topic_prefix,"
                " share_group = EXCLUDED.share_group, started_at = now()",
                self.client_id, socket.gethostname(), os.getpid(), self._topic_prefix,
                self._share_group,
            )
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    def _mismatch(self, other: Neighbour) -> str:
        prefix = repr(self._topic_prefix) if self._topic_prefix else "no topic prefix"
        mine = f"share group {self._share_group!r}" if self._share_group else "no share group"
        theirs = f"share group {other.share_group!r}" if other.share_group else "no share group"
        return (
            f"{_describe(other)} serves {prefix} with {theirs}, and this process would run "
            f"with {mine}: every request and heartbeat would be handled twice. Give every "
            "process on one topic prefix the same GATEWAY_SHARE_GROUP"
        )

    @property
    def held(self) -> bool:
        """False once the registration's connection is gone (and with it the lock)."""
        return self._conn is not None and not self._conn.is_closed()

    async def rejoin(self) -> None:
        """After the registration's connection was lost (the database restarted, say)."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
        await self.join()

    async def leave(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute("DELETE FROM gateway_processes WHERE client_id = $1",
                               self.client_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # the lock goes with the connection; a row left behind is ignored
        finally:
            if conn.is_closed():
                conn.terminate()
            else:
                await conn.close()
