"""Heartbeat intake: each message decoded on arrival and buffered, or rejected and counted.

Called by the heartbeat link for every message on ``devices/+/heartbeat``, on the event
loop thread. What is rejected here (and why) is counted in ``gateway_heartbeats_rejected_total`` and
logged at most 20 times per 10 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog
from gateway_codecs import device as wire

from gateway import metrics
from gateway.heartbeat_buffer import HeartbeatBuffer, Pending
from gateway.logs import RateLimitedLog

log = structlog.get_logger("gateway.ingest")

FUTURE_TOLERANCE_MS = 5 * 60 * 1000
# A `ts` this far below the clock in milliseconds, but near it in seconds, was sent in
# seconds: it loses against every millisecond `ts` already stored.
_SECONDS_FACTOR = 1000


class Rejections:
    """Counts and logs rejected heartbeats by reason (rate-limited)."""

    def __init__(self) -> None:
        self._log = RateLimitedLog()

    def __call__(self, reason: str, serial: str | None, message: str, count: int = 1) -> None:
        metrics.HEARTBEATS_REJECTED.labels(reason).inc(count)
        allowed, suppressed = self._log.allow()
        if allowed:
            log.warning("heartbeat.rejected", reason=reason, serial=serial, error=message[:200],
                        suppressed=suppressed)


class Intake:
    def __init__(
        self,
        topic_prefix: str,
        buffer: HeartbeatBuffer,
        reject: Rejections,
        done: Callable[[Iterable[int]], None],
    ) -> None:
        """``topic_prefix``: what comes before the serial, ``devices/`` under the prefix.
        ``done`` acknowledges messages whose work is over (here: the rejected ones)."""
        self._prefix = topic_prefix
        self._buffer = buffer
        self._reject = reject
        self._done = done
        self._seconds_log = RateLimitedLog(burst=1, period=60.0)

    def accept(self, topic: str, payload: bytes, content_type: str | None, receipt: int,
               received: float) -> None:
        """One heartbeat message (``gateway_heartbeats_received_total`` is counted by the
        link, per socketful)."""
        serial = topic[len(self._prefix):-len("/heartbeat")]
        if not topic.startswith(self._prefix) or not serial or "/" in serial:
            self._rejected(receipt, "bad_topic", None, "topic is not devices/{serial}/heartbeat")
            return
        try:
            heartbeat = wire.decode_heartbeat(payload, content_type)
        except wire.DecodeError as exc:
            self._rejected(receipt, exc.reason, serial, str(exc))
            return
        if heartbeat.ts is not None:
            now_ms = received * 1000
            if heartbeat.ts > now_ms + FUTURE_TOLERANCE_MS:
                self._rejected(receipt, "future_ts", serial, "ts is more than 5 minutes ahead")
                return
            if abs(heartbeat.ts * _SECONDS_FACTOR - now_ms) < 86_400_000:
                self._warn_seconds(serial, heartbeat.ts)
        if not self._buffer.add(serial, Pending(heartbeat, received, receipts=(receipt,))):
            # Not reached while the buffer's bound is the connection's in-flight window.
            self._rejected(receipt, "overflow", serial, "heartbeat buffer is full")

    def _rejected(self, receipt: int, reason: str, serial: str | None, message: str) -> None:
        self._reject(reason, serial, message)
        self._done((receipt,))

    def _warn_seconds(self, serial: str, ts: int) -> None:
        allowed, suppressed = self._seconds_log.allow()
        if allowed:
            log.warning(
                "heartbeat.ts_in_seconds", serial=serial, ts=ts, suppressed=suppressed,
                hint="ts is milliseconds since the epoch; a ts in seconds is older than "
                     "any millisecond ts stored, so such heartbeats are ignored as stale",
            )
