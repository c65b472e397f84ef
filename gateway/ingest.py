"""The heartbeat pipeline: decode at the edge, buffer per device, write in batches, reply.

Messages are decoded as they arrive (on the event loop, inside the edge's routing call) and
buffered per device. One writer task takes up to ``batch_max`` devices at a time, applies
them in one transaction, and publishes each device's open commands and settings gap.
There is one writer so that two batches never lock the same device rows in opposite
orders; batches grow under load instead, which is what makes the write cheap.

Buffering is per device and bounded. A newer heartbeat that carries every health field an
older buffered one carries supersedes it (its acks are kept), so during a database outage
the buffer holds about one entry per device; past ``inbox_max`` entries new heartbeats are
dropped and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgspec
import structlog
from gateway_codecs import device as wire
from gateway_codecs import settings as settings_schema

from gateway import metrics
from gateway.config import Config
from gateway.dynsec import DeviceAccess
from gateway.errors import StorageUnavailable
from gateway.logs import RateLimitedLog
from gateway.mqtt import Publisher, message_properties
from gateway.storage import AckColumns, BatchFailed, HeartbeatColumns, Storage

log = structlog.get_logger("gateway.ingest")

FUTURE_TOLERANCE_MS = 5 * 60 * 1000
_HEALTH_FIELDS = (
    "firmware_version", "battery_percent", "storage_used_mb", "storage_total_mb",
    "signal_strength_dbm", "recording_state",
)
# What an applied heartbeat writes: health, and the settings version it reports.
_WRITTEN_FIELDS = (*_HEALTH_FIELDS, "settings_version")
_json = msgspec.json.Encoder()


@dataclass(slots=True)
class Pending:
    heartbeat: wire.Heartbeat
    received: float  # becomes last_heartbeat_at
    extra_acks: list[wire.Ack] = field(default_factory=list)
    # When this entry superseded older ones: the oldest one's receive time (for the lag).
    first_received: float | None = None

    def supersedes(self, older: Pending) -> bool:
        """True when applying self alone leaves the same state as older then self.

        Self must carry every field older carries, and be applied whenever older is:
        both have a ``ts`` and self's is newer, or neither has one (a heartbeat without
        ``ts`` is always applied and leaves the stored ``ts`` alone).
        """
        new, old = self.heartbeat, older.heartbeat
        if (new.ts is None) != (old.ts is None):
            return False
        if new.ts is not None and old.ts is not None and new.ts <= old.ts:
            return False
        return all(
            getattr(new, name) is not None or getattr(old, name) is None
            for name in _WRITTEN_FIELDS
        )

    def absorb(self, older: Pending) -> None:
        """Take over what older still has to do once self replaces it: its acks."""
        self.extra_acks = [*older.extra_acks, *(older.heartbeat.acks or ()), *self.extra_acks]
        self.first_received = older.first_received or older.received


def _fold(queue: list[Pending], entry: Pending) -> int | None:
    """Fold ``entry`` into a device's queue where that changes nothing that gets written.

    Returns the change in the queue's length, or None when the entry needs a slot of its
    own. A heartbeat not newer than the newest queued one is skipped by the ts guard
    whatever becomes of that one, so only its acks are kept; a heartbeat that supersedes
    the newest entries replaces them. A device therefore holds about one entry however
    long the database is away, whatever mix of heartbeats it sends.
    """
    if not queue:
        return None
    new, last = entry.heartbeat, queue[-1].heartbeat
    if new.ts is not None and last.ts is not None and new.ts <= last.ts:
        queue[-1].extra_acks = [*queue[-1].extra_acks, *entry.extra_acks, *(new.acks or ())]
        metrics.HEARTBEATS_STALE.inc()
        return 0
    removed = 0
    while queue and entry.supersedes(queue[-1]):
        entry.absorb(queue.pop())
        removed += 1
    metrics.HEARTBEATS_SUPERSEDED.inc(removed)
    if not removed:
        return None
    queue.append(entry)
    return 1 - removed


class Ingest:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        publisher: Publisher,
        access: DeviceAccess | None = None,
    ) -> None:
        self._config = config
        self._access = access  # device broker credentials; None without dynamic security
        self._storage = storage
        self._publisher = publisher
        self._prefix = config.topic("devices/")
        self._pending: dict[str, list[Pending]] = {}
        self._count = 0
        self._writing = 0  # entries of the batch being written; a failed write returns them
        self._current: asyncio.Future[None] | None = None  # the writer's batch in hand
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._reject_log = RateLimitedLog()
        # A database outage retries the batch every 0.5 s: one line per 30 s says it.
        self._outage_log = RateLimitedLog(burst=1, period=30.0)
        self._stopping = False

    @property
    def depth(self) -> int:
        return self._count

    # ---- intake (called by the edge for every heartbeat message) ---------------------

    def accept(self, message: aiomqtt.Message, received: float) -> None:
        metrics.HEARTBEATS_RECEIVED.inc()
        topic = message.topic.value
        serial = topic[len(self._prefix):-len("/heartbeat")]
        if not topic.startswith(self._prefix) or not serial or "/" in serial:
            self._reject("bad_topic", None, "topic is not devices/{serial}/heartbeat")
            return
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        content_type = None
        if message.properties is not None:
            content_type = message_properties(message).get("content_type")
        try:
            heartbeat = wire.decode_heartbeat(bytes(payload), content_type)
        except wire.DecodeError as exc:
            self._reject(exc.reason, serial, str(exc))
            return
        if heartbeat.ts is not None and heartbeat.ts > received * 1000 + FUTURE_TOLERANCE_MS:
            self._reject("future_ts", serial, "ts is more than 5 minutes ahead")
            return
        self.add(serial, Pending(heartbeat, received))

    def add(self, serial: str, entry: Pending) -> None:
        queue = self._pending.get(serial)
        change = None if queue is None else _fold(queue, entry)
        if change is None:
            # The batch being written counts: a failed write puts it back, and the cap
            # must hold then too.
            if self._count + self._writing >= self._config.inbox_max:
                self._reject("overflow", serial, "heartbeat buffer is full")
                return
            if queue is None:
                self._pending[serial] = [entry]
            else:
                queue.append(entry)
            change = 1
        self._count += change
        metrics.INBOX_DEPTH.set(self._count)
        self._wakeup.set()

    def _reject(self, reason: str, serial: str | None, message: str) -> None:
        metrics.HEARTBEATS_REJECTED.labels(reason).inc()
        allowed, suppressed = self._reject_log.allow()
        if allowed:
            log.warning("heartbeat.rejected", reason=reason, serial=serial, error=message[:200],
                        suppressed=suppressed)

    # ---- the writer ------------------------------------------------------------------

    async def run(self) -> None:
        """Write batches until cancelled; on cancellation, finish the batch in hand."""
        wait = self._config.batch_wait_ms / 1000
        while True:
            await self._wakeup.wait()
            if self._count < self._config.batch_max and wait > 0:
                # Let a batch fill for a few milliseconds; under load it is full already.
                await asyncio.sleep(wait)
            batch = self._take(self._config.batch_max)
            if not self._pending:
                self._wakeup.clear()
            if batch:
                self._current = asyncio.ensure_future(self._write(batch))
                try:
                    await asyncio.shield(self._current)
                except Exception:
                    # A bug must not stop ingest for the whole fleet: the next heartbeat of
                    # each device carries its whole state again.
                    log.exception("heartbeat.writer_error", devices=len(batch))
                    metrics.HEARTBEATS_REJECTED.labels("write_error").inc(
                        sum(len(queue) for queue in batch.values())
                    )

    async def drain(self, deadline: float) -> None:
        """Write everything buffered, giving up at the monotonic ``deadline``."""
        if self._current is not None and not self._current.done():
            # The batch the cancelled writer had in hand finishes first: one writer at a
            # time, so two transactions never lock the same devices in opposite orders.
            await asyncio.wait({self._current}, timeout=max(0.0, deadline - time.monotonic()))
        while self._pending and time.monotonic() < deadline:
            await self._write(self._take(self._config.batch_max))

    def _take(self, limit: int) -> dict[str, list[Pending]]:
        batch: dict[str, list[Pending]] = {}
        pending = self._pending
        for serial in pending:
            if len(batch) >= limit:
                break
            batch[serial] = pending[serial]
        for serial in batch:
            del pending[serial]
        # Taken entries still count against the cap until `_write` is done with them.
        self._writing = sum(len(queue) for queue in batch.values())
        self._count -= self._writing
        metrics.INBOX_DEPTH.set(self._count)
        return batch

    def _requeue(self, batch: dict[str, list[Pending]]) -> None:
        """Put a batch back in front after a failed write (newer arrivals stay behind it,
        and supersede its entries where they can, as in `add`)."""
        merged = dict(batch)
        for serial, queue in self._pending.items():
            into = merged.setdefault(serial, [])
            for entry in queue:
                if _fold(into, entry) is None:
                    into.append(entry)
        self._pending = merged
        self._count = sum(len(queue) for queue in merged.values())
        metrics.INBOX_DEPTH.set(self._count)
        self._wakeup.set()

    async def _write(self, batch: dict[str, list[Pending]]) -> None:
        rounds = _rounds(batch)
        acks = _ack_columns(batch)
        try:
            outcomes, acked = await self._storage.apply_heartbeats(rounds, acks)
        except StorageUnavailable as exc:
            allowed, suppressed = self._outage_log.allow()
            if allowed:
                log.warning("heartbeat.write_failed", error=str(exc), devices=len(batch),
                            suppressed=suppressed)
            self._writing = 0
            self._requeue(batch)
            await asyncio.sleep(0.5)
            return
        except BatchFailed as exc:
            self._writing = 0
            await self._write_failed(batch, exc)
            return
        finally:
            self._writing = 0
        committed = time.time()
        metrics.BATCH_SIZE.observe(sum(len(q) for q in batch.values()))
        for queue in batch.values():
            for entry in queue:
                metrics.HEARTBEAT_LAG.observe(
                    committed - (entry.first_received or entry.received)
                )
        self._reply(outcomes)
        self.on_acked(acked)

    async def _write_failed(self, batch: dict[str, list[Pending]], exc: BatchFailed) -> None:
        """A batch PostgreSQL refused: retry a transient failure; isolate a poison one.

        A heartbeat the database cannot take must not hold up or take down the others, so
        the batch is halved until the failing device is alone; its heartbeats are dropped
        and counted as ``write_error``.
        """
        log.error("heartbeat.batch_failed", error=str(exc)[:300], devices=len(batch),
                  retryable=exc.retryable)
        if exc.retryable:
            self._requeue(batch)
            return
        if len(batch) == 1:
            ((serial, queue),) = batch.items()
            for _ in queue:
                self._reject("write_error", serial, str(exc))
            return
        serials = list(batch)
        middle = len(serials) // 2
        for half in (serials[:middle], serials[middle:]):
            await self._write({serial: batch[serial] for serial in half})

    def on_acked(self, acked: Iterable[Any]) -> None:
        """Hook for acknowledged commands (device credentials follow factory resets).

        Also called by the command sweep with expired commands. A finished factory_reset
        revokes the device's broker credentials; the command could still reach it until now.
        """
        if self._access is not None:
            self._access.revoke_later(
                row["device_id"] for row in acked if row["type"] == "factory_reset"
            )

    def _reply(self, outcomes: Iterable[Any]) -> None:
        replies: dict[str, Any] = {}
        for row in outcomes:
            serial = row["serial"]
            if row["device_id"] is None:
                self._reject("unknown_device", serial, "no device has this serial number")
            elif row["deleted"]:
                self._reject("deleted_device", serial, "the device is deleted")
            elif not row["applied"]:
                metrics.HEARTBEATS_STALE.inc()
            else:
                metrics.HEARTBEATS_APPLIED.inc()
                replies[serial] = row  # the last applied round has the freshest view
        for serial, row in replies.items():
            if row["commands"]:
                self._publish_commands(serial, row["commands"], row["command_count"])
            if row["version"] is not None:
                self._publish_settings(serial, row)

    def _publish_commands(self, serial: str, commands: str, count: int) -> None:
        # `commands` is the JSON text json_agg built in the database: embed it as is.
        payload = b'{"commands":' + commands.encode() + b"}"
        if self._publisher.publish(self._config.topic(f"devices/{serial}/commands"), payload):
            metrics.COMMANDS_DELIVERED.inc(count)

    def _publish_settings(self, serial: str, row: Any) -> None:
        current = row["current_settings"]
        base = row["base_settings"]
        update: wire.SettingsPatch | wire.SettingsFull
        if base is not None and row["reported_version"]:
            update = wire.SettingsPatch(
                version=row["version"],
                base_version=row["reported_version"],
                patch=settings_schema.merge_patch_diff(base, current),
            )
            kind = "patch"
        else:
            update = wire.SettingsFull(version=row["version"], base_version=None,
                                       settings=current)
            kind = "full"
        topic = self._config.topic(f"devices/{serial}/settings")
        if self._publisher.publish(topic, wire.encode(update)):
            metrics.SETTINGS_UPDATES_SENT.labels(kind).inc()


def _rounds(batch: dict[str, list[Pending]]) -> list[HeartbeatColumns]:
    """Split a batch into rounds with one heartbeat per device each, in arrival order.

    Nearly every batch is a single round; a device with several buffered heartbeats gets
    them applied in the order they arrived, exactly as if they had come one batch at a
    time: the ts guard then skips a late one just as it would have one batch later.
    (Sorting by ts instead would apply a late heartbeat's fields that a newer one lacks.)
    """
    depth = max(len(queue) for queue in batch.values())
    rounds = []
    for index in range(depth):
        columns = HeartbeatColumns([], [], [], [], [], [], [], [], [], [], [])
        for serial, queue in batch.items():
            if index < len(queue):
                hb = queue[index].heartbeat
                columns.received.append(queue[index].received)
                columns.serials.append(serial)
                columns.ts.append(hb.ts)
                columns.firmware.append(hb.firmware_version)
                columns.battery.append(hb.battery_percent)
                columns.storage_used.append(hb.storage_used_mb)
                columns.storage_total.append(hb.storage_total_mb)
                columns.signal.append(hb.signal_strength_dbm)
                columns.recording_state.append(
                    None if hb.recording_state is None
                    else _json.encode(hb.recording_state).decode()
                )
                columns.settings_version.append(hb.settings_version)
                # A later entry of the same device is newer (see `_fold`), so it is
                # applied whenever this one is: the commands go out with it alone, and
                # each delivery is counted once. (One exception: an entry without `ts`
                # followed by a stale one; its commands then wait for the next heartbeat.)
                columns.deliver.append(index == len(queue) - 1)
        rounds.append(columns)
    return rounds


def _ack_columns(batch: dict[str, list[Pending]]) -> AckColumns | None:
    columns = AckColumns([], [], [], [])
    for serial, queue in batch.items():
        for entry in queue:
            for ack in (*entry.extra_acks, *(entry.heartbeat.acks or ())):
                columns.serials.append(serial)
                columns.ids.append(ack.id)
                columns.statuses.append(ack.status)
                columns.details.append(ack.detail)
    return columns if columns.ids else None
