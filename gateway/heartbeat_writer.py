"""The heartbeat writer: takes batches from the buffer and applies each in one transaction.

There is one writer, so that two batches never lock the same device rows in opposite
orders; batches grow under load instead, which is what makes the write cheap. A batch
the database cannot take right now goes back in front of the buffer; one it refuses is
halved until the heartbeat it refuses is alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import msgspec
import structlog

from gateway import metrics
from gateway.errors import BatchFailed, StorageUnavailable
from gateway.heartbeat_buffer import Batch, HeartbeatBuffer, receipts_of
from gateway.ingest import Rejections
from gateway.logs import RateLimitedLog
from gateway.storage.heartbeats import AckColumns, HeartbeatColumns, Heartbeats, Written

log = structlog.get_logger("gateway.heartbeat_writer")

RETRY_SECONDS = 0.5  # between attempts while the database is away
_json = msgspec.json.Encoder()


class BatchWriter:
    def __init__(
        self,
        buffer: HeartbeatBuffer,
        heartbeats: Heartbeats,
        reject: Rejections,
        on_written: Callable[[Written], None],
        done: Callable[[Iterable[int]], None],
        *,
        batch_max: int,
        batch_wait: float,
    ) -> None:
        self._buffer = buffer
        self._heartbeats = heartbeats
        self._reject = reject
        self._on_written = on_written
        self._done = done  # acknowledges the messages of a batch written or given up
        self._batch_max = batch_max
        self._batch_wait = batch_wait
        self._current: asyncio.Future[None] | None = None  # the batch in hand
        # A database outage retries every 0.5 s: one line per 30 s says so.
        self._outage_log = RateLimitedLog(burst=1, period=30.0)

    async def run(self) -> None:
        """Write batches until cancelled; on cancellation the batch in hand still finishes
        (see `drain`)."""
        while True:
            await self._buffer.ready.wait()
            if self._buffer.depth < self._batch_max and self._batch_wait > 0:
                # Let a batch fill for a few milliseconds; under load it is full already.
                await asyncio.sleep(self._batch_wait)
            batch = self._buffer.take(self._batch_max)
            if not batch:
                continue
            self._current = asyncio.ensure_future(self._write(batch))
            try:
                await asyncio.shield(self._current)
            except Exception:
                # A bug must not stop ingest for the whole fleet: the next heartbeat of
                # each device carries its whole state again.
                log.exception("heartbeat.writer_error", devices=len(batch))
                self._buffer.done()
                self._reject("write_error", None, "unexpected error",
                             sum(len(queue) for queue in batch.values()))
                self._done(receipts_of(batch))

    async def drain(self, deadline: float) -> None:
        """Write everything buffered, giving up at the monotonic ``deadline``."""
        if self._current is not None and not self._current.done():
            # The batch the cancelled writer had in hand finishes first: one writer at a
            # time, so two transactions never lock the same devices in opposite orders.
            await asyncio.wait({self._current}, timeout=max(0.0, deadline - time.monotonic()))
        while self._buffer and time.monotonic() < deadline:
            await self._write(self._buffer.take(self._batch_max))

    async def _write(self, batch: Batch) -> None:
        try:
            written = await self._heartbeats.apply(rounds(batch), acks(batch))
        except StorageUnavailable as exc:
            allowed, suppressed = self._outage_log.allow()
            if allowed:
                log.warning("heartbeat.write_failed", error=str(exc), devices=len(batch),
                            suppressed=suppressed)
            self._buffer.requeue(batch)
            await asyncio.sleep(RETRY_SECONDS)
            return
        except BatchFailed as exc:
            await self._write_failed(batch, exc)
            return
        self._buffer.done()
        committed = time.time()
        metrics.BATCH_SIZE.observe(sum(len(queue) for queue in batch.values()))
        for queue in batch.values():
            for entry in queue:
                metrics.HEARTBEAT_LAG.observe(committed - (entry.first_received or entry.received))
        self._on_written(written)
        self._done(receipts_of(batch))

    async def _write_failed(self, batch: Batch, exc: BatchFailed) -> None:
        """A batch PostgreSQL refused: retry a transient failure; isolate a poison one.

        A heartbeat the database cannot take must not hold up or take down the others, so
        the batch is halved until the failing device is alone; its heartbeats are dropped
        and counted as ``write_error``.
        """
        log.error("heartbeat.batch_failed", error=str(exc)[:300], devices=len(batch),
                  retryable=exc.retryable)
        if exc.retryable:
            self._buffer.requeue(batch)
            return
        if len(batch) == 1:
            self._buffer.done()
            ((serial, queue),) = batch.items()
            self._reject("write_error", serial, str(exc), len(queue))
            self._done(receipts_of(batch))
            return
        serials = list(batch)
        middle = len(serials) // 2
        for half in (serials[:middle], serials[middle:]):
            await self._write({serial: batch[serial] for serial in half})


def rounds(batch: Batch) -> list[HeartbeatColumns]:
    """Split a batch into rounds with one heartbeat per device each, in arrival order.

    Nearly every batch is a single round; a device with several buffered heartbeats gets
    them applied in the order they arrived, exactly as if they had come one batch at a
    time: the ts guard then skips a late one just as it would have one batch later.
    (Sorting by ts instead would apply a late heartbeat's fields that a newer one lacks.)
    """
    depth = max(len(queue) for queue in batch.values())
    result = []
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
                # A later entry of the same device is newer (see `fold`), so it is
                # applied whenever this one is: the commands go out with it alone, and
                # each delivery is counted once. (One exception: an entry without `ts`
                # followed by a stale one; its commands then wait for the next heartbeat.)
                columns.deliver.append(index == len(queue) - 1)
        result.append(columns)
    return result


def acks(batch: Batch) -> AckColumns | None:
    columns = AckColumns([], [], [], [])
    for serial, queue in batch.items():
        for entry in queue:
            for ack in entry.acks:
                columns.serials.append(serial)
                columns.ids.append(ack.id)
                columns.statuses.append(ack.status)
                columns.details.append(ack.detail)
    return columns if columns.ids else None
