"""When to reconnect to the broker, and what to say when it keeps closing the connection.

Capped, jittered backoff (0.5 s doubling to 30 s, each wait uniform in [d/2, d]) that
starts over only after a connection that lasted: one the broker keeps closing at once is
retried ever more slowly. The broker closing a connection because another client took
its client id (MQTT 5 reason 0x8E), or closing several in a row right after they were
made (Mosquitto 2.0 closes the socket without a reason), is logged as an error that names
the likely cause and the fix.

A process's connections to one broker share `Peers`: when one of them gets through, the
others waiting to retry try at once, since the broker is evidently back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import structlog

from gateway import metrics

log = structlog.get_logger("gateway.mqtt")

FIRST_SECONDS = 0.5
MAX_SECONDS = 30.0
SHORT_LIVED_SECONDS = 2.0
TAKEOVER_SUSPECTED_AFTER = 3
SESSION_TAKEN_OVER = 0x8E


class Peers:
    """The connections of one process to one broker."""

    def __init__(self) -> None:
        self._through = asyncio.Event()

    def through(self) -> None:
        """One connection got through: wake the others' waits."""
        self._through.set()
        self._through = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        """Wait ``seconds``, or until another connection gets through."""
        through = self._through
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await through.wait()


class Reconnects:
    def __init__(self, client_id: str, connection: str, peers: Peers) -> None:
        self._client_id = client_id
        self._connection = connection  # which of the process's connections, for logs
        self._peers = peers
        self._delay = FIRST_SECONDS
        self._short_lived = 0
        self._up_since = time.monotonic()

    def connected(self) -> None:
        self._up_since = time.monotonic()
        self._peers.through()

    def lost(self, reason: int | None, error: str) -> None:
        """The connection dropped: log why, and count it for the backoff."""
        metrics.MQTT_RECONNECTS.inc()
        lasted = time.monotonic() - self._up_since
        self._short_lived = self._short_lived + 1 if lasted < SHORT_LIVED_SECONDS else 0
        if not self._short_lived:
            self._delay = FIRST_SECONDS
        if reason == SESSION_TAKEN_OVER or self._short_lived >= TAKEOVER_SUSPECTED_AFTER:
            cause = (
                "another MQTT client connected with the same client id"
                if reason == SESSION_TAKEN_OVER
                else f"the broker closed {self._short_lived} connections in a row within "
                     f"{SHORT_LIVED_SECONDS:g} s: most likely another MQTT client uses the "
                     "same client id"
            )
            log.error("mqtt.session_taken_over", client_id=self._client_id,
                      connection=self._connection, cause=cause,
                      fix="give every gateway process its own GATEWAY_CLIENT_ID "
                          "(or run them as `gateway run --workers N`)")
        else:
            log.warning("mqtt.disconnected", connection=self._connection, error=error)

    def failed(self, error: str) -> None:
        """An attempt to connect failed."""
        metrics.MQTT_RECONNECTS.inc()
        log.warning("mqtt.connect_failed", connection=self._connection, error=error)

    async def pause(self) -> None:
        """The backoff before the next attempt (cut short when a peer gets through)."""
        wait = random.uniform(self._delay / 2, self._delay)
        self._delay = min(self._delay * 2, MAX_SECONDS)
        log.warning("mqtt.reconnecting", connection=self._connection, in_seconds=round(wait, 2))
        await self._peers.wait(wait)


async def stop_keeper(task: asyncio.Task[None] | None) -> None:
    """Cancel a connection's keep-connected task and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
