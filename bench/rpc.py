"""Request/reply load: ``GET /v1/devices/{id}`` with a fixed number of requests in flight.

A backend-style caller over MQTT (aiomqtt, MQTT 5 connection, MQTT 3.1.1-style envelope:
``reply_to`` and ``correlation_id`` in the JSON) publishes QoS 1 requests to
``{prefix}api/v1/requests`` and subscribes to ``{prefix}api/v1/replies/bench``. Each of
``in_flight`` workers sends a request for a random device, waits for its reply, and sends
the next, so exactly ``in_flight`` requests are outstanding. Latency is from just before
the publish to the reply's arrival (it includes the PUBACK round trip of the request).

Replies are matched on arrival by the queue aiomqtt puts messages into (no task or
``async for`` step per reply), so the client stays cheap next to the gateway.

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

import aiomqtt
import msgspec

from bench._common import cpu_seconds


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


def _client(host: str, port: int, queue: _ReplyQueue, name: str, in_flight: int) -> aiomqtt.Client:
    client = aiomqtt.Client(
        host,
        port,
        identifier=f"bench-{name}-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", lambda maxsize=0: queue),
        max_inflight_messages=max(100, 2 * in_flight),
        # Nagle would hold a request back behind the previous one's PUBACK.
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )
    client.pending_calls_threshold = 10 * in_flight  # aiomqtt warns past it (default 10)
    return client


class _ReplyQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue: resolves the waiting request's future instead of queuing."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[str, asyncio.Future[tuple[float, int]]] = {}
        self.unmatched = 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        now = time.perf_counter()
        try:
            reply = msgspec.json.decode(item.payload, type=_Reply)
        except (msgspec.DecodeError, TypeError):
            self.unmatched += 1
            return
        future = self.waiting.pop(str(reply.correlation_id), None)
        if future is None or future.done():
            self.unmatched += 1
            return
        future.set_result((now, reply.status))


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
    queue = _ReplyQueue()
    reply_topic = f"{topic_prefix}api/v1/replies/bench"
    request_topic = f"{topic_prefix}api/v1/requests"
    rng = random.Random(seed)
    envelope = Envelope(api_key, reply_topic)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    timeouts = 0
    counter = 0
    client = _client(host, port, queue, "rpc", in_flight)
    loop = asyncio.get_running_loop()
    async with client:
        await client.subscribe(reply_topic, qos=1)
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
                future: asyncio.Future[tuple[float, int]] = loop.create_future()
                queue.waiting[correlation] = future
                payload = envelope.get_device(rng.choice(device_ids), correlation)
                await client.publish(request_topic, payload, qos=1)
                try:
                    done, status = await asyncio.wait_for(future, timeout)
                except TimeoutError:
                    queue.waiting.pop(correlation, None)
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
    queue = _ReplyQueue()
    reply_topic = f"{topic_prefix}api/v1/replies/bench-probe"
    request_topic = f"{topic_prefix}api/v1/requests"
    rng = random.Random(seed)
    envelope = Envelope(api_key, reply_topic)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    timeouts = 0
    sent = 0
    client = _client(host, port, queue, "probe", 100)
    loop = asyncio.get_running_loop()

    async def one(correlation: str) -> None:
        nonlocal timeouts
        future: asyncio.Future[tuple[float, int]] = loop.create_future()
        queue.waiting[correlation] = future
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await client.publish(
                    request_topic, envelope.get_device(rng.choice(device_ids), correlation),
                    qos=1)
                done, status = await future
        except TimeoutError:
            queue.waiting.pop(correlation, None)
            timeouts += 1
            return
        latencies.append((done - t0) * 1000)
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    async with client:
        await client.subscribe(reply_topic, qos=1)
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
