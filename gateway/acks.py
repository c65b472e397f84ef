"""Acknowledging QoS 1 messages once their work is done, in the order they arrived.

The gateway acknowledges a message only when what it asked for is done (a heartbeat
committed, a request answered), so that the broker keeps what the gateway has not
finished: a crash loses at most the connection's in-flight window (its Receive Maximum),
and while the gateway is busy the broker stops sending (backpressure) instead of the
gateway dropping. MQTT 5 (4.6) wants PUBACKs in the order the PUBLISHes arrived, so a
message done early waits for the ones before it.

A *receipt* names one message: its packet id and the connection it came on (a packet id
means nothing on a later connection). Receipt 0 is a message with nothing to acknowledge.
"""

from __future__ import annotations

from collections.abc import Iterable

NOTHING = 0


class AckWindow:
    """The messages of one connection not acknowledged yet, in arrival order."""

    def __init__(self) -> None:
        self._generation = 0
        self._waiting: dict[int, bool] = {}  # packet id -> done, in arrival order

    def reset(self) -> None:
        """A new connection: what was waiting belongs to the old one."""
        self._generation = self._generation % 0x7FFF + 1
        self._waiting.clear()

    def __len__(self) -> int:
        return len(self._waiting)

    def received(self, packet_id: int) -> int:
        """Register a QoS 1 message; returns its receipt."""
        self._waiting[packet_id] = False
        return self._generation << 16 | packet_id

    def done(self, receipts: Iterable[int]) -> list[int]:
        """Mark messages done; returns the packet ids now due, in arrival order."""
        waiting = self._waiting
        for receipt in receipts:
            if receipt >> 16 == self._generation and (receipt & 0xFFFF) in waiting:
                waiting[receipt & 0xFFFF] = True
        due: list[int] = []
        for packet_id, finished in waiting.items():
            if not finished:
                break
            due.append(packet_id)
        for packet_id in due:
            del waiting[packet_id]
        return due
