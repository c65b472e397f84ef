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
from gateway.storage import AckColumns, HeartbeatColumns, Storage

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
        """True when applying self alone leaves the same state as older then self."""
        new, old = self.heartbeat, older.heartbeat
        if new.ts is None or old.ts is None or new.ts <= old.ts:
            return False
        return all(
            getattr(new, name) is not None or getattr(old, name) is None
            for name in _WRITTEN_FIELDS
        )


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
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._reject_log = RateLimitedLog()
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
        if queue is None:
            if self._count >= self._config.inbox_max:
                self._reject("overflow", serial, "heartbeat buffer is full")
                return
            self._pending[serial] = [entry]
            self._count += 1
        elif len(queue) == 1 and entry.supersedes(queue[0]):
            older = queue[0]
            entry.extra_acks = older.extra_acks + (older.heartbeat.acks or [])
            entry.first_received = older.first_received or older.received
            queue[0] = entry
        else:
            if self._count >= self._config.inbox_max:
                self._reject("overflow", serial, "heartbeat buffer is full")
                return
            queue.append(entry)
            self._count += 1
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
                await asyncio.shield(self._write(batch))

    async def drain(self, deadline: float) -> None:
        """Write everything buffered, giving up at the monotonic ``deadline``."""
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
        self._count -= sum(len(queue) for queue in batch.values())
        metrics.INBOX_DEPTH.set(self._count)
        return batch

    def _requeue(self, batch: dict[str, list[Pending]]) -> None:
        """Put a batch back in front after a failed write (newer arrivals stay behind it)."""
        merged = dict(batch)
        for serial, queue in self._pending.items():
            merged.setdefault(serial, []).extend(queue)
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
            log.warning("heartbeat.write_failed", error=str(exc), devices=len(batch))
            self._requeue(batch)
            await asyncio.sleep(0.5)
            return
        committed = time.time()
        metrics.BATCH_SIZE.observe(sum(len(q) for q in batch.values()))
        for queue in batch.values():
            for entry in queue:
                metrics.HEARTBEAT_LAG.observe(
                    committed - (entry.first_received or entry.received)
                )
        self._reply(outcomes)
        self.on_acked(acked)

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
        columns = HeartbeatColumns([], [], [], [], [], [], [], [], [], [])
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
