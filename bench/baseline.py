"""The "straightforward implementation" reference gateway, for comparison.

What a first version of the heartbeat path would look like: aiomqtt (MQTT 5) subscribed
at QoS 1 to ``{prefix}devices/+/heartbeat``, an ``async for`` over ``client.messages``,
``json.loads`` per message and one awaited ``UPDATE`` per message on a single asyncpg
connection (asyncpg prepares and caches the statement on first use). Deliberately not
optimised: it is the yardstick.

Python API::

    result = await run_baseline(dsn, "127.0.0.1", 1883, count=100_000)
    print(result.summary())

CLI::

    python -m bench.baseline --database-url postgresql://postgres@127.0.0.1/bench_scratch \\
        --mqtt-host 127.0.0.1 --mqtt-port 1883 [--topic-prefix ''] \\
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
from typing import Any

import aiomqtt
import asyncpg

from bench._common import Progress, cpu_seconds, run, run_until
from bench.ceiling import heartbeat_filter

UPDATE_HEARTBEAT = """
UPDATE device_health SET
    battery_percent = $2,
    storage_used_mb = $3,
    storage_total_mb = $4,
    signal_strength_dbm = $5,
    firmware_version = $6,
    recording_state = $7::jsonb,
    last_ts = $8,
    last_heartbeat_at = now()
WHERE serial_number = $1 AND NOT deleted AND (last_ts IS NULL OR last_ts < $8)
"""


@dataclass(slots=True)
class Counts:
    applied: int = 0  # UPDATE hit a row
    skipped: int = 0  # unknown/deleted device, or not newer than the stored ts
    errors: int = 0  # undecodable payload or topic


@dataclass(frozen=True, slots=True)
class BaselineResult:
    handled: int
    applied: int
    skipped: int
    errors: int
    seconds: float  # first message received .. last message handled
    cpu_seconds: float  # gateway process CPU (PostgreSQL's own CPU not included)

    @property
    def rate(self) -> float:
        """Handled messages per second."""
        return self.handled / self.seconds if self.seconds > 0 else 0.0

    @property
    def applied_rate(self) -> float:
        return self.applied / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_1000(self) -> float:
        return self.cpu_seconds * 1e6 / self.handled if self.handled else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d |= {
            "rate": self.rate,
            "applied_rate": self.applied_rate,
            "cpu_ms_per_1000": self.cpu_ms_per_1000,
        }
        return d

    def summary(self) -> str:
        return (
            f"baseline: {self.handled:,} handled ({self.applied:,} applied, "
            f"{self.skipped:,} skipped, {self.errors:,} errors) in {self.seconds:.2f} s "
            f"= {self.rate:,.0f} msgs/s ({self.applied_rate:,.0f} applied/s); "
            f"CPU {self.cpu_seconds:.2f} s = {self.cpu_ms_per_1000:.1f} ms per 1000 msgs"
        )


async def _handle_all(
    client: aiomqtt.Client, db: asyncpg.Connection, p: Progress, counts: Counts
) -> None:
    perf = time.perf_counter
    async for message in client.messages:
        if not p.first:
            p.first = perf()
        try:
            serial = message.topic.value.split("/")[-2]
            hb = json.loads(message.payload)
            args = (
                serial,
                hb["battery_percent"],
                hb["storage_used_mb"],
                hb["storage_total_mb"],
                hb["signal_strength_dbm"],
                hb["firmware_version"],
                json.dumps(hb["recording_state"]),
                hb["ts"],
            )
        except (ValueError, KeyError, TypeError, IndexError):
            counts.errors += 1
        else:
            status = await db.execute(UPDATE_HEARTBEAT, *args)
            if status == "UPDATE 1":
                counts.applied += 1
            else:
                counts.skipped += 1
        p.count += 1
        p.last = perf()


async def run_baseline(
    database_url: str,
    mqtt_host: str = "127.0.0.1",
    mqtt_port: int = 1883,
    *,
    topic_prefix: str = "",
    count: int | None = None,
    duration: float | None = None,
    idle_timeout: float | None = 3.0,
    ready: asyncio.Event | None = None,
    client_id: str | None = None,
    progress: Progress | None = None,
    counts: Counts | None = None,
    stop: asyncio.Event | None = None,
) -> BaselineResult:
    """Handle heartbeats until ``count`` were handled, ``duration`` seconds passed (from
    the subscription), ``idle_timeout`` seconds passed without one after the first, or
    ``stop`` is set. ``ready`` is set once subscribed; ``progress`` and ``counts``
    (optional) are the live counters, for a watcher (`bench.reference`)."""
    if count is None and duration is None and idle_timeout is None and stop is None:
        raise ValueError("give a count, a duration, an idle timeout or a stop event")
    progress = Progress() if progress is None else progress
    counts = Counts() if counts is None else counts
    db = await asyncpg.connect(database_url)
    try:
        async with aiomqtt.Client(
            mqtt_host,
            mqtt_port,
            identifier=client_id or f"bench-baseline-{os.getpid()}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(heartbeat_filter(topic_prefix), qos=1)
            cpu0 = cpu_seconds()
            if ready is not None:
                ready.set()
            await run_until(
                _handle_all(client, db, progress, counts),
                progress,
                count=count,
                duration=duration,
                idle_timeout=idle_timeout,
                stop=stop,
            )
            cpu = cpu_seconds() - cpu0
    finally:
        await db.close()
    return BaselineResult(
        handled=progress.count,
        applied=counts.applied,
        skipped=counts.skipped,
        errors=counts.errors,
        seconds=progress.span,
        cpu_seconds=cpu,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Straightforward heartbeat gateway (reference).")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/bench_scratch")
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--idle-timeout", type=float, default=3.0, help="stop this long after the last message"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)

    async def go() -> BaselineResult:
        ready = asyncio.Event()
        task = asyncio.create_task(
            run_baseline(
                args.database_url,
                args.mqtt_host,
                args.mqtt_port,
                topic_prefix=args.topic_prefix,
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
