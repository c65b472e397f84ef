"""Request/reply load: ``GET /v1/devices/{id}`` with a fixed number of requests in flight.

A backend-style caller over MQTT (an MQTT 5 connection, MQTT 3.1.1-style envelope:
``reply_to`` and ``correlation_id`` in the JSON) publishes QoS 1 requests to
``{prefix}api/v1/requests`` and subscribes to ``{prefix}api/v1/replies/bench``. Each of
``in_flight`` workers sends a request for a random device, waits for its reply, and sends
the next, so exactly ``in_flight`` requests are outstanding. Latency is from just before
the publish to the reply's arrival.

The caller speaks MQTT itself (`_Caller`, with the gateway's packet codec): replies are
matched as they are parsed, and what one event-loop pass writes goes out in one
``send()``. It shares the machine with what it measures, so it must cost little: with
aiomqtt it took 0.18 ms of CPU per request, more than PostgreSQL.

``run_probe`` is the light version for a gateway under heartbeat overload: one request
every ``interval`` (100 ms) whatever became of the previous ones, each given ``timeout``
(5 s), counting the answered, the timed out and their latencies.

Python API::

    result = await run_rpc("127.0.0.1", 1883, key, device_ids, in_flight=64, duration=10)
    print(result.summary())
    stop = asyncio.Event()
    probe = await run_probe("127.0.0.1", 1883, key, device_ids, stop=stop)  # until set
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import msgspec

from bench._common import cpu_seconds
from gateway import mqtt_packets as packets


class _Reply(msgspec.Struct):
    status: int
    correlation_id: str | int | None = None


@dataclass(frozen=True, slots=True)
class RpcResult:
    in_flight: int
    completed: int  # replies received for requests started after the warm-up
    ok: int  # ... with status 200
    statuses: dict[str, int]  # status -> count, for the measured requests
    timeouts: int
    seconds: float  # measured window
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_seconds: float  # this process (the client) over the measured window
    latencies_ms: list[float] = field(repr=False, default_factory=list)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["latencies_ms"]
        return d | {"rate": self.rate}

    def summary(self) -> str:
        return (
            f"rpc: {self.completed:,} replies ({self.ok:,} ok, {self.timeouts} timeouts) in "
            f"{self.seconds:.1f} s = {self.rate:,.0f}/s with {self.in_flight} in flight; "
            f"latency p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
            f"max {self.max_ms:.1f} ms"
        )


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(q * len(sorted_values) + 0.999999)))
    return sorted_values[rank - 1]


class Envelope:
    """``GET /v1/devices/{id}`` request payloads (MQTT 3.1.1-style envelope: ``reply_to``
    and ``correlation_id`` in the JSON), made by joining pre-encoded pieces."""

    def __init__(self, api_key: str, reply_topic: str) -> None:
        self._head = b'{"method":"GET","path":"/v1/devices/'
        self._middle = (
            b'","headers":{"authorization":"Bearer ' + api_key.encode() + b'"},"reply_to":"'
            + reply_topic.encode() + b'","correlation_id":"'
        )

    def get_device(self, device_id: str, correlation: str) -> bytes:
        return self._head + device_id.encode() + self._middle + correlation.encode() + b'"}'


class _Caller(asyncio.Protocol):
    """A backend caller's MQTT 5 connection, spoken without a client library.

    It publishes QoS 1 requests (their PUBACKs are read and dropped: the reply is what
    counts) and takes QoS 1 replies, resolving the waiting request's future as each one
    is parsed. What one pass of the event loop writes (requests, and the PUBACKs of the
    replies just read) goes out in one ``send()``, so the caller costs the machine little
    next to the gateway it measures. A request not answered within its timeout is failed
    by a sweep four times a second rather than by a timer of its own.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # correlation id -> (the future of (arrival, status), deadline)
        self.waiting: dict[str, tuple[asyncio.Future[tuple[float, int]], float]] = {}
        self.unmatched = 0
        self._answers: dict[int, asyncio.Future[bytes]] = {}  # CONNACK (0), SUBACK (its id)
        self._out: list[bytes] = []
        self._rest = b""
        self._packet_ids = 0
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, host: str, port: int, name: str, reply_topic: str) -> _Caller:
        loop = asyncio.get_running_loop()
        _, caller = await loop.create_connection(cls, host, port)
        try:
            await caller._start(f"bench-{name}-{os.getpid()}", reply_topic)
        except BaseException:
            caller.close()
            raise
        return caller

    async def _start(self, client_id: str, reply_topic: str) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Nagle would hold a request back behind the previous one's PUBACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(10):
            connack = await self._ask(0, packets.connect(
                client_id, keepalive=0, clean_start=True, session_expiry=0,
                receive_maximum=65535, maximum_packet_size=16 * 1024 * 1024))
            if len(connack) < 2 or connack[1] >= 0x80:
                raise ConnectionError(f"the broker refused the caller: {connack.hex()}")
            packet_id = self._next_packet_id()
            suback = await self._ask(packet_id, packets.subscribe(packet_id, [reply_topic]))
        if not suback or suback[-1] >= 0x80:
            raise ConnectionError(f"the broker refused the subscription to {reply_topic}")
        self._sweeper = asyncio.create_task(self._sweep())

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.write(packets.DISCONNECT_PACKET)
            self.transport.close()

    def call(self, topic: str, payload: bytes, correlation: str,
             timeout: float) -> asyncio.Future[tuple[float, int]]:
        """Publish a request at QoS 1; the future gets (arrival, status) of its reply, or
        TimeoutError after ``timeout`` s."""
        future: asyncio.Future[tuple[float, int]] = self.loop.create_future()
        self.waiting[correlation] = (future, time.perf_counter() + timeout)
        self._write(packets.publish(topic, self._next_packet_id(), payload))
        return future

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            expired = [c for c, (_, deadline) in self.waiting.items() if deadline <= now]
            for correlation in expired:
                future, _ = self.waiting.pop(correlation)
                if not future.done():
                    future.set_exception(TimeoutError())

    async def _ask(self, key: int, packet: bytes) -> bytes:
        self._answers[key] = self.loop.create_future()
        self._write(packet)
        try:
            return await self._answers[key]
        finally:
            self._answers.pop(key, None)

    def _next_packet_id(self) -> int:
        self._packet_ids = self._packet_ids % 0xFFFF + 1
        return self._packet_ids

    def _write(self, packet: bytes) -> None:
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(packet)

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        lost = ConnectionError("the broker closed the connection")
        futures: list[asyncio.Future[Any]] = [*self._answers.values()]
        futures += [future for future, _ in self.waiting.values()]
        for future in futures:
            if not future.done():
                future.set_exception(lost)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._rest:
            data = self._rest + data
        size, at = len(data), 0
        acks: list[int] = []
        while at + 2 <= size:
            found = packets.frame(data, at, size)
            if found is None:
                break
            body, end = found
            first = data[at]
            kind = first & 0xF0
            if kind == packets.PUBLISH:
                at = body + 2 + int.from_bytes(data[body:body + 2], "big")  # after the topic
                if first & 0x06:
                    acks.append(int.from_bytes(data[at:at + 2], "big"))
                    at += 2
                properties = packets.read_varint(data, at)
                if properties is None:
                    raise packets.ProtocolError("truncated PUBLISH")
                self._replied(data[properties[1] + properties[0]:end], now)
            elif kind in (packets.CONNACK, packets.SUBACK):
                key = 0 if kind == packets.CONNACK else int.from_bytes(data[body:body + 2], "big")
                answer = self._answers.get(key)
                if answer is not None and not answer.done():
                    answer.set_result(data[body:end])
            # PUBACKs of requests, PINGRESP: nothing to do.
            at = end
        self._rest = data[at:]
        if acks:
            self._write(packets.pubacks(acks))

    def _replied(self, payload: bytes, arrival: float) -> None:
        try:
            reply = msgspec.json.decode(payload, type=_Reply)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.unmatched += 1
            return
        waiting = self.waiting.pop(str(reply.correlation_id), None)
        if waiting is None or waiting[0].done():
            self.unmatched += 1
            return
        waiting[0].set_result((arrival, reply.status))

async def run_rpc(
    host: str,
    port: int,
    api_key: str,
    device_ids: Sequence[str],
    *,
    topic_prefix: str = "",
    in_flight: int = 64,
    duration: float = 10.0,
    warmup: float = 1.0,
    timeout: float = 10.0,  # noqa: ASYNC109 - a per-request limit, not this call's deadline
    seed: int = 0,
) -> RpcResult:
    """Keep ``in_flight`` GETs of random ``device_ids`` outstanding for ``warmup`` +
    ``duration`` seconds; measure the requests started after the warm-up."""
    reply_topic = f"{topic_prefix}api/v1/replies/bench"
    request_topic = f"{topic_prefix}api/v1/requests"
    rng = random.Random(seed)
    envelope = Envelope(api_key, reply_topic)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    timeouts = 0
    counter = 0
    caller = await _Caller.open(host, port, "rpc", reply_topic)
    try:
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + duration
        cpu0 = 0.0

        async def worker() -> None:
            nonlocal counter, timeouts
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                counter += 1
                correlation = str(counter)
                payload = envelope.get_device(rng.choice(device_ids), correlation)
                try:
                    done, status = await caller.call(request_topic, payload, correlation,
                                                     timeout)
                except TimeoutError:
                    if t0 >= measure_from:
                        timeouts += 1
                    continue
                if t0 >= measure_from:
                    latencies.append((done - t0) * 1000)
                    key = str(status)
                    statuses[key] = statuses.get(key, 0) + 1

        async def cpu_at_measure_start() -> None:
            nonlocal cpu0
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            cpu0 = cpu_seconds()

        cpu_task = asyncio.create_task(cpu_at_measure_start())
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        await cpu_task
        cpu = cpu_seconds() - cpu0
        # The window ends when the last measured request was answered.
        seconds = max(time.perf_counter(), end) - measure_from
    finally:
        caller.close()
    latencies.sort()
    return RpcResult(
        in_flight=in_flight,
        completed=len(latencies),
        ok=statuses.get("200", 0),
        statuses=statuses,
        timeouts=timeouts,
        seconds=seconds,
        p50_ms=quantile(latencies, 0.50),
        p99_ms=quantile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else 0.0,
        cpu_seconds=cpu,
        latencies_ms=latencies,
    )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    interval: float  # seconds between requests
    timeout: float  # seconds a request is given
    sent: int
    answered: int  # replies within the timeout, any status
    statuses: dict[str, int]
    timeouts: int  # no reply within the timeout
    seconds: float  # first request .. last request sent
    p50_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.statuses.items()))
        return (
            f"probe: one GET every {self.interval * 1000:.0f} ms for {self.seconds:.1f} s: "
            f"{self.sent:,} sent, {self.answered:,} answered within {self.timeout:g} s "
            f"(statuses {statuses or 'none'}), {self.timeouts} timeouts; latency p50 "
            f"{self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms"
        )


async def run_probe(
    host: str,
    port: int,
    api_key: str,
    device_ids: Sequence[str],
    *,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
    topic_prefix: str = "",
    interval: float = 0.1,
    timeout: float = 5.0,  # noqa: ASYNC109 - a per-request limit, not this call's deadline
    seed: int = 0,
) -> ProbeResult:
    """One GET of a random device every ``interval`` s until ``stop`` is set (each sent on
    time whether or not the previous ones were answered), then wait for the outstanding
    ones; a request not answered within ``timeout`` s counts as a timeout. ``started`` is
    set once subscribed, just before the first request."""
    reply_topic = f"{topic_prefix}api/v1/replies/bench-probe"
    request_topic = f"{topic_prefix}api/v1/requests"
    rng = random.Random(seed)
    envelope = Envelope(api_key, reply_topic)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    timeouts = 0
    sent = 0
    caller = await _Caller.open(host, port, "probe", reply_topic)

    async def one(correlation: str) -> None:
        nonlocal timeouts
        t0 = time.perf_counter()
        payload = envelope.get_device(rng.choice(device_ids), correlation)
        try:
            done, status = await caller.call(request_topic, payload, correlation, timeout)
        except TimeoutError:
            timeouts += 1
            return
        latencies.append((done - t0) * 1000)
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    try:
        if started is not None:
            started.set()
        tasks: set[asyncio.Task[None]] = set()
        start = next_at = time.perf_counter()
        last = start
        while not stop.is_set():
            sent += 1
            last = time.perf_counter()
            task = asyncio.create_task(one(str(sent)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            # Sent on the clock: a late tick does not shift the ones after it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.perf_counter()))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        caller.close()
    latencies.sort()
    return ProbeResult(
        interval=interval,
        timeout=timeout,
        sent=sent,
        answered=len(latencies),
        statuses=statuses,
        timeouts=timeouts,
        seconds=last - start,
        p50_ms=quantile(latencies, 0.50),
        p99_ms=quantile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else 0.0,
    )
