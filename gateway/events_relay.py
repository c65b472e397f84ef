"""The events relay: publishes the outbox on ``events/v1/{type}`` (protocol §12).

Every process runs one; the one holding the session advisory lock `RELAY_LOCK` on a
connection of its own publishes, the others try for the lock every `STANDBY_SECONDS`.
PostgreSQL releases the lock the moment the holder's connection ends, so when a relay's
process dies another takes over within about a second.

The active relay listens on `CHANNEL` (every transaction that records events notifies it
at commit) and looks anyway every `IDLE_SECONDS`, in case a notification was lost. It moves
committed events from the outbox into ``events``, giving them positions in `seq` order
(per device, the commit order), publishes the batch at QoS 1 in position order, waits for
every PUBACK, and only then records the batch as published. A crash or a lost broker
connection in between publishes the batch again, with the same ids: at most `BATCH` events
are published twice per failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import aiomqtt
import asyncpg
import msgspec
import structlog

from gateway import metrics
from gateway.publisher import Publisher
from gateway.storage.database import UNAVAILABLE
from gateway.storage.events import CHANNEL, RELAY_LOCK, Outbox, StoredEvent

log = structlog.get_logger("gateway.events")

BATCH = 1000
IDLE_SECONDS = 1.0
STANDBY_SECONDS = 1.0
RETRY_SECONDS = 1.0
PUBLISH_TIMEOUT_SECONDS = 10.0

_encode = msgspec.json.Encoder().encode


class Relay:
    def __init__(
        self,
        dsn: str,
        outbox: Outbox,
        publisher: Publisher,
        broker_up: asyncio.Event,
        topic: Callable[[str], str],
    ) -> None:
        self._dsn = dsn
        self._outbox = outbox
        self._publisher = publisher
        self._broker_up = broker_up
        self._topic = topic

    async def run(self) -> None:
        """Relay until cancelled (a background loop)."""
        while True:
            try:
                # Plans made for this call's values, and no JIT: the relay's statements
                # touch at most BATCH rows, and a plan or JIT compilation made for the
                # outbox's worst case took seconds per batch.
                conn = await asyncpg.connect(self._dsn, timeout=10, server_settings={
                    "jit": "off", "plan_cache_mode": "force_custom_plan"})
            except (*UNAVAILABLE, asyncpg.PostgresError):
                await asyncio.sleep(RETRY_SECONDS)
                continue
            try:
                await self._hold(conn)
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning("events.relay_connection_lost", error=str(exc))
            finally:
                with contextlib.suppress(*UNAVAILABLE, asyncpg.PostgresError):
                    await conn.close()
                if not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(RETRY_SECONDS)

    async def _hold(self, conn: asyncpg.Connection) -> None:
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):  # noqa: ASYNC110 - PostgreSQL does not announce a released lock
            await asyncio.sleep(STANDBY_SECONDS)
        log.info("events.relay_active")
        wake = asyncio.Event()
        await conn.add_listener(CHANNEL, lambda *_: wake.set())
        while True:
            await self._broker_up.wait()
            wake.clear()
            events = await self._outbox.next_batch(conn, BATCH)
            if not events:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_SECONDS):
                        await wake.wait()
                continue
            if await self._publish(events):
                await self._outbox.published(conn, events[-1].id)
            else:
                await asyncio.sleep(RETRY_SECONDS)

    async def _publish(self, events: Sequence[StoredEvent]) -> bool:
        """Publish in order (each publish is handed to the client before the next); True
        once the broker acknowledged all of them, False if any failed."""
        try:
            await self._publisher.publish_acknowledged(
                ((self._topic(f"events/v1/{event.type}"), _encode(event)) for event in events),
                PUBLISH_TIMEOUT_SECONDS,
            )
        except aiomqtt.MqttError as exc:
            log.warning("events.publish_failed", events=len(events), error=str(exc))
            return False
        for event in events:
            metrics.EVENTS_PUBLISHED.labels(event.type).inc()
        return True
