"""The gateway process: its parts wired together, opened in order, and stopped by draining."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog

from gateway import dynsec, metrics
from gateway.config import Config, redact_url
from gateway.device_replies import DeviceReplies
from gateway.edge import Edge
from gateway.errors import ProcessConflict, StorageUnavailable
from gateway.events_relay import Relay
from gateway.heartbeat_buffer import HeartbeatBuffer
from gateway.heartbeat_link import HeartbeatLink
from gateway.heartbeat_writer import BatchWriter
from gateway.ingest import Intake, Rejections
from gateway.reconnect import Peers
from gateway.rpc import Requests
from gateway.storage import Storage
from gateway.storage.commands import Finished
from gateway.storage.processes import Membership

log = structlog.get_logger("gateway.app")

RESTART_SECONDS = 1.0  # before a background loop that failed unexpectedly runs again
FLEET_REPORT_SECONDS = 5.0


class Gateway:
    """One gateway: the MQTT edge, the heartbeat pipeline, request workers, periodic work."""

    def __init__(self, config: Config, storage: Storage) -> None:
        self.config = config
        self.storage = storage
        self.health = storage.db.health
        peers = Peers()  # the process's connections to the broker
        self.edge = Edge(config, self.health, peers)
        publisher = self.edge.publisher
        # Device broker credentials: at the broker too with Mosquitto's dynamic security
        # plugin, or in the database only for a broker that reads them there (EMQX).
        self.control = dynsec.Control(publisher, self.edge.connected) if config.dynsec else None
        self.access = (
            dynsec.DeviceAccess(config, storage, self.control)
            if config.dynsec or config.database_credentials else None
        )
        reject = Rejections()
        storage.heartbeats.synchronous_commit = config.heartbeat_sync_commit
        self.buffer = HeartbeatBuffer(config.heartbeat_window)
        link_id = config.connection_id("heartbeats")
        self.link = HeartbeatLink(
            config.mqtt, client_id=link_id,
            topic=config.subscription("devices/+/heartbeat"),
            barrier_topic=config.topic(f"gateway/barrier/{link_id}"),
            persistent=config.persistent_sessions,
            session_expiry=config.session_expiry_seconds,
            receive_maximum=config.heartbeat_window,
            keepalive=config.mqtt_keepalive_seconds,
            on_publish=lambda *message: self.intake.accept(*message),
            peers=peers,
            accepting=lambda: not self.buffer.full,
        )
        self.intake = Intake(config.topic("devices/"), self.buffer, reject, self.link.done)
        self.replies = DeviceReplies(config, publisher, reject, self._finished)
        self.writer = BatchWriter(
            self.buffer, storage.heartbeats, reject, self.replies.written, self.link.done,
            batch_max=config.batch_max, batch_wait=config.batch_wait_ms / 1000,
        )
        self.requests = Requests(config, storage, publisher, self.edge.done, self.access)
        self.relay = Relay(config.database_url, storage.events, publisher, self.edge.connected,
                           config.topic)
        self.membership = Membership(config.database_url, self.edge.client_id,
                                     config.topic_prefix, config.share_group)
        self.edge.handle(
            requests=self.requests.accept,
            control=self.control.accept if self.control else None,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, run until ``stop`` is set, then stop intake and drain accepted work."""
        host, port = self.config.metrics_endpoint
        # Refused before it touches the broker when it would clash with another process;
        # then the broker: a gateway that cannot reach it fails before serving anything.
        await self.membership.join()
        try:
            await self._serve(stop, host, port)
        finally:
            await self.membership.leave()

    async def _serve(self, stop: asyncio.Event, host: str, port: int) -> None:
        async with self.edge, self.link, metrics.serve(host, port, metrics.exposition,
                                                       self._healthy):
            log.info("gateway.ready", broker=redact_url(self.config.mqtt_url),
                     database=redact_url(self.config.database_url),
                     metrics=f"http://{host}:{port}/metrics", client_id=self.config.client_id,
                     share_group=self.config.share_group)
            with contextlib.suppress(StorageUnavailable):
                if not await self.storage.db.autovacuum():
                    log.warning("database.autovacuum_off", hint="vacuum event_outbox and "
                                "device_health yourself, or turn autovacuum on "
                                "(docs/operations.md)")
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(self.writer.run(), name="heartbeat-writer")
                workers = [
                    tasks.create_task(self.requests.worker(), name=f"request-worker-{n}")
                    for n in range(self.config.request_workers)
                ]
                background = [
                    tasks.create_task(supervised(name, loop), name=name)
                    for name, loop in self._background()
                ]
                await stop.wait()
                log.info("gateway.stopping")
                await self._drain(writer, [*workers, *background])

    async def _healthy(self) -> bool:
        return self.health.ok and self.link.connected.is_set()

    def _background(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("database-health", self._watch_database),
            ("process-registration", self._keep_registration),
            ("api-key-changes", self.requests.watch_keys),
            ("command-sweep", self._sweep_commands),
            ("presence-sweep", self._sweep_presence),
            ("fleet-gauges", self._report_fleet),
            ("events-relay", self.relay.run),
            ("history-prune", self._prune_history),
            ("events-prune", self._prune_events),
        ]
        if self.access is not None and self.control is not None:
            loops.append(("credential-revocations", self.access.run))
        return loops

    async def _drain(self, writer: asyncio.Task[None], others: list[asyncio.Task[None]]) -> None:
        deadline = time.monotonic() + self.config.drain_seconds
        if self.config.persistent_sessions:
            # Intake stops first: what the broker delivers from now on is not
            # acknowledged, so it stays in the session for the next start.
            self.edge.hold_intake()
            self.link.hold()
        else:
            # In a share group the session ends with the connection: stop being given
            # messages, and take in everything the broker had already assigned here.
            left = max(0.0, deadline - time.monotonic())
            drained = await asyncio.gather(self.edge.drain(left), self.link.drain(left))
            if not all(drained):
                log.warning("gateway.drain_incomplete", requests=drained[0],
                            heartbeats=drained[1])
        # Accepted requests and buffered heartbeats finish while both connections stay
        # up, so that replies and acknowledgements still reach the broker.
        await self.requests.drain(deadline)
        for task in others:
            task.cancel()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await self.writer.drain(deadline)
        publisher = self.edge.publisher
        while publisher.unacknowledged() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls paho's state, which has no event
            await asyncio.sleep(0.02)
        # What the drain could not finish by the deadline (all zero normally).
        log.info("gateway.drained", requests_left=self.requests.in_flight,
                 heartbeats_left=self.buffer.depth,
                 heartbeats_unacknowledged=self.link.unacknowledged,
                 publishes_unacknowledged=publisher.unacknowledged(),
                 **metrics.heartbeat_totals())

    def _finished(self, commands: Iterable[Finished]) -> None:
        """Commands that reached a terminal state (acks, expiry): a finished factory_reset
        revokes the device's broker credentials, which it could still use until now."""
        if self.access is not None:
            self.access.revoke_later(c.device_id for c in commands if c.type == "factory_reset")

    # ---- periodic work ----------------------------------------------------------------

    async def _watch_database(self) -> None:
        db = self.storage.db
        while True:
            up = await db.ping()
            # While the database is down, requests fail fast until a check passes: check
            # more often then, so they are served again soon after it is back.
            await db.until_failure(self.config.health_interval_seconds if up
                                   else self.config.health_recheck_seconds)

    async def _keep_registration(self) -> None:
        """Take the registration again after its connection was lost (a database
        restart releases the client id's lock)."""
        while True:
            await asyncio.sleep(self.config.health_interval_seconds)
            if not self.membership.held:
                try:
                    await self.membership.rejoin()
                except ProcessConflict as exc:
                    log.error("gateway.process_conflict", error=str(exc))
                except StorageUnavailable:
                    pass  # the health check reports the outage; try again next time

    async def _sweep_commands(self) -> None:
        every = self.config.command_sweep_seconds
        while True:
            await asyncio.sleep(every)
            if not await self._claim("command_expiry", every):
                continue
            expired = await self.storage.commands.expire()
            if expired:
                metrics.COMMANDS_EXPIRED.inc(len(expired))
                self._finished(expired)

    async def _sweep_presence(self) -> None:
        every = self.config.presence_sweep_seconds
        while True:
            left = 1 if await self._claim("presence", every) else 0
            while left:  # a long sweep (a fleet gone silent) reports as it goes
                started = time.monotonic()
                fleet, marked, left = await self.storage.presence.sweep()
                metrics.DEVICES_OFFLINE.inc(marked)
                if marked:
                    log.info("presence.marked_offline", devices=marked, left=left,
                             online=fleet.online, offline=fleet.offline,
                             unknown=fleet.unknown, seconds=round(time.monotonic() - started, 3))
            await asyncio.sleep(every)

    async def _report_fleet(self) -> None:
        """Every process reports the fleet's counts (from the last presence sweep, by
        whichever process ran it) and the outbox backlog."""
        while True:
            fleet = await self.storage.presence.last_counts()
            if fleet is not None:
                for connectivity in ("online", "offline", "unknown"):
                    metrics.DEVICES.labels(connectivity).set(getattr(fleet, connectivity))
            metrics.OUTBOX_BACKLOG.set(await self.storage.events.backlog())
            await asyncio.sleep(FLEET_REPORT_SECONDS)

    async def _prune_events(self) -> None:
        every = self.config.history_prune_seconds
        retention = dt.timedelta(days=self.config.events_retention_days)
        while True:
            if await self._claim("events_prune", every):
                pruned = await self.storage.events.prune(retention)
                if pruned:
                    log.info("events.pruned", events=pruned)
            await asyncio.sleep(every)

    async def _prune_history(self) -> None:
        every = self.config.history_prune_seconds
        while True:
            await asyncio.sleep(every)
            if await self._claim("settings_history_prune", every):
                await self.storage.settings.prune_history()

    async def _claim(self, sweep: str, every: float) -> bool:
        try:
            return await self.storage.db.claim(sweep, every)
        except StorageUnavailable:
            return False


async def supervised(
    name: str, loop: Callable[[], Awaitable[None]], restart_seconds: float = RESTART_SECONDS
) -> None:
    """Run a background loop until cancelled; an error it did not expect is logged and the
    loop runs again, so that it never ends the TaskGroup, and with it the gateway."""
    while True:
        try:
            await loop()
        except StorageUnavailable as exc:
            log.warning("background.database_unavailable", loop=name, error=str(exc))
        except Exception:
            log.exception("background.failed", loop=name)
        await asyncio.sleep(restart_seconds)


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
        offline_after=config.offline_after_seconds,
    ) as storage:
        await storage.db.check_schema()
        await Gateway(config, storage).run(stop)
