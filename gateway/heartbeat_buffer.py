"""The heartbeat buffer: decoded heartbeats per device, waiting for the writer. Bounded.

A newer heartbeat that carries every field an older buffered one carries *supersedes* it
(its acks are kept), and one not newer than the newest buffered is folded into that one,
so a device holds about one entry however long the database is away. Pure: no broker, no
database; the writer takes batches out and puts a failed batch back in front.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway_codecs import device as wire

from gateway import metrics

# What an applied heartbeat writes: health, and the settings version it reports.
_WRITTEN_FIELDS = (
    "firmware_version", "battery_percent", "storage_used_mb", "storage_total_mb",
    "signal_strength_dbm", "recording_state", "settings_version",
)

Batch = dict[str, list["Pending"]]  # serial -> its heartbeats, oldest first


def receipts_of(batch: Batch) -> list[int]:
    return [receipt for queue in batch.values() for entry in queue for receipt in entry.receipts]


@dataclass(slots=True)
class Pending:
    heartbeat: wire.Heartbeat
    received: float  # becomes last_heartbeat_at
    # Acks of the entries folded into this one (tuples: the garbage collector stops
    # tracking a tuple of untracked items, and thousands of entries are alive at once).
    extra_acks: tuple[wire.Ack, ...] = ()
    # When this entry superseded older ones: the oldest one's receive time (for the lag).
    first_received: float | None = None
    # The messages to acknowledge once this entry is written: its own, and those of the
    # entries folded into it.
    receipts: tuple[int, ...] = ()

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
        """Take over what older still has to do once self replaces it: its acks, and its
        messages' acknowledgements."""
        self.extra_acks = (*older.extra_acks, *(older.heartbeat.acks or ()), *self.extra_acks)
        self.first_received = older.first_received or older.received
        self.receipts = (*older.receipts, *self.receipts)

    @property
    def acks(self) -> tuple[wire.Ack, ...]:
        return (*self.extra_acks, *(self.heartbeat.acks or ()))


def fold(queue: list[Pending], entry: Pending) -> int | None:
    """Fold ``entry`` into a device's queue where that changes nothing that gets written.

    Returns the change in the queue's length, or None when the entry needs a slot of its
    own. A heartbeat not newer than the newest queued one is skipped by the ts guard
    whatever becomes of that one, so only its acks are kept; a heartbeat that supersedes
    the newest entries replaces them.
    """
    if not queue:
        return None
    new, last = entry.heartbeat, queue[-1].heartbeat
    if new.ts is not None and last.ts is not None and new.ts <= last.ts:
        queue[-1].extra_acks = (*queue[-1].extra_acks, *entry.acks)
        queue[-1].receipts = (*queue[-1].receipts, *entry.receipts)
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


class HeartbeatBuffer:
    """Per-device queues of pending heartbeats, at most ``limit`` entries in all.

    The batch being written counts against the limit until the writer is done with it: a
    failed write puts it back, and the limit must hold then too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pending: Batch = {}
        self._count = 0
        self._taken = 0  # entries of the batch being written
        self.ready = asyncio.Event()  # set while something waits to be written

    @property
    def depth(self) -> int:
        """Entries waiting to be written (the batch in hand not included)."""
        return self._count

    @property
    def full(self) -> bool:
        return self._count + self._taken >= self.limit

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, serial: str, entry: Pending) -> bool:
        """Buffer ``entry``; False when it needed a slot of its own and none was left."""
        queue = self._pending.get(serial)
        change = None if queue is None else fold(queue, entry)
        if change is None:
            if self.full:
                return False
            if queue is None:
                self._pending[serial] = [entry]
            else:
                queue.append(entry)
            change = 1
        self._count += change
        self.ready.set()
        return True

    def take(self, most: int) -> Batch:
        """Up to ``most`` devices' queues, oldest devices first."""
        batch: Batch = {}
        pending = self._pending
        for serial in pending:
            if len(batch) >= most:
                break
            batch[serial] = pending[serial]
        for serial in batch:
            del pending[serial]
        self._taken = sum(len(queue) for queue in batch.values())
        self._count -= self._taken
        metrics.INBOX_DEPTH.set(self._count)
        if not pending:
            self.ready.clear()
        return batch

    def done(self) -> None:
        """The batch taken last is written (or given up): it no longer counts."""
        self._taken = 0
        metrics.INBOX_DEPTH.set(self._count)

    def requeue(self, batch: Batch) -> None:
        """Put a batch back in front after a failed write; newer arrivals stay behind it,
        and supersede its entries where they can, as in `add`."""
        self._taken = 0
        merged = dict(batch)
        for serial, queue in self._pending.items():
            into = merged.setdefault(serial, [])
            for entry in queue:
                if fold(into, entry) is None:
                    into.append(entry)
        self._pending = merged
        self._count = sum(len(queue) for queue in merged.values())
        metrics.INBOX_DEPTH.set(self._count)
        if merged:
            self.ready.set()
