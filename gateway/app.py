"""The gateway process: opens resources in dependency order and runs the two paths."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import structlog

from gateway import dynsec, metrics
from gateway.config import Config
from gateway.errors import StorageUnavailable
from gateway.ingest import Ingest
from gateway.mqtt import Edge, Publisher
from gateway.rpc import Requests
from gateway.storage import Storage

log = structlog.get_logger("gateway.app")

HEALTH_INTERVAL_SECONDS = 2.0
RECHECK_SECONDS = 0.5  # the health check's interval while the database is down
SWEEP_INTERVAL_SECONDS = 5.0


class Gateway:
    """One gateway: storage, the MQTT edge, the heartbeat pipeline and request workers."""

    def __init__(self, config: Config, storage: Storage) -> None:
        self.config = config
        self.storage = storage
        self.publisher = Publisher()
        # Device broker credentials, with Mosquitto's dynamic security plugin only.
        self.control = dynsec.Control(self.publisher) if config.dynsec else None
        self.access = (
            dynsec.DeviceAccess(config, storage, self.control) if self.control else None
        )
        self.ingest = Ingest(config, storage, self.publisher, self.access)
        self.requests = Requests(config, storage, self.publisher, self.access)
        self.edge = Edge(config, self.publisher, self.ingest.accept, self.requests.accept,
                         on_control=self.control.accept if self.control else None)
        if self.control is not None:
            self.control.connected = self.edge.connected

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then stop intake and drain accepted work."""
        host, port = self.config.metrics_endpoint
        async with metrics.serve(host, port), asyncio.TaskGroup() as tasks:
            edge = tasks.create_task(self.edge.run(), name="mqtt-edge")
            writer = tasks.create_task(self.ingest.run(), name="heartbeat-writer")
            workers = [
                tasks.create_task(self.requests.worker(), name=f"request-worker-{n}")
                for n in range(self.config.request_workers)
            ]
            background = [
                tasks.create_task(self._watch_database(), name="database-health"),
                tasks.create_task(self._sweep_commands(), name="command-sweep"),
            ]
            if self.access is not None:
                background.append(
                    tasks.create_task(self.access.run(), name="credential-revocations")
                )
            await stop.wait()
            log.info("gateway.stopping")
            deadline = time.monotonic() + self.config.drain_seconds
            # Intake stops first: what the broker delivers from now on is not acknowledged,
            # so it stays in the persistent session for the next start instead of being
            # accepted after the drain and lost. Accepted requests and buffered heartbeats
            # then finish while the edge stays connected, so their replies and the
            # heartbeats' acks still reach the broker.
            self.edge.hold_intake()
            await self.requests.drain(deadline)
            for task in (*workers, *background):
                task.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            await self.ingest.drain(deadline)
            await self._flush_outgoing(deadline)
            # What the drain could not finish by the deadline (all zero normally).
            log.info("gateway.drained", requests_left=self.requests.in_flight,
                     heartbeats_left=self.ingest.depth,
                     publishes_unacknowledged=self.publisher.unacknowledged())
            edge.cancel()
        log.info("gateway.stopped")

    async def _flush_outgoing(self, deadline: float) -> None:
        while self.publisher.unacknowledged() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls paho's state, which has no event
            await asyncio.sleep(0.02)

    # The background loops log what they did not expect and go on: an error there must not
    # end the TaskGroup, and with it the gateway.

    async def _watch_database(self) -> None:
        while True:
            up = False
            try:
                up = await self.storage.ping()
            except Exception:
                log.exception("database.ping_failed")
            # While the database is down, requests fail fast until a check passes: check
            # more often then, so they are served again soon after it is back.
            await self.storage.until_failure(HEALTH_INTERVAL_SECONDS if up else RECHECK_SECONDS)

    async def _sweep_commands(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
            try:
                expired = await self.storage.expire_commands()
            except StorageUnavailable:
                continue
            except Exception:
                log.exception("commands.sweep_failed")
                continue
            if expired:
                metrics.COMMANDS_EXPIRED.inc(len(expired))
                self.ingest.on_acked(expired)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


async def serve(config: Config) -> None:
    """``gateway run``: fail fast if nothing is reachable at start, then run until a signal."""
    stop = asyncio.Event()
    install_signal_handlers(stop)
    async with Storage.open(
        config.database_url,
        timeout=config.db_timeout_seconds,
        min_size=config.db_pool_min,
        max_size=config.db_pool_max,
    ) as storage:
        await storage.check_schema()
        gateway = Gateway(config, storage)
        await gateway.edge.connect_once()
        await gateway.run(stop)
