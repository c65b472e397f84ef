"""The "no processing" receiver: how fast can aiomqtt alone take heartbeats in?

An aiomqtt 2.5.1 client (MQTT 5) subscribes at QoS 1 to ``{prefix}devices/+/heartbeat``
and only counts. Two receive styles:

* ``async-for`` (default): the ordinary ``async for message in client.messages`` loop.
  Each iteration makes aiomqtt create a task and ``asyncio.wait`` on it, which costs
  more than the counting.
* ``drain``: give aiomqtt our own (unbounded) queue through ``queue_type=`` and empty it
  in batches: one ``await q.get()``, then ``get_nowait()`` for whatever else is queued.

The incoming queue stays unbounded: aiomqtt silently drops messages (with only a log
warning) when a bounded queue is full, and the broker has already been PUBACKed.

Rate is measured from the first to the last message received.

Python API::

    result = await run_ceiling("127.0.0.1", 1883, drain=True, idle_timeout=2.0)
    print(result.summary())

CLI::

    python -m bench.ceiling --port 1883 [--topic-prefix ''] [--drain] \\
        [--count N] [--duration S] [--idle-timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import cast

import aiomqtt

from bench._common import Progress, cpu_seconds, run, run_until


@dataclass(frozen=True, slots=True)
class ReceiveResult:
    mode: str  # "async-for" or "drain"
    received: int
    seconds: float  # first message .. last message
    cpu_seconds: float  # receiver process CPU from subscription to the end

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_1000(self) -> float:
        return self.cpu_seconds * 1e6 / self.received if self.received else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        d: dict[str, float | int | str] = asdict(self)
        d |= {"rate": self.rate, "cpu_ms_per_1000": self.cpu_ms_per_1000}
        return d

    def summary(self) -> str:
        return (
            f"ceiling ({self.mode}): {self.received:,} messages in {self.seconds:.2f} s "
            f"= {self.rate:,.0f} msgs/s; CPU {self.cpu_seconds:.2f} s "
            f"= {self.cpu_ms_per_1000:.1f} ms per 1000 msgs"
        )


def heartbeat_filter(topic_prefix: str = "") -> str:
    return f"{topic_prefix}devices/+/heartbeat"


async def _count_async_for(client: aiomqtt.Client, p: Progress) -> None:
    perf = time.perf_counter
    async for _message in client.messages:
        p.count += 1
        p.last = perf()
        if not p.first:
            p.first = p.last


async def _count_drain(q: asyncio.Queue[aiomqtt.Message], p: Progress) -> None:
    perf = time.perf_counter
    while True:
        await q.get()
        # Then everything already queued, without a suspension (and aiomqtt's
        # task + asyncio.wait) per message; qsize() up front avoids a QueueEmpty per batch.
        more = q.qsize()
        for _ in range(more):
            q.get_nowait()
        p.count += 1 + more
        p.last = perf()
        if not p.first:
            p.first = p.last


async def run_ceiling(
    host: str = "127.0.0.1",
    port: int = 1883,
    *,
    topic_prefix: str = "",
    drain: bool = False,
    count: int | None = None,
    duration: float | None = None,
    idle_timeout: float | None = 3.0,
    ready: asyncio.Event | None = None,
    client_id: str | None = None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> ReceiveResult:
    """Subscribe and count until ``count`` messages, ``duration`` seconds (from the
    subscription), ``idle_timeout`` seconds without a message after the first, or until
    ``stop`` is set. ``ready`` is set once the subscription is acknowledged; ``progress``
    (optional) is the live counter, for a watcher (`bench.reference`)."""
    if count is None and duration is None and idle_timeout is None and stop is None:
        raise ValueError("give a count, a duration, an idle timeout or a stop event")
    queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()  # unbounded: never drops
    client = aiomqtt.Client(
        host,
        port,
        identifier=client_id or f"bench-ceiling-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        # aiomqtt calls queue_type(maxsize=...); handing back our instance lets the drain
        # loop read the queue directly.
        queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", lambda maxsize=0: queue),
    )
    progress = Progress() if progress is None else progress
    async with client:
        await client.subscribe(heartbeat_filter(topic_prefix), qos=1)
        cpu0 = cpu_seconds()
        if ready is not None:
            ready.set()
        receive = _count_drain(queue, progress) if drain else _count_async_for(client, progress)
        await run_until(
            receive, progress, count=count, duration=duration, idle_timeout=idle_timeout,
            stop=stop,
        )
        cpu = cpu_seconds() - cpu0
    return ReceiveResult(
        mode="drain" if drain else "async-for",
        received=progress.count,
        seconds=progress.span,
        cpu_seconds=cpu,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Count heartbeats with aiomqtt and do nothing else.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--drain", action="store_true", help="drain the queue in batches")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--idle-timeout", type=float, default=3.0, help="stop this long after the last message"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)

    async def go() -> ReceiveResult:
        ready = asyncio.Event()
        task = asyncio.create_task(
            run_ceiling(
                args.host,
                args.port,
                topic_prefix=args.topic_prefix,
                drain=args.drain,
                count=args.count,
                duration=args.duration,
                idle_timeout=args.idle_timeout,
                ready=ready,
            )
        )
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if ready.is_set():
            print("subscribed", file=sys.stderr, flush=True)
        return await task

    result = run(go(), use_uvloop=not args.no_uvloop)
    print(json.dumps(result.as_dict()) if args.json else result.summary(), flush=True)


if __name__ == "__main__":
    main()
