"""A cheap heartbeat load generator that speaks just enough MQTT 3.1.1.

It pre-encodes QoS 1 PUBLISH packets by byte templating and writes them in large
batches to a few plain asyncio connections, counting PUBACKs. Per heartbeat only
``ts`` (and, per round, ``battery_percent``) changes, so one payload is built per
batch and shared by every packet in it.

Devices are split over the connections (device ``i`` always uses connection
``i % connections``, so each device's heartbeats stay in order) and visited
round-robin: each device gets one heartbeat per "round" of its connection.

``ts`` (ms) strictly increases per device: a round's ``ts`` values are the wall clock
but never below (largest ``ts`` of the previous round) + 1. With few devices and a high
rate (more than one round per millisecond) ``ts`` therefore runs ahead of the clock.

Python API::

    gen = LoadGen("127.0.0.1", 1883, make_serials(10_000))
    result = await gen.run(rate=5_000, duration=20)
    print(result.summary())
    expected = gen.last_sent()    # {serial: {"ts": ..., "battery_percent": ...}}

CLI::

    python -m bench.loadgen --devices 10000 --rate 5000 --duration 20 \\
        --host 127.0.0.1 --port 1883 --topic-prefix ''

CPU figures are for the whole process (``resource.getrusage(RUSAGE_SELF)``): run the
generator in its own process (the CLI) for clean numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import cast

DEFAULT_SERIAL_PREFIX = "SIM-"
MAX_WINDOW = 65_000  # in-flight packet ids must stay unique among 1..65535

# The heartbeat payload, split around the two fields that change. ``ts`` is always 13
# digits (ms since the epoch, until the year 2286); the battery is right-aligned in 3
# characters (" 87"): JSON allows the leading blank, and a fixed payload length lets every
# device's fixed header (with its remaining-length) be encoded once.
_P0 = b'{"ts": '
_P1 = b', "firmware_version": "1.4.2", "battery_percent": '
_P2 = (
    b', "storage_used_mb": 5120, "storage_total_mb": 32768, "signal_strength_dbm": -67, '
    b'"recording_state": {"device_state": "idle", "pending_recordings": 2, "flags": 0, '
    b'"connection_type": ["wifi"]}, "settings_version": 1}'
)
_TS_DIGITS = 13
PAYLOAD_LEN = len(_P0) + _TS_DIGITS + len(_P1) + 3 + len(_P2)
_BATTERY = [f"{b:>3}".encode() for b in range(101)]
DEFAULT_BATTERY = 87

# Packet identifiers 1..65535, pre-encoded: index i holds id i + 1.
_PIDS = [i.to_bytes(2, "big") for i in range(1, 65536)]

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
_PUBACK = 0x40  # first byte of a PUBACK; a PUBACK is always 4 bytes: 40 02 id id


def make_serials(n: int, prefix: str = DEFAULT_SERIAL_PREFIX, start: int = 0) -> list[str]:
    """Device serials ``f"{prefix}{i:07d}"`` for ``i`` in ``start .. start + n - 1``."""
    return [f"{prefix}{i:07d}" for i in range(start, start + n)]


def battery_for_round(round_no: int) -> int:
    """The battery level sent in a round when batteries vary: 100, 99, ..., 1, 100, ..."""
    return 100 - round_no % 100


def encode_remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _u16_str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def connect_packet(client_id: str, keepalive: int) -> bytes:
    """MQTT 3.1.1 CONNECT with clean session, no credentials, no will."""
    variable = _u16_str(b"MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big")
    body = variable + _u16_str(client_id.encode())
    return b"\x10" + encode_remaining_length(len(body)) + body


def publish_head(topic: bytes) -> bytes:
    """Everything of a QoS 1 PUBLISH (payload of `PAYLOAD_LEN`) before the packet id."""
    remaining = 2 + len(topic) + 2 + PAYLOAD_LEN
    return b"\x32" + encode_remaining_length(remaining) + _u16_str(topic)


def heartbeat_payload(ts: int, battery: int) -> bytes:
    ts_b = str(ts).encode()
    if len(ts_b) != _TS_DIGITS:
        raise ValueError(f"ts {ts} is not a 13-digit millisecond timestamp")
    return b"".join((_P0, ts_b, _P1, _BATTERY[battery], _P2))


class _Conn(asyncio.Protocol):
    """One MQTT connection and the devices that publish over it."""

    def __init__(self, index: int, heads: list[bytes], vary_battery: bool) -> None:
        self.index = index
        self.heads = heads  # per local device: PUBLISH fixed header + topic
        self.vary_battery = vary_battery
        n = len(heads)
        # Device state, kept across runs: last ts/battery sent (0: never).
        self.last_ts = [0] * n
        self.last_battery = [0] * n
        self.cursor = 0  # next local device in the current round
        self.round = 0
        self.round_floor = 0  # every ts of the current round is >= this
        self.round_max = 0  # largest ts used in the current round
        self.pid_pos = 0  # index into _PIDS of the next packet id
        self._reset_run()

    def _reset_run(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        self.closing = False
        self.paused = False
        self.buf = b""
        self.sent = 0
        self.acked = 0
        self.last_ack_at = 0.0
        self.last_write_at = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast.
        self.transport = cast("asyncio.Transport", transport)
        # Let large batches sit in the transport buffer instead of pausing after 64 KiB.
        self.transport.set_write_buffer_limits(high=16 * 1024 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.lost = exc or ConnectionResetError("broker closed the connection")
            if self.connack is not None and not self.connack.done():
                self.connack.set_exception(self.lost)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        before = self.acked
        buf = self.buf + data if self.buf else data
        n = len(buf) >> 2
        end = n << 2
        # Fast path: almost everything the broker sends is 4-byte PUBACKs (40 02 id id).
        # ``buf`` starts on a packet boundary, so if every 4-byte group starts 40 02 then
        # every group is a PUBACK; two C-level strided counts check that for the batch.
        if n and buf[0:end:4].count(_PUBACK) == n and buf[1:end:4].count(2) == n:
            self.acked += n
            self.buf = buf[end:]
        else:
            self.buf = self._parse(buf)
        if self.acked != before:
            self.last_ack_at = time.perf_counter()

    def _parse(self, buf: bytes) -> bytes:
        """Generic packet walk; returns the incomplete tail."""
        pos, size = 0, len(buf)
        while pos + 2 <= size:
            remaining, mult, i = 0, 1, pos + 1
            while True:
                if i >= size:
                    return buf[pos:]
                byte = buf[i]
                i += 1
                remaining += (byte & 0x7F) * mult
                if byte < 0x80:
                    break
                mult *= 128
            if i + remaining > size:
                return buf[pos:]
            ptype = buf[pos] >> 4
            if ptype == 4:  # PUBACK
                self.acked += 1
            elif ptype == 2:  # CONNACK: flags, return code
                code = buf[i + 1]
                if self.connack is not None and not self.connack.done():
                    if code == 0:
                        self.connack.set_result(None)
                    else:
                        self.connack.set_exception(
                            ConnectionRefusedError(f"CONNACK return code {code}")
                        )
            # PINGRESP (13) and anything else: nothing to do.
            pos = i + remaining
        return buf[pos:]

    # -- sending ----------------------------------------------------------------------

    def _take_pids(self, cnt: int) -> list[bytes]:
        p = self.pid_pos
        end = p + cnt
        if end <= len(_PIDS):
            self.pid_pos = end % len(_PIDS)
            return _PIDS[p:end]
        self.pid_pos = end - len(_PIDS)
        return _PIDS[p:] + _PIDS[: self.pid_pos]

    def build(self, k: int, now_ms: int) -> bytes:
        """The next ``k`` PUBLISH packets of this connection's round-robin, as one buffer."""
        parts: list[bytes] = []
        heads = self.heads
        n = len(heads)
        while k > 0:
            c0 = self.cursor
            cnt = min(k, n - c0)
            c1 = c0 + cnt
            ts = max(now_ms, self.round_floor)
            self.round_max = max(self.round_max, ts)
            battery = battery_for_round(self.round) if self.vary_battery else DEFAULT_BATTERY
            payload = heartbeat_payload(ts, battery)
            # Interleave [head, packet id, payload] * cnt with three slice assignments
            # (C loops) instead of a Python loop per message; b"".join then copies each
            # packet once. The payload object is shared by all cnt packets.
            seg = [payload] * (3 * cnt)
            seg[0::3] = heads[c0:c1]
            seg[1::3] = self._take_pids(cnt)
            parts += seg
            self.last_ts[c0:c1] = [ts] * cnt
            self.last_battery[c0:c1] = [battery] * cnt
            k -= cnt
            if c1 == n:  # round complete: the next round's ts must all be larger
                self.cursor = 0
                self.round += 1
                self.round_floor = self.round_max + 1
            else:
                self.cursor = c1
        return b"".join(parts)

    def write(self, data: bytes, now: float) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.last_write_at = now


@dataclass(frozen=True, slots=True)
class LoadResult:
    devices: int
    connections: int
    target_rate: float | None  # None: as fast as the window allows
    sent: int
    acked: int
    send_seconds: float  # first batch written .. last batch written
    ack_seconds: float  # first batch written .. last PUBACK received
    cpu_seconds: float  # generator process CPU (user + system) over the run

    @property
    def rate(self) -> float:
        """Achieved send rate, msgs/s."""
        return self.sent / self.send_seconds if self.send_seconds > 0 else 0.0

    @property
    def ack_rate(self) -> float:
        return self.acked / self.ack_seconds if self.ack_seconds > 0 else 0.0

    @property
    def cpu_ms_per_1000(self) -> float:
        """CPU milliseconds per 1000 messages sent."""
        return self.cpu_seconds * 1e6 / self.sent if self.sent else 0.0

    @property
    def cpu_percent(self) -> float:
        """CPU use over the run, in % of one core."""
        return 100 * self.cpu_seconds / self.ack_seconds if self.ack_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        d: dict[str, float | int | None] = asdict(self)
        d |= {
            "rate": self.rate,
            "ack_rate": self.ack_rate,
            "cpu_ms_per_1000": self.cpu_ms_per_1000,
            "cpu_percent": self.cpu_percent,
        }
        return d

    def summary(self) -> str:
        target = f"{self.target_rate:,.6g}/s" if self.target_rate else "max"
        return (
            f"loadgen: {self.devices:,} devices over {self.connections} connections, "
            f"target {target}\n"
            f"  sent {self.sent:,} in {self.send_seconds:.2f} s = {self.rate:,.0f} msgs/s\n"
            f"  PUBACKs {self.acked:,} ({self.sent - self.acked:,} missing) "
            f"by {self.ack_seconds:.2f} s = {self.ack_rate:,.0f} msgs/s\n"
            f"  CPU {self.cpu_seconds:.2f} s = {self.cpu_ms_per_1000:.1f} ms per 1000 msgs "
            f"({self.cpu_percent:.1f}% of a core)"
        )


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class LoadGen:
    """Heartbeat publisher for ``serials`` over ``connections`` MQTT 3.1.1 connections.

    ``window`` bounds unacknowledged PUBLISHes per connection; ``slice_seconds`` is the
    pacing tick (each tick writes what the target rate says is due). Device state (last
    ``ts`` and battery sent) survives across `run` calls, so runs can be chained.
    """

    def __init__(
        self,
        host: str,
        port: int,
        serials: Sequence[str],
        *,
        topic_prefix: str = "",
        connections: int = 4,
        window: int = 20_000,
        slice_seconds: float = 0.01,
        vary_battery: bool = True,
        client_id_prefix: str = "loadgen",
        keepalive: int = 60,
    ) -> None:
        if not serials:
            raise ValueError("no devices")
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be in 1..{MAX_WINDOW}")
        connections = max(1, min(connections, len(serials)))
        self.host = host
        self.port = port
        self.serials = list(serials)
        self.topic_prefix = topic_prefix
        self.window = window
        self.slice_seconds = slice_seconds
        self.client_id_prefix = client_id_prefix
        self.keepalive = keepalive
        self._conns = [
            _Conn(
                c,
                [
                    publish_head(f"{topic_prefix}devices/{s}/heartbeat".encode())
                    for s in self.serials[c::connections]
                ],
                vary_battery,
            )
            for c in range(connections)
        ]

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def sent_in_run(self) -> int:
        """PUBLISHes written so far in the current (or the last) `run`; readable while a
        run is in progress (e.g. by a task watching a subscriber's backlog)."""
        return sum(c.sent for c in self._conns)

    # -- what was sent ----------------------------------------------------------------

    def last_sent_arrays(self) -> tuple[list[int], list[int]]:
        """(last ts, last battery) per device number (index into ``serials``); 0: never."""
        n, c_count = len(self.serials), len(self._conns)
        ts, battery = [0] * n, [0] * n
        for c in self._conns:
            ts[c.index :: c_count] = c.last_ts
            battery[c.index :: c_count] = c.last_battery
        return ts, battery

    def last_sent(self, indices: Iterable[int] | None = None) -> dict[str, dict[str, int]]:
        """``{serial: {"ts": ..., "battery_percent": ...}}`` for devices sent at least once.

        ``indices`` restricts the result to those device numbers.
        """
        ts, battery = self.last_sent_arrays()
        picked = range(len(self.serials)) if indices is None else indices
        return {
            self.serials[i]: {"ts": ts[i], "battery_percent": battery[i]} for i in picked if ts[i]
        }

    # -- running ----------------------------------------------------------------------

    async def _open(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn._reset_run()
        conn.connack = loop.create_future()
        await loop.create_connection(lambda: conn, self.host, self.port)
        assert conn.transport is not None
        client_id = f"{self.client_id_prefix}-{os.getpid()}-{conn.index}"
        conn.transport.write(connect_packet(client_id, self.keepalive))
        await asyncio.wait_for(conn.connack, 10)

    async def _close(self, conn: _Conn) -> None:
        conn.closing = True
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(DISCONNECT)
            conn.transport.close()

    async def run(
        self,
        *,
        rate: float | None = None,
        duration: float | None = None,
        count: int | None = None,
        drain_timeout: float = 30.0,
    ) -> LoadResult:
        """Publish at ``rate`` msgs/s (None/0: as fast as the window allows) until
        ``duration`` seconds have passed or ``count`` messages were sent (whichever is
        first), then wait up to ``drain_timeout`` s for the outstanding PUBACKs."""
        if duration is None and count is None:
            raise ValueError("give a duration or a count")
        conns = self._conns
        try:
            await asyncio.gather(*(self._open(c) for c in conns))
            return await self._run(rate or None, duration, count, drain_timeout)
        finally:
            await asyncio.gather(*(self._close(c) for c in conns))

    async def _run(
        self, rate: float | None, duration: float | None, count: int | None, drain_timeout: float
    ) -> LoadResult:
        conns = self._conns
        c_count = len(conns)
        window = self.window
        tick = self.slice_seconds
        ping_after = self.keepalive / 2 if self.keepalive else float("inf")

        def share(total: int, c: _Conn) -> int:
            """Connection c's part of ``total`` when split as evenly as possible."""
            return total // c_count + (c.index < total % c_count)

        quota = [share(count, c) if count is not None else None for c in conns]

        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        next_tick = t0
        send_end = t0
        for c in conns:
            c.last_write_at = t0  # CONNECT just went out
        while True:
            now = time.perf_counter()
            elapsed = now - t0
            for c in conns:
                if c.lost is not None:
                    raise ConnectionError(f"connection {c.index} lost") from c.lost
            # Send everything due by the end of this tick, never past the duration; the
            # last pass (at or after the duration) tops up to exactly rate * duration.
            # Being due is computed from elapsed time, so a late tick is caught up on.
            last_pass = duration is not None and elapsed >= duration
            horizon = elapsed + tick if duration is None else min(elapsed + tick, duration)
            total_due = int(rate * horizon) if rate else None
            now_ms = time.time_ns() // 1_000_000
            finished = True
            for c, q in zip(conns, quota, strict=True):
                if total_due is not None:
                    due = share(total_due, c)
                else:  # no rate: fill the window (but nothing more once time is up)
                    due = c.sent if last_pass else c.sent + window
                if q is not None:
                    due = min(due, q)
                    if c.sent < q:
                        finished = False
                else:
                    finished = False
                # The in-flight window: never more than `window` unacknowledged.
                k = min(due - c.sent, window - (c.sent - c.acked))
                if k > 0 and not c.paused:
                    c.write(c.build(k, now_ms), now)
                    c.sent += k
                    send_end = now
                elif now - c.last_write_at > ping_after:
                    c.write(PINGREQ, now)
            if finished or last_pass:
                break
            next_tick += tick
            delay = next_tick - time.perf_counter()
            if delay < 0:  # fell behind (slow tick): don't try to make up for lost ticks
                next_tick = time.perf_counter()
                delay = 0
            await asyncio.sleep(delay)

        # Wait for the outstanding PUBACKs.
        deadline = time.perf_counter() + drain_timeout
        while any(c.acked < c.sent for c in conns) and time.perf_counter() < deadline:
            if any(c.lost is not None for c in conns):
                break
            await asyncio.sleep(0.005)
        cpu = _cpu_seconds() - cpu0
        sent = sum(c.sent for c in conns)
        acked = sum(c.acked for c in conns)
        last_ack = max(c.last_ack_at for c in conns)
        return LoadResult(
            devices=len(self.serials),
            connections=c_count,
            target_rate=rate,
            sent=sent,
            acked=acked,
            send_seconds=send_end - t0 if sent else 0.0,
            ack_seconds=max(last_ack - t0, 0.0),
            cpu_seconds=cpu,
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MQTT heartbeat load generator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--serial-prefix", default=DEFAULT_SERIAL_PREFIX)
    p.add_argument("--first-device", type=int, default=0, help="index of the first serial")
    p.add_argument("--rate", type=float, default=0, help="msgs/s; 0: as fast as possible")
    p.add_argument("--duration", type=float, help="seconds")
    p.add_argument("--count", type=int, help="total messages")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--window", type=int, default=20_000, help="max unacked per connection")
    p.add_argument("--slice", type=float, default=0.01, help="pacing tick, seconds")
    p.add_argument("--fixed-battery", action="store_true", help="always send 87")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--last-sent", metavar="FILE", help="write {serial: {ts, battery_percent}} JSON here"
    )
    p.add_argument("--no-uvloop", action="store_true")
    return p


async def _main(args: argparse.Namespace) -> tuple[LoadGen, LoadResult]:
    gen = LoadGen(
        args.host,
        args.port,
        make_serials(args.devices, args.serial_prefix, args.first_device),
        topic_prefix=args.topic_prefix,
        connections=args.connections,
        window=args.window,
        slice_seconds=args.slice,
        vary_battery=not args.fixed_battery,
    )
    result = await gen.run(
        rate=args.rate, duration=args.duration, count=args.count, drain_timeout=args.drain_timeout
    )
    return gen, result


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.duration is None and args.count is None:
        _parser().error("give --duration and/or --count")
    if args.no_uvloop:
        gen, result = asyncio.run(_main(args))
    else:
        import uvloop

        gen, result = uvloop.run(_main(args))
    print(json.dumps(result.as_dict()) if args.json else result.summary(), flush=True)
    if args.last_sent:
        with open(args.last_sent, "w") as f:
            json.dump(gen.last_sent(), f)


if __name__ == "__main__":
    main()
