"""Bulk registration and the Python client's request rate, end to end.

::

    python -m bench.register --devices 1000000

From the repository root. What it does, in order:

1. Drops and re-creates ``--database-url`` (default ``gw_bench_register``: a database of
   its own, never the heartbeat benchmark's) and applies the schema
   (``gateway db migrate``).
2. Starts a tuned Mosquitto (``bench.mosquitto``, with ``set_tcp_nodelay`` as
   ``deploy/mosquitto/mosquitto.conf`` has it) and the gateway as a subprocess
   (``bench.run.GatewayProcess``), and makes an API key with both scopes.
3. **Registration**: ``--devices`` new serials through ``POST /v1/devices/batch`` with
   ``GatewayClient.devices.register_batches``: batches of at most ``--batch-size`` items
   within ``--max-reply-bytes`` of estimated reply (the client's default keeps replies
   under a 1 MiB broker limit), ``--concurrency`` batches in flight. Every answer must be
   201; then PostgreSQL must hold exactly that many devices, each with its health,
   settings and settings history rows. Reports devices per second, and the CPU the
   gateway and PostgreSQL spent per 1,000 devices.
4. **Client request rate**: ``GET /v1/devices/{id}`` of random registered devices with
   ``GatewayClient.devices.get``, ``--rpc-in-flight`` calls outstanding (default 256) for
   ``--rpc-seconds``; reports calls per second and latency percentiles.
5. Stops everything, drops the database unless ``--keep-database``; ``--json FILE``
   saves the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from bench._common import run as run_loop
from bench.mosquitto import TunedMosquitto
from bench.rpc import quantile
from bench.run import GatewayProcess, log, pg_backend_pids, proc_cpu, run_command
from gateway.client import DEFAULT_MAX_REPLY_BYTES, GatewayClient

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/gw_bench_register"


async def drop_database(database_url: str) -> None:
    """Drop the database if it exists (`gateway db migrate` then creates it afresh)."""
    admin, _, name = database_url.rpartition("/")
    conn = await asyncpg.connect(f"{admin}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class Cpu:
    """CPU seconds of the gateway and of the benchmark database's PostgreSQL backends."""

    def __init__(self, gateway_pid: int, db: asyncpg.Connection) -> None:
        self._pid = gateway_pid
        self._db = db
        self._gateway = 0.0
        self._backends: dict[int, float] = {}

    async def start(self) -> None:
        self._gateway = proc_cpu(self._pid) or 0.0
        self._backends = {pid: proc_cpu(pid) or 0.0 for pid in await pg_backend_pids(self._db)}

    async def spent(self) -> tuple[float, float]:
        gateway = (proc_cpu(self._pid) or 0.0) - self._gateway
        postgres = sum((proc_cpu(pid) or 0.0) - self._backends.get(pid, 0.0)
                       for pid in await pg_backend_pids(self._db))
        return gateway, postgres


async def register(gw: GatewayClient, args: argparse.Namespace, cpu: Cpu) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    batches = 0
    serials = (f"{args.serial_prefix}{i:08d}" for i in range(args.devices))
    await cpu.start()
    started = last_log = time.perf_counter()
    async for batch in gw.devices.register_batches(
        serials, batch_size=args.batch_size, concurrency=args.concurrency,
        max_reply_bytes=args.max_reply_bytes or None,
    ):
        batches += 1
        statuses.update(result.status for result in batch.results)
        now = time.perf_counter()
        if now - last_log >= 10:
            done = sum(statuses.values())
            log(f"registered {done:,} of {args.devices:,}: {done / (now - started):,.0f}/s")
            last_log = now
    seconds = time.perf_counter() - started
    gateway_cpu, pg_cpu = await cpu.spent()
    done = sum(statuses.values())
    return {
        "devices": done, "seconds": seconds, "rate": done / seconds, "batches": batches,
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "gateway_cpu_ms_per_1000": gateway_cpu * 1e6 / max(done, 1),
        "pg_cpu_ms_per_1000": pg_cpu * 1e6 / max(done, 1),
    }


async def verify(db: asyncpg.Connection) -> dict[str, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM devices) AS devices,"
        " (SELECT count(*) FROM device_health) AS health,"
        " (SELECT count(*) FROM device_settings WHERE version = 1) AS settings,"
        " (SELECT count(*) FROM device_settings_history WHERE version = 1) AS history")
    return dict(row)


async def client_rate(gw: GatewayClient, ids: list[str], in_flight: int, seconds: float,
                      warmup: float) -> dict[str, Any]:
    """``in_flight`` callers, each getting a random device and then the next, on one
    client; the calls started after the warm-up are measured."""
    rng = random.Random(0)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    measure_from = started + warmup
    end = measure_from + seconds

    async def caller() -> None:
        while (t0 := time.perf_counter()) < end:
            try:
                await gw.devices.get(rng.choice(ids))
            except Exception as exc:  # counted: a benchmark reports failures, not raises
                errors[type(exc).__name__] += 1
                continue
            if t0 >= measure_from:
                latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    window = max(time.perf_counter(), end) - measure_from
    latencies.sort()
    return {
        "in_flight": in_flight, "calls": len(latencies), "seconds": window,
        "rate": len(latencies) / window, "errors": dict(errors),
        "p50_ms": quantile(latencies, 0.5), "p99_ms": quantile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else 0.0,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"args": vars(args)}
    await drop_database(args.database_url)
    await run_command("db", "migrate", database_url=args.database_url)
    with tempfile.TemporaryDirectory(prefix="gw-bench-register-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            broker = await stack.enter_async_context(
                TunedMosquitto(extra_config="set_tcp_nodelay true\n"))
            gateway = GatewayProcess(broker.port, args.database_url, Path(tmp),
                                     env=args.gateway_env)
            stack.push_async_callback(gateway.stop)
            await gateway.start()
            key = (await run_command(
                "apikey", "create", "--scope", "devices:read", "--scope", "devices:write",
                "--name", "bench-register", database_url=args.database_url,
            )).strip().splitlines()[-1]
            db = await asyncpg.connect(args.database_url)
            stack.push_async_callback(db.close)
            log(f"gateway pid {gateway.pid} on broker :{broker.port}; registering "
                f"{args.devices:,} devices")
            async with GatewayClient(f"mqtt://127.0.0.1:{broker.port}", api_key=key,
                                     timeout=60) as gw:
                results["register"] = await register(gw, args, Cpu(gateway.pid, db))
                log(summary(results["register"]))
                results["stored"] = await verify(db)
                log(f"stored: {results['stored']}")
                if args.rpc_seconds > 0:
                    ids = [row["id"] for row in await db.fetch(
                        "SELECT id FROM devices ORDER BY random() LIMIT 100000")]
                    results["client"] = await client_rate(
                        gw, ids, args.rpc_in_flight, args.rpc_seconds, args.rpc_warmup)
                    log(client_summary(results["client"]))
    if not args.keep_database:
        await drop_database(args.database_url)
    register_ok = results["register"]["statuses"] == {"201": args.devices}
    stored_ok = set(results["stored"].values()) == {args.devices}
    results["ok"] = register_ok and stored_ok
    return results


def summary(r: dict[str, Any]) -> str:
    return (f"registration: {r['devices']:,} devices in {r['seconds']:.1f} s = "
            f"{r['rate']:,.0f} devices/s ({r['batches']:,} batches; statuses "
            f"{r['statuses']}); CPU per 1,000 devices: gateway "
            f"{r['gateway_cpu_ms_per_1000']:.0f} ms, PostgreSQL "
            f"{r['pg_cpu_ms_per_1000']:.0f} ms")


def client_summary(r: dict[str, Any]) -> str:
    return (f"client: GET /v1/devices/{{id}} with {r['in_flight']} in flight: "
            f"{r['calls']:,} calls in {r['seconds']:.1f} s = {r['rate']:,.0f}/s; latency "
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms; "
            f"errors {r['errors'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.register",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight")
    parser.add_argument("--max-reply-bytes", type=int, default=DEFAULT_MAX_REPLY_BYTES,
                        help="estimated reply budget per batch; 0 for none")
    parser.add_argument("--serial-prefix", default="BULK-")
    parser.add_argument("--rpc-in-flight", type=int, default=256)
    parser.add_argument("--rpc-seconds", type=float, default=10.0)
    parser.add_argument("--rpc-warmup", type=float, default=1.0)
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable of the gateway process")
    parser.add_argument("--json", type=Path, metavar="FILE", help="save the figures")
    args = parser.parse_args(argv)
    results = run_loop(bench(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(summary(results["register"]))
    if "client" in results:
        print(client_summary(results["client"]))
    if not results["ok"]:
        print(f"FAILED: statuses {results['register']['statuses']}, stored "
              f"{results['stored']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
