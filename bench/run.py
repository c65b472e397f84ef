"""The throughput benchmark: one command, tuned brokers, the gateway, a seeded fleet.

::

    python -m bench.run --devices 1000000 --duration 60

From the repository root (``bench`` is not an installed package). What it does, in order:

1. ``gateway db migrate`` into ``--database-url`` (default ``gw_bench``, created if
   missing) and seeds the devices that are missing (``bench.seed``; 1M take ~50 s once,
   later runs only count them). Then sets the fleet's presence (``--fleet``): by default
   every device has reported a moment ago (the steady state of devices that report every
   minute) and the gateway runs with an offline threshold of an hour, since the ladder
   visits each device less than once a minute; ``--fleet unknown`` starts from a fleet
   that never reported, whose every first heartbeat records ``device.online``.
2. Starts a tuned Mosquitto (``bench.mosquitto``) and the gateway as a subprocess
   (``python -m gateway.cli run ... --log-level warning``; with ``--gateway-workers N``
   above 1, ``--workers N``: a supervisor and N workers sharing the group ``gateway``,
   whose ``/metrics`` series, labelled ``worker``, the bench sums), waits for
   ``/healthz``; and, each on a tuned Mosquitto of its own, the references
   (``bench.reference``):
   ``bench.ceiling`` in its ``async for`` mode (aiomqtt's ordinary receive loop, no
   processing: the ceiling for the client library), ``bench.ceiling --drain`` (the same
   with the queue read in batches, the receive style of the gateway's edge) and
   ``bench.baseline`` (``json.loads`` and one awaited ``UPDATE`` per message).
3. **Ladder**: offers heartbeats (``bench.loadgen``, MQTT 3.1.1 QoS 1, devices visited
   round-robin) at each rate of ``--rates`` for ``--step-seconds``, to every subject
   still standing in turn (interleaved, so that on a shared machine the comparisons
   come from the same minutes); a subject drops out at its first rate not sustained.
   A rate is *sustained* when, within ``--grace`` seconds after the last heartbeat was
   sent, the subject applied exactly what was sent (the gateway's
   ``gateway_heartbeats_applied_total``; the references' own counts), nothing was
   rejected, and a sample of the devices heartbeated in the step has in PostgreSQL
   exactly the ``ts`` and ``battery_percent`` last sent to it. After each step the bench
   waits (``--max-drain``) until every heartbeat sent is *accounted for*: applied +
   stale + superseded + rejected == sent, from the gateway's counters.
4. **Soak** (the references are stopped by then): ``--duration`` seconds at
   ``--soak-rate`` (default 16,667/s, a million devices once a minute; the highest
   sustained ladder rate if that is lower, and the next lower one if the soak fails),
   with the same checks on a larger sample (``--verify-sample``), the rejections by
   reason (``overflow``: the buffer was full), receive-to-commit lag
   p50/p99 from the gateway's ``gateway_heartbeat_lag_seconds`` histogram (diffed over
   the soak, interpolated within buckets), the gateway's RSS (``/proc/PID/status``,
   sampled every second) and CPU per 1,000 heartbeats (``/proc/PID/stat``) of the
   gateway (each of its processes, and their sum), Mosquitto, PostgreSQL (the backends
   connected to the bench database) and the load generator (this process). A soak
   *loses* when it rejected a heartbeat, when a sampled device is not at the last
   heartbeat sent, or when applied + stale + superseded != sent; then, after the report,
   the command exits with status 1 (not keeping up in time is no loss by itself).

   ``--overload`` replaces the soak: ``--soak-rate`` (beyond what the gateway applies)
   for ``--duration``, then up to ``--max-drain`` (default 300 s) until every heartbeat
   is accounted for, with no time limit on keeping up, and the zero-loss check; it
   reports the largest backlog (sent - accounted for), the drain time, the overflow
   count, the gateway's RSS, CPU per 1,000 heartbeats, and a request probe (one
   ``GET /v1/devices/{id}`` every 100 ms throughout, 5 s each, ``bench.rpc.run_probe``).
5. **Request/reply**: ``GET /v1/devices/{id}`` with ``--rpc-in-flight`` requests
   outstanding for ``--rpc-seconds`` (``bench.rpc``), with a key made by
   ``gateway apikey create --scope devices:read``.
6. Prints the tables and the targets with their ratios; ``--json FILE`` saves it all
   (``losses``: what each soak lost, empty when nothing).

Every broker and process it starts is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench._common import run as run_loop
from bench.loadgen import LoadGen, make_serials
from bench.mosquitto import TunedMosquitto, free_port
from bench.rpc import ProbeResult, run_probe, run_rpc
from bench.seed import (
    ONLINE_FOR_SECONDS,
    PRESENCE_STATES,
    device_id,
    seed_devices,
    set_presence,
    verify_zero_loss,
)

ROOT = Path(__file__).resolve().parent.parent
# The tables a run writes, vacuumed before it starts.
VACUUMED = ("device_health", "event_outbox", "events", "commands", "devices", "device_settings")
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/gw_bench"
DEFAULT_RATES = "1000,2000,3000,4000,6000,8000,12000,16667,20000,24000,32000"

# The targets.
TARGET_RATE = 16_667  # heartbeats/s: a million devices, one heartbeat a minute each
TARGET_DEVICES = 1_000_000
TARGET_LAG_P99 = 0.250  # s, at TARGET_RATE
TARGET_CEILING_RATIO = 0.7
TARGET_BASELINE_RATIO = 5.0
TARGET_RSS_MB = 300.0
TARGET_RSS_MINUTES = 5.0
TARGET_RPC_RATE = 4_000.0  # GET /v1/devices/{id} with auth, TARGET_RPC_IN_FLIGHT in flight
TARGET_RPC_P99_MS = 50.0
TARGET_RPC_IN_FLIGHT = 64
# CPU ms per 1,000 heartbeats over the soak: every process (the gateway's, Mosquitto, the
# PostgreSQL backends of the bench database, the load generator) together; the gateway's
# (supervisor and workers); the PostgreSQL backends.
TARGET_CPU_ALL_MS = 85.0
TARGET_CPU_GATEWAY_MS = 40.0
TARGET_CPU_PG_MS = 28.0
# --overload: a GET every PROBE_INTERVAL s while overloaded, each answered within this.
TARGET_PROBE_TIMEOUT = 5.0
PROBE_INTERVAL = 0.1
# --max-drain when not given: after a ladder step, after a soak, in --overload.
MAX_DRAIN_STEP, MAX_DRAIN_SOAK, MAX_DRAIN_OVERLOAD = 30.0, 120.0, 300.0

REFERENCE_NAMES = {
    "ceiling": "ceiling (async for)",
    "ceiling-drain": "ceiling (drain)",
    "baseline": "baseline",
}

CLK_TCK = os.sysconf("SC_CLK_TCK")
STALL_SECONDS = 30.0  # waiting for a backlog: give up when nothing moves for this long
LAG_METRIC = "gateway_heartbeat_lag_seconds"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- /proc ------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_rss_mb(pid: int) -> float | None:
    """VmRSS of process ``pid`` in MiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proc_children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat), in PID order."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:  # field 4: ppid
            children.append(int(entry.name))
    return sorted(children)


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").rstrip("\0").split("\0")


def cpu_of(pids: dict[str, int]) -> dict[str, float | None]:
    """CPU seconds so far of each named process."""
    return {name: proc_cpu(pid) for name, pid in pids.items()}


# ---- the gateway's /metrics -------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


@dataclass(frozen=True, slots=True)
class Metrics:
    """The heartbeat series of the gateway's /metrics; with ``--workers`` the sum over the
    workers (``worker`` label)."""

    received: float = 0.0
    applied: float = 0.0
    stale: float = 0.0
    superseded: float = 0.0
    rejected: float = 0.0
    rejected_by: dict[str, float] = field(default_factory=dict)
    inbox_depth: float = 0.0
    unacknowledged: float = 0.0  # received and not yet acknowledged to the broker
    lag_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count), +Inf last
    lag_sum: float = 0.0
    lag_count: float = 0.0
    worker_restarts: float = 0.0  # the supervisor's gateway_worker_restarts_total
    workers: tuple[str, ...] = ()  # the worker labels summed ("": a single process)

    @property
    def accounted(self) -> float:
        """Heartbeats whose handling is over: received = applied + stale + superseded +
        rejected once all are handled."""
        return self.applied + self.stale + self.superseded + self.rejected

    @property
    def overflow(self) -> float:
        return self.rejected_by.get("overflow", 0.0)


_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_PLAIN = {
    "gateway_heartbeats_received_total": "received",
    "gateway_heartbeats_applied_total": "applied",
    "gateway_heartbeats_stale_total": "stale",
    "gateway_heartbeats_superseded_total": "superseded",
    "gateway_inbox_depth": "inbox_depth",
    "gateway_heartbeats_unacknowledged": "unacknowledged",
    f"{LAG_METRIC}_sum": "lag_sum",
    f"{LAG_METRIC}_count": "lag_count",
    "gateway_worker_restarts_total": "worker_restarts",
}


def parse_metrics_by_worker(text: str) -> dict[str, Metrics]:
    """The heartbeat series of an exposition per value of the ``worker`` label ("" for a
    series without one: a single gateway process, or the supervisor's own)."""
    values: dict[str, dict[str, float]] = {}
    rejected_by: dict[str, dict[str, float]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, raw = m.group(1), m.group(3)
        if name not in _PLAIN and name != f"{LAG_METRIC}_bucket" \
                and name != "gateway_heartbeats_rejected_total":
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        worker = labels.pop("worker", "")
        value = float(raw)
        if name == f"{LAG_METRIC}_bucket":
            if "le" in labels:
                buckets.setdefault(worker, []).append((float(labels["le"]), value))  # +Inf
        elif name == "gateway_heartbeats_rejected_total":
            by = rejected_by.setdefault(worker, {})
            reason = labels.get("reason", "")
            by[reason] = by.get(reason, 0.0) + value
        elif not labels:
            values.setdefault(worker, {})[_PLAIN[name]] = value
    out = {}
    for worker in {*values, *rejected_by, *buckets}:
        by = rejected_by.get(worker, {})
        out[worker] = Metrics(
            rejected=sum(by.values()), rejected_by=by,
            lag_buckets=tuple(sorted(buckets.get(worker, []))),
            workers=(worker,), **values.get(worker, {}),
        )
    return out


def combine(parts: Sequence[Metrics]) -> Metrics:
    """The sum of several processes' series (histogram buckets by bound)."""
    if len(parts) == 1:
        return parts[0]
    rejected_by: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for part in parts:
        for reason, value in part.rejected_by.items():
            rejected_by[reason] = rejected_by.get(reason, 0.0) + value
        for le, count in part.lag_buckets:
            buckets[le] = buckets.get(le, 0.0) + count
    return Metrics(
        received=sum(p.received for p in parts),
        applied=sum(p.applied for p in parts),
        stale=sum(p.stale for p in parts),
        superseded=sum(p.superseded for p in parts),
        rejected=sum(rejected_by.values()),
        rejected_by=rejected_by,
        inbox_depth=sum(p.inbox_depth for p in parts),
        unacknowledged=sum(p.unacknowledged for p in parts),
        lag_buckets=tuple(sorted(buckets.items())),
        lag_sum=sum(p.lag_sum for p in parts),
        lag_count=sum(p.lag_count for p in parts),
        worker_restarts=sum(p.worker_restarts for p in parts),
        workers=tuple(sorted(w for p in parts for w in p.workers if w)),
    )


def parse_metrics(text: str) -> Metrics:
    """The heartbeat series of an exposition, summed over every worker."""
    return combine(list(parse_metrics_by_worker(text).values()) or [Metrics()])


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:  # noqa: ASYNC109
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(None, 2)[1]) if head else 0
        return status, body

    return await asyncio.wait_for(go(), timeout)


def histogram_quantile(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]], q: float
) -> float | None:
    """The q-quantile of the observations made between two scrapes of a cumulative
    histogram, interpolated linearly within the bucket (as Prometheus does). None when
    nothing was observed; the largest finite bound when it falls in the +Inf bucket."""
    prev = dict(before)
    diff = [(le, count - prev.get(le, 0.0)) for le, count in after]
    if not diff or diff[-1][1] <= 0:
        return None
    total = diff[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in diff:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            if cumulative == below:
                return le
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


def histogram_fraction_le(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]], bound: float
) -> float | None:
    """Fraction of the observations between two scrapes that were <= ``bound`` (a bucket
    boundary: exact, no interpolation)."""
    prev = dict(before)
    diff = dict((le, count - prev.get(le, 0.0)) for le, count in after)
    total = diff.get(float("inf"), 0.0)
    if total <= 0 or bound not in diff:
        return None
    return diff[bound] / total


# ---- processes under test ---------------------------------------------------------------


@dataclass(slots=True)
class Counters:
    processed: int  # gateway: heartbeats handled (applied + stale + superseded +
    # rejected); references: messages handled
    applied: int  # rows written (ceiling: = handled)
    rejected: int = 0
    metrics: Metrics | None = None  # the gateway's

    @property
    def depth(self) -> int | None:
        return None if self.metrics is None else int(self.metrics.inbox_depth)


class GatewayProcess:
    """``python -m gateway.cli run`` as a child process, with its /metrics; with
    ``workers`` above 1, ``gateway run --workers N``: a supervisor and N worker processes
    (its children), whose /metrics the supervisor gathers with a ``worker`` label."""

    name = "gateway"
    writes = True

    def __init__(self, mqtt_port: int, database_url: str, workdir: Path,
                 pg_settings: Sequence[str] = (), env: Sequence[str] = (),
                 workers: int = 1, offline_after: float | None = None) -> None:
        self.mqtt_port = mqtt_port
        self.workers = workers
        self.offline_after = offline_after  # the gateway's presence threshold, if not its own
        self._pids: dict[str, int] = {}
        self._last: dict[str, Metrics] = {}  # per worker label, the last scraped
        self.scrape_gaps = 0  # scrapes that lacked a worker (its last series stood in)
        self.extra_env = dict(item.split("=", 1) for item in env)
        # Session settings for the gateway's own connections, as DSN query parameters
        # (asyncpg passes unknown ones to the server): an experiment knob.
        self.database_url = database_url
        if pg_settings:
            sep = "&" if "?" in database_url else "?"
            self.database_url += sep + "&".join(pg_settings)
        self.metrics_port = free_port()
        self.log_path = workdir / "gateway.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(self.extra_env)
        with self.log_path.open("wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "run",
                "--mqtt-url", f"mqtt://127.0.0.1:{self.mqtt_port}",
                "--database-url", self.database_url,
                "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
                "--log-level", "warning",
                *(("--workers", str(self.workers)) if self.workers > 1 else ()),
                *(("--offline-after-seconds", f"{self.offline_after:g}")
                  if self.offline_after is not None else ()),
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await http_get("127.0.0.1", self.metrics_port, "/healthz", 1.0)
                # The supervisor answers 200 once every worker does.
                if status == 200 and len(self.processes(refresh=True)) == self.workers + (
                        self.workers > 1):
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("the gateway did not become healthy:\n" + self.log_tail())

    def processes(self, refresh: bool = False) -> dict[str, int]:
        """The gateway's processes by name: ``{"gateway": pid}`` for a single process;
        ``{"supervisor": pid, "worker 1": pid, ...}`` with workers (the supervisor's
        children that run ``--worker i``). Looked up again when ``refresh`` or when one
        of them is gone (a restarted worker)."""
        if self.proc is None:
            return {}
        if not refresh and self._pids and all(
                Path(f"/proc/{pid}").exists() for pid in self._pids.values()):
            return self._pids
        if self.workers <= 1:
            self._pids = {"gateway": self.proc.pid}
            return self._pids
        pids = {"supervisor": self.proc.pid}
        for child in proc_children(self.proc.pid):
            argv = proc_cmdline(child)
            if "--worker" in argv[:-1]:
                pids[f"worker {argv[argv.index('--worker') + 1]}"] = child
        self._pids = dict(sorted(pids.items(), key=lambda kv: (
            kv[0] != "supervisor", int(kv[0].split()[-1]) if kv[0] != "supervisor" else 0)))
        return self._pids

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def metrics(self) -> Metrics:
        """The heartbeat series, summed over the workers. A worker missing from a scrape
        (the supervisor gives a worker 2 s to answer) counts with its last series."""
        status, body = await http_get("127.0.0.1", self.metrics_port, "/metrics", 10.0)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        parts = parse_metrics_by_worker(body.decode())
        if self.workers > 1:
            missing = {w: m for w, m in self._last.items() if w and w not in parts}
            self.scrape_gaps += bool(missing)
            parts |= missing
        self._last = parts
        return combine(list(parts.values()) or [Metrics()])

    async def counters(self) -> Counters:
        m = await self.metrics()
        return Counters(int(m.accounted), int(m.applied), int(m.rejected), m)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"the gateway died (exit {self.proc.returncode}):\n"
                               + self.log_tail())

    async def stop(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.exit_code = proc.returncode


class ReferenceProcess:
    """``python -m bench.reference KIND`` as a child process streaming its counts."""

    def __init__(self, kind: str, mqtt_port: int, database_url: str, workdir: Path) -> None:
        self.kind = kind
        self.name = REFERENCE_NAMES[kind]
        self.writes = kind == "baseline"
        self.mqtt_port = mqtt_port
        self.database_url = database_url
        self.log_path = workdir / f"{kind}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.handled = 0
        self.applied = 0
        self.result: dict[str, Any] | None = None
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        with self.log_path.open("wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.reference", self.kind,
                "--port", str(self.mqtt_port), "--database-url", self.database_url,
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
            )
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not subscribe:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line.startswith("p "):
                _, handled, applied = line.split()
                self.handled, self.applied = int(handled), int(applied)
            elif line == "ready":
                self._ready.set()
            elif line.startswith("result "):
                self.result = json.loads(line[len("result "):])

    async def counters(self) -> Counters:
        return Counters(self.handled, self.applied)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} died:\n{self.log_tail()}")

    async def stop(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, ValueError):
                await asyncio.wait_for(self._reader, 5)


Subject = GatewayProcess | ReferenceProcess


# ---- PostgreSQL -------------------------------------------------------------------------


async def pg_backend_pids(conn: asyncpg.Connection) -> list[int]:
    """Backends connected to this database, other than ``conn``'s own."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return [r["pid"] for r in rows]


async def pg_background_pids(conn: asyncpg.Connection) -> list[int]:
    """The server's processes other than client backends (WAL writer, checkpointer,
    background writer, autovacuum, ...): server-wide, not only the bench database's."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'"
    )
    return [r["pid"] for r in rows]


async def pg_busy(conn: asyncpg.Connection) -> int:
    """Other sessions of this database running a statement or inside a transaction."""
    busy: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'"
    )
    return busy


async def ensure_fleet(conn: asyncpg.Connection, serials: Sequence[str]) -> tuple[int, float]:
    """Seed the devices of ``serials`` that are missing; (inserted, seconds)."""
    t0 = time.perf_counter()
    present = await conn.fetchval(
        "SELECT count(*) FROM devices d JOIN device_settings s ON s.device_id = d.id"
        " WHERE d.serial_number BETWEEN $1 AND $2 AND d.deleted_at IS NULL",
        serials[0], serials[-1],
    )
    inserted = 0
    if present != len(serials):
        inserted = await seed_devices(conn, serials)
        await conn.execute("ANALYZE devices")
        await conn.execute("ANALYZE device_settings")
    return inserted, time.perf_counter() - t0


# ---- one load step ----------------------------------------------------------------------


@dataclass(slots=True)
class Step:
    subject: str
    offered: float
    seconds: float  # step length asked for
    kind: str = "step"  # "step" (ladder), "soak" or "overload"
    sent: int = 0
    send_rate: float = 0.0
    processed: int = 0  # gateway: applied + stale + superseded + rejected
    applied: int = 0
    stale: int = 0
    superseded: int = 0
    rejected: int = 0
    rejected_by: dict[str, int] = field(default_factory=dict)  # every reason seen
    overflow: int = 0  # rejected_by["overflow"]: dropped because the buffer was full
    unaccounted: int = 0  # sent - processed when the wait ended (gateway)
    accounted_for: bool = False  # processed == sent when the wait ended
    drain_seconds: float | None = None  # after the last send until processed == sent
    max_drain: float = 0.0  # how long it waited for that at most
    capacity: float = 0.0  # processed / (step start .. processed == sent or gave up)
    max_backlog: int = 0  # sent - processed, sampled every 0.25 s
    max_depth: int | None = None  # the gateway's inbox depth, sampled
    lag_p50: float | None = None
    lag_p99: float | None = None
    lag_le_250ms: float | None = None  # fraction of heartbeats with lag <= 250 ms
    checked: int = 0  # devices verified in PostgreSQL
    mismatches: int = 0
    mismatch_examples: list[str] = field(default_factory=list)
    cpu_ms_per_1k: float | None = None  # the subject (the gateway: all its processes)
    broker_ms_per_1k: float | None = None
    pg_ms_per_1k: float | None = None  # backends connected to the bench database
    pg_background_ms_per_1k: float | None = None  # server-wide, not in all_ms_per_1k
    loadgen_ms_per_1k: float | None = None  # this process
    all_ms_per_1k: float | None = None  # subject + broker + PG backends + load generator
    # Per process: "gateway" or "supervisor", "worker 1", ...; None: it was not there
    # from start to end (a restarted worker), its CPU is missing from the sums.
    cpu_by_process: dict[str, float | None] = field(default_factory=dict)
    rss_start: float | None = None  # the gateway's, all its processes together
    rss_end: float | None = None
    rss_max: float | None = None
    rss_by_minute: list[float] = field(default_factory=list)  # at each whole minute
    rss_by_process: dict[str, list[float]] = field(default_factory=dict)  # [end, max]
    worker_restarts: int = 0
    probe: dict[str, Any] | None = None  # --overload: bench.rpc.ProbeResult
    kept_up: bool = False
    zero_loss: bool = False
    sustained: bool = False
    note: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.serials = make_serials(args.devices)
        self.gen = LoadGen("127.0.0.1", 1, self.serials, connections=args.connections)
        self.db: asyncpg.Connection | None = None
        self.rng = random.Random(args.seed)
        # (perf_counter, MiB of all the gateway's processes, MiB of each)
        self.rss: list[tuple[float, float, dict[str, float]]] = []
        self.api_key: str | None = None

    async def sample_rss(self, gw: GatewayProcess) -> None:
        while True:
            each = {name: proc_rss_mb(pid) for name, pid in gw.processes().items()}
            known = {name: mb for name, mb in each.items() if mb is not None}
            if not known:
                return
            self.rss.append((time.perf_counter(), sum(known.values()), known))
            await asyncio.sleep(self.args.rss_interval)

    def rss_between(self, t0: float, t1: float) -> list[float]:
        return [mb for t, mb, _ in self.rss if t0 <= t <= t1]

    def rss_by_process(self, t0: float, t1: float) -> dict[str, list[float]]:
        """{process: [MiB at the end, max MiB]} between t0 and t1."""
        out: dict[str, list[float]] = {}
        for t, _, each in self.rss:
            if t0 <= t <= t1:
                for name, mb in each.items():
                    end_max = out.setdefault(name, [mb, mb])
                    end_max[0], end_max[1] = mb, max(end_max[1], mb)
        return out

    async def key(self) -> str:
        """An API key with the scope devices:read (made once)."""
        if self.api_key is None:
            out = await run_command("apikey", "create", "--scope", "devices:read", "--name",
                                    "bench", database_url=self.args.database_url)
            self.api_key = out.strip().splitlines()[-1]
        return self.api_key

    async def verify(self, since_ms: int, sample: int) -> tuple[int, list[str]]:
        """Check a sample (0: all) of the devices sent a heartbeat at or after
        ``since_ms``; (devices checked, mismatch descriptions). Only devices of the step
        just run: the load generator's memory also holds what went to the ceiling."""
        assert self.db is not None
        ts, battery = self.gen.last_sent_arrays()
        floor = max(since_ms, 1)
        touched = [i for i, t in enumerate(ts) if t >= floor]
        if sample and sample < len(touched):
            touched = self.rng.sample(touched, sample)
        expected = {
            self.serials[i]: {"ts": ts[i], "battery_percent": battery[i]} for i in touched
        }
        mismatches = await verify_zero_loss(self.db, expected)
        return len(expected), [
            f"{m.serial}: {m.reason} (sent ts {m.expected_ts} battery {m.expected_battery},"
            f" stored ts {m.stored_ts} battery {m.stored_battery})"
            for m in mismatches
        ]

    async def settle(self, gw: GatewayProcess, limit: float = 120.0) -> float:
        """Wait (up to ``limit`` s) until the gateway has nothing buffered and no statement
        in PostgreSQL, twice 0.1 s apart, so that a step starts from an idle gateway
        even after one that left a backlog; returns the seconds waited."""
        assert self.db is not None
        t0 = time.perf_counter()
        idle = 0
        while idle < 2 and time.perf_counter() - t0 < limit:
            m = await gw.metrics()
            idle = idle + 1 if m.inbox_depth == 0 and await pg_busy(self.db) == 0 else 0
            if idle < 2:
                await asyncio.sleep(0.1)
        return time.perf_counter() - t0

    async def idle(self, gw: GatewayProcess) -> bool:
        """True when the gateway holds nothing, twice 0.1 s apart: nothing buffered and
        nothing received unacknowledged. Counting alone is not enough after a reconnect
        of the heartbeat connection: the broker then delivers again what was not
        acknowledged, and those copies (found stale) count as handled heartbeats while
        the last ones sent may still be on their way."""
        for check in range(2):
            m = await gw.metrics()
            if m.inbox_depth or m.unacknowledged:
                return False
            if not check:
                await asyncio.sleep(0.1)
        return True

    async def step(
        self,
        subject: Subject,
        broker: TunedMosquitto,
        rate: float,
        seconds: float,
        *,
        verify_sample: int,
        max_drain: float,
        kind: str = "step",
        probe: bool = False,
    ) -> Step:
        """Offer ``rate`` heartbeats/s for ``seconds``, wait (up to ``max_drain`` s after
        the last send) until every one was handled, then measure and check. ``probe``:
        also send a GET every PROBE_INTERVAL s from the start until that wait ended."""
        args, gen = self.args, self.gen
        result = Step(subject.name, rate, seconds, kind=kind, max_drain=max_drain)
        assert broker.proc is not None and self.db is not None
        is_gateway = isinstance(subject, GatewayProcess)
        if isinstance(subject, GatewayProcess):
            waited = await self.settle(subject)
            if waited > 1:
                result.note += f"waited {waited:.0f} s for the previous backlog; "
                log(f"{subject.name}: waited {waited:.1f} s for the previous backlog")
            pids = subject.processes(refresh=True)
        else:
            pids = {subject.name: subject.pid}
        probe_stop = asyncio.Event()
        probe_task: asyncio.Task[ProbeResult] | None = None
        if probe:
            key = await self.key()
            picks = [device_id(s) for s in self.rng.sample(self.serials,
                                                           min(len(self.serials), 10_000))]
            started = asyncio.Event()
            probe_task = asyncio.create_task(run_probe(
                "127.0.0.1", broker.port, key, picks, stop=probe_stop, started=started,
                interval=PROBE_INTERVAL, timeout=TARGET_PROBE_TIMEOUT, seed=args.seed))
            subscribed = asyncio.create_task(started.wait())
            await asyncio.wait([probe_task, subscribed], return_when=asyncio.FIRST_COMPLETED)
            subscribed.cancel()
            if probe_task.done():
                probe_task.result()  # raises what stopped it
        gen.port = broker.port
        c0 = await subject.counters()
        broker_pid = broker.proc.pid
        pg0 = {pid: proc_cpu(pid) or 0.0 for pid in await pg_backend_pids(self.db)}
        bg0 = {pid: proc_cpu(pid) or 0.0 for pid in await pg_background_pids(self.db)}
        subject0, broker0 = cpu_of(pids), proc_cpu(broker_pid)
        since_ms = time.time_ns() // 1_000_000
        t0 = time.perf_counter()
        sampling = True

        async def sampler() -> None:
            while sampling:
                await asyncio.sleep(0.25)  # gen.sent_in_run is the last run's until it starts
                try:
                    c = await subject.counters()
                except (OSError, TimeoutError):  # a slow /metrics: the next one will do
                    continue
                backlog = gen.sent_in_run - (c.processed - c0.processed)
                result.max_backlog = max(result.max_backlog, backlog)
                if c.depth is not None:
                    result.max_depth = max(result.max_depth or 0, c.depth)

        watcher = asyncio.create_task(sampler())
        try:
            load = await gen.run(rate=rate, duration=seconds)
            t_sent = time.perf_counter()
            result.sent = load.sent
            result.send_rate = load.rate
            if load.acked != load.sent:
                result.note += f"broker acked {load.acked:,} of {load.sent:,}; "
            # Wait until everything sent was handled (the gateway: applied, found stale,
            # superseded by a newer heartbeat of its device, or rejected), or give up
            # after max_drain, or (the gateway) when nothing moves for STALL_SECONDS with
            # nothing buffered and nothing running in PostgreSQL: the rest never arrived.
            done_at = None
            progress, progress_at = -1, t_sent
            while True:
                try:
                    c = await subject.counters()
                except (OSError, TimeoutError):
                    subject.check_alive()
                    continue
                now = time.perf_counter()
                if c.processed - c0.processed >= load.sent and (
                        not isinstance(subject, GatewayProcess) or await self.idle(subject)):
                    done_at = now
                    break
                if c.processed != progress:
                    progress, progress_at = c.processed, now
                elif (is_gateway and now - progress_at > STALL_SECONDS and not c.depth
                        and await pg_busy(self.db) == 0):
                    result.note += (f"nothing handled for {STALL_SECONDS:g} s with nothing "
                                    "buffered: gave up waiting; ")
                    break
                subject.check_alive()
                if now - t_sent > max_drain:
                    break
                await asyncio.sleep(0.05)
        finally:
            sampling = False
            await watcher
            probe_stop.set()
            if probe_task is not None:
                result.probe = (await probe_task).as_dict()
        t1 = time.perf_counter()
        c1 = await subject.counters()
        subject1, broker1 = cpu_of(pids), proc_cpu(broker_pid)
        # Backends that closed during the step are missed; new ones count from their start.
        pg_cpu = sum(
            (proc_cpu(pid) or 0.0) - pg0.get(pid, 0.0) for pid in await pg_backend_pids(self.db)
        )
        bg_cpu = sum((proc_cpu(pid) or 0.0) - bg0.get(pid, 0.0)
                     for pid in await pg_background_pids(self.db))
        result.processed = c1.processed - c0.processed
        result.applied = c1.applied - c0.applied
        result.rejected = c1.rejected - c0.rejected
        m0, m1 = c0.metrics, c1.metrics
        if m0 is not None and m1 is not None:
            result.stale = int(m1.stale - m0.stale)
            result.superseded = int(m1.superseded - m0.superseded)
            result.rejected_by = {
                reason: int(v - m0.rejected_by.get(reason, 0.0))
                for reason, v in sorted(m1.rejected_by.items())
                if v - m0.rejected_by.get(reason, 0.0)
            }
            result.overflow = int(m1.overflow - m0.overflow)
            extra = int(m1.received - m0.received) - result.sent
            if extra > 0:
                result.note += (f"the broker delivered {extra:,} more than were sent (again, "
                                "after a reconnect of the heartbeat connection); ")
            result.worker_restarts = int(m1.worker_restarts - m0.worker_restarts)
            if result.worker_restarts:
                result.note += f"{result.worker_restarts} worker restarts; "
        result.unaccounted = result.sent - result.processed
        result.accounted_for = result.processed == result.sent
        if done_at is not None:
            result.drain_seconds = max(0.0, done_at - t_sent)
        # Heartbeats taken care of per second from the step's start until the backlog was
        # gone (or, if it never was, a lower bound from what was handled).
        result.capacity = (result.sent if done_at is not None else result.processed) / (
            (done_at or t1) - t0
        )
        per_1k = 1000 / max(result.processed, 1)
        pids_after = subject.processes() if isinstance(subject, GatewayProcess) else pids
        for name, cpu0 in subject0.items():
            cpu1 = subject1.get(name)
            same = pids_after.get(name) == pids[name]  # not a restarted worker
            result.cpu_by_process[name] = (
                (cpu1 - cpu0) * 1000 * per_1k
                if cpu0 is not None and cpu1 is not None and same else None)
        known = [v for v in result.cpu_by_process.values() if v is not None]
        if known:
            result.cpu_ms_per_1k = sum(known)
        if broker0 is not None and broker1 is not None:
            result.broker_ms_per_1k = (broker1 - broker0) * 1000 * per_1k
        if subject.writes:
            result.pg_ms_per_1k = pg_cpu * 1000 * per_1k
            result.pg_background_ms_per_1k = bg_cpu * 1000 * per_1k
        # The load generator is this process: with --overload its figure includes the
        # request probe's (10 requests/s).
        result.loadgen_ms_per_1k = load.cpu_ms_per_1000
        parts = [result.cpu_ms_per_1k, result.broker_ms_per_1k, result.loadgen_ms_per_1k]
        if subject.writes:
            parts.append(result.pg_ms_per_1k)
        if all(v is not None for v in parts):
            result.all_ms_per_1k = sum(v for v in parts if v is not None)
        if m0 is not None and m1 is not None:
            before, after = m0.lag_buckets, m1.lag_buckets
            result.lag_p50 = histogram_quantile(before, after, 0.50)
            result.lag_p99 = histogram_quantile(before, after, 0.99)
            result.lag_le_250ms = histogram_fraction_le(before, after, 0.25)
        if is_gateway:
            rss = self.rss_between(t0, t1)
            if rss:
                result.rss_start, result.rss_end, result.rss_max = rss[0], rss[-1], max(rss)
                for minute in range(1, int((t1 - t0) // 60) + 1):
                    upto = self.rss_between(t0, t0 + 60 * minute)
                    if upto:
                        result.rss_by_minute.append(upto[-1])
            result.rss_by_process = self.rss_by_process(t0, t1)
        result.kept_up = (
            result.drain_seconds is not None and result.drain_seconds <= args.grace
        )
        if subject.writes:
            result.checked, examples = await self.verify(since_ms, verify_sample)
            result.mismatches = len(examples)
            result.mismatch_examples = examples[:5]
        # Loss: a rejection, a stored state that is not the last one sent, or a heartbeat
        # not accounted for (the gateway: applied + stale + superseded != sent; the
        # references: a message never received).
        if is_gateway:
            result.zero_loss = (
                result.rejected == 0 and result.mismatches == 0
                and result.applied + result.stale + result.superseded == result.sent
            )
        else:
            result.zero_loss = result.rejected == 0 and result.mismatches == 0 and (
                subject.writes or result.processed == result.sent
            )
        # Sustained: kept up, lost nothing, and every heartbeat applied on its own.
        result.sustained = (
            result.kept_up and result.zero_loss and result.applied == result.sent
        )
        return result


# ---- phases -----------------------------------------------------------------------------


def max_drain(args: argparse.Namespace, kind: str) -> float:
    """How long to wait for a backlog after the last send: --max-drain, or by default
    MAX_DRAIN_STEP after a ladder step, MAX_DRAIN_SOAK after a soak, MAX_DRAIN_OVERLOAD
    with --overload."""
    if args.max_drain is not None:
        return float(args.max_drain)
    return {"step": MAX_DRAIN_STEP, "soak": MAX_DRAIN_SOAK}.get(kind, MAX_DRAIN_OVERLOAD)


def step_line(s: Step) -> str:
    drain = f"{s.drain_seconds:.1f}s" if s.drain_seconds is not None else "no"
    lag = (f", lag p50 {fmt_ms(s.lag_p50)} p99 {fmt_ms(s.lag_p99)}"
           if s.lag_p99 is not None else "")
    rejected = f", rejected {s.rejected_by}" if s.rejected else ""
    return (f"{s.subject}: {s.offered:,.0f}/s offered, {s.sent:,} sent at {s.send_rate:,.0f}/s,"
            f" {s.processed:,} processed, drained {drain}, backlog max {s.max_backlog:,}{lag},"
            f" checked {s.checked:,} ({s.mismatches} mismatches){rejected}"
            f" -> {'sustained' if s.sustained else 'NOT sustained'}"
            f"{'' if s.zero_loss else ', LOSS'}")


async def run_command(*argv: str, database_url: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *argv, "--database-url", database_url,
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"gateway {' '.join(argv)} failed ({proc.returncode}): "
                           f"{err.decode(errors='replace')}")
    return out.decode()


async def run_all(bench: Bench, results: dict[str, Any]) -> None:
    """Start the gateway and the references, each on a broker of its own, run the
    ladder interleaved (each rate for every subject still standing, so that the
    comparisons come from the same minutes of a shared machine), then stop the
    references and soak the gateway and measure request/reply."""
    args = bench.args
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    async with contextlib.AsyncExitStack() as stack:
        # The broker queues what the gateway has not taken yet (its intake pauses while its
        # buffer is full) and drops, silently, past max_queued_messages: with --overload,
        # room for everything the run sends, so that a drop is the gateway's doing.
        queued = 1_000_000
        if args.overload:
            queued = max(queued, int(args.soak_rate * args.duration * 1.1))
        broker = await stack.enter_async_context(TunedMosquitto(max_queued_messages=queued))
        gw = GatewayProcess(broker.port, args.database_url, bench.workdir,
                            args.gateway_pg_setting, args.gateway_env,
                            workers=args.gateway_workers,
                            offline_after=ONLINE_FOR_SECONDS if args.fleet == "online" else None)
        rss_task: asyncio.Task[None] | None = None

        async def stop_gateway() -> None:
            if rss_task is not None:
                rss_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rss_task
            await gw.stop()
            results["gateway_exit_code"] = gw.exit_code
            if gw.exit_code not in (0, None):
                log(f"gateway exited with {gw.exit_code}:\n{gw.log_tail()}")

        stack.push_async_callback(stop_gateway)
        await gw.start()
        rss_task = asyncio.create_task(bench.sample_rss(gw))
        processes = gw.processes()
        log(f"gateway healthy (broker :{broker.port}, metrics :{gw.metrics_port}): "
            + ", ".join(f"{name} pid {pid} RSS {proc_rss_mb(pid) or 0:.0f} MiB"
                        for name, pid in processes.items()))
        results["gateway_pid"] = gw.pid
        results["gateway_processes"] = processes
        m0 = await gw.metrics()
        t_start = time.perf_counter()

        standing: list[tuple[Subject, TunedMosquitto]] = [(gw, broker)]
        refs: list[ReferenceProcess] = []
        async with contextlib.AsyncExitStack() as ref_stack:
            if args.references and rates:
                for kind in REFERENCE_NAMES:
                    ref_broker = await ref_stack.enter_async_context(TunedMosquitto())
                    ref = ReferenceProcess(kind, ref_broker.port, args.database_url,
                                           bench.workdir)
                    ref_stack.push_async_callback(ref.stop)
                    await ref.start()
                    log(f"{ref.name}: pid {ref.pid} subscribed (broker :{ref_broker.port})")
                    refs.append(ref)
                    standing.append((ref, ref_broker))
            ladders: dict[str, list[Step]] = {s.name: [] for s, _ in standing}
            for rate in rates:
                for subject, subject_broker in list(standing):
                    s = await bench.step(subject, subject_broker, rate, args.step_seconds,
                                         verify_sample=args.step_verify_sample,
                                         max_drain=max_drain(args, "step"))
                    ladders[subject.name].append(s)
                    log(step_line(s))
                    if not s.sustained:
                        standing.remove((subject, subject_broker))
                        if isinstance(subject, ReferenceProcess):
                            # Whatever backlog it still has must not compete with the
                            # subjects still standing.
                            await subject.stop()
                if not standing:
                    break
        # The references are stopped: the soak and request/reply have the machine.
        steps = ladders["gateway"]
        results["ladder"] = [asdict(s) for s in steps]
        results["references"] = {ref.kind: [asdict(s) for s in ladders[ref.name]]
                                 for ref in refs}
        passed = [s.offered for s in steps if s.sustained]

        soak_rate = args.soak_rate
        if soak_rate is None:
            soak_rate = TARGET_RATE
            if steps and (not passed or max(passed) < TARGET_RATE):
                soak_rate = max(passed) if passed else min(rates)
        # A short ladder step can pass while the backlog creeps up; the soak is the
        # long-run check. If it fails, try the next lower rate the ladder sustained.
        soaks: list[Step] = []
        if args.overload and args.duration > 0:
            # Beyond what the gateway can apply: not expected to keep up, only to lose
            # nothing, stay bounded in memory and keep answering requests.
            log(f"overload: {args.soak_rate:,.0f}/s for {args.duration:g} s, then up to "
                f"{max_drain(args, 'overload'):g} s to drain, a GET every "
                f"{PROBE_INTERVAL * 1000:.0f} ms throughout")
            over = await bench.step(gw, broker, args.soak_rate, args.duration,
                                    verify_sample=args.verify_sample,
                                    max_drain=max_drain(args, "overload"), kind="overload",
                                    probe=True)
            over.subject = "gateway overload"
            log(step_line(over))
            results["overload"] = asdict(over)
        while args.duration > 0 and not args.overload and len(soaks) < args.soak_attempts:
            log(f"soak: {soak_rate:,.0f}/s for {args.duration:g} s")
            soak = await bench.step(gw, broker, soak_rate, args.duration,
                                    verify_sample=args.verify_sample,
                                    max_drain=max_drain(args, "soak"), kind="soak")
            soak.subject = "gateway soak"
            soaks.append(soak)
            log(step_line(soak))
            lower = [r for r in passed if r < soak_rate]
            if soak.sustained or args.soak_rate is not None or not lower:
                break
            soak_rate = max(lower)
        results["soaks"] = [asdict(s) for s in soaks]
        results["soak"] = results["soaks"][-1] if soaks else None

        if args.rpc_seconds > 0:
            results["rpc"] = await rpc_phase(bench, gw, broker)
        m1 = await gw.metrics()
        t_end = time.perf_counter()
        rss_all = bench.rss_between(t_start, t_end)
        results["gateway_totals"] = {
            "received": m1.received - m0.received,
            "applied": m1.applied - m0.applied,
            "stale": m1.stale - m0.stale,
            "superseded": m1.superseded - m0.superseded,
            "worker_restarts": m1.worker_restarts - m0.worker_restarts,
            "scrape_gaps": gw.scrape_gaps,
            "rejected": {k: v - m0.rejected_by.get(k, 0.0) for k, v in m1.rejected_by.items()
                         if v - m0.rejected_by.get(k, 0.0)},
            "minutes": (t_end - t_start) / 60,
            "rss_start": rss_all[0] if rss_all else None,
            "rss_end": rss_all[-1] if rss_all else None,
            "rss_max": max(rss_all) if rss_all else None,
        }


async def rpc_phase(bench: Bench, gw: GatewayProcess, broker: TunedMosquitto) -> dict[str, Any]:
    args = bench.args
    assert bench.db is not None
    key = await bench.key()
    picks = [device_id(s) for s in bench.rng.sample(bench.serials,
                                                    min(len(bench.serials), 100_000))]
    pg0 = {pid: proc_cpu(pid) or 0.0 for pid in await pg_backend_pids(bench.db)}
    pids = gw.processes(refresh=True)
    cpu0 = cpu_of(pids)
    assert broker.proc is not None
    broker_pid = broker.proc.pid
    broker0 = proc_cpu(broker_pid) or 0.0
    rpc = await run_rpc("127.0.0.1", broker.port, key, picks, in_flight=args.rpc_in_flight,
                        duration=args.rpc_seconds, warmup=args.rpc_warmup)
    cpu1 = cpu_of(pids)
    broker_cpu = (proc_cpu(broker_pid) or 0.0) - broker0
    gw_cpu = [(cpu1[name] or 0.0) - before for name, before in cpu0.items()
              if before is not None and cpu1[name] is not None]
    pg_cpu = sum((proc_cpu(pid) or 0.0) - pg0.get(pid, 0.0)
                 for pid in await pg_backend_pids(bench.db))
    log(rpc.summary())
    # CPU over warm-up + window, per request answered in the window (close enough: the
    # warm-up is short and runs at the same rate).
    answered = max(rpc.completed, 1) * (1 + args.rpc_warmup / max(rpc.seconds, 1e-9))
    return rpc.as_dict() | {
        "gateway_cpu_ms_per_request": sum(gw_cpu) * 1000 / answered if gw_cpu else None,
        "pg_cpu_ms_per_request": pg_cpu * 1000 / answered,
        "broker_cpu_ms_per_request": broker_cpu * 1000 / answered,
    }


async def bench_main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"args": vars(args), "environment": environment()}
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        workdir = Path(tmp)
        log(f"migrating {args.database_url}")
        await run_command("db", "migrate", database_url=args.database_url)
        bench = Bench(args, workdir)
        bench.db = await asyncpg.connect(args.database_url)
        try:
            server = await bench.db.fetchval("SHOW server_version")
            autovacuum = await bench.db.fetchval("SHOW autovacuum")
            results["environment"]["postgresql"] = (
                f"{str(server).split()[0]} (autovacuum {autovacuum})")
            inserted, took = await ensure_fleet(bench.db, bench.serials)
            log(f"fleet: {args.devices:,} devices ({inserted:,} seeded now) in {took:.1f} s")
            t0 = time.perf_counter()
            changed = await set_presence(bench.db, bench.serials, args.fleet)
            log(f"fleet presence at the start: {args.fleet} ({changed:,} devices set so in "
                f"{time.perf_counter() - t0:.1f} s)")
            t0 = time.perf_counter()
            # Every run starts from vacuumed tables, as autovacuum keeps a production
            # database: a cluster with autovacuum off (a CI one) would otherwise carry
            # every earlier run's dead rows into this one's figures.
            for table in VACUUMED:
                await bench.db.execute(f"VACUUM (ANALYZE) {table}")
            log(f"vacuumed {', '.join(VACUUMED)} in {time.perf_counter() - t0:.1f} s")
            results["seed"] = {"inserted": inserted, "seconds": took,
                               "presence": args.fleet, "presence_changed": changed}
            await run_all(bench, results)
        finally:
            await bench.db.close()
    return results


# ---- the report -------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    def run_text(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosq = run_text("/usr/sbin/mosquitto", "-h").splitlines()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "loadavg": os.getloadavg(),
        "python": sys.version.split()[0],
        "mosquitto": mosq[0].split("version")[-1].strip() if mosq else "?",
        "postgresql": "?",  # the server's, filled in once connected
        **{name: version(name) for name in ("aiomqtt", "paho-mqtt", "msgspec", "asyncpg",
                                            "uvloop")},
    }


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def fmt_num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def sustained_rate(steps: Sequence[dict[str, Any]]) -> tuple[float | None, bool]:
    """(highest sustained offered rate, whether a higher rate failed: False means the
    subject sustained every rate tried, so the figure is a lower bound)."""
    passed = [s["offered"] for s in steps if s["sustained"]]
    failed = any(not s["sustained"] for s in steps)
    return (max(passed) if passed else None), failed


def overloaded(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The first step not sustained: its ``capacity`` is the throughput while overloaded."""
    failed = [s for s in steps if not s["sustained"]]
    return failed[0] if failed else None


def subjects(results: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    out: list[tuple[str, list[dict[str, Any]]]] = [("gateway", results.get("ladder", []))]
    for kind, steps in results.get("references", {}).items():
        out.append((REFERENCE_NAMES.get(kind, kind), steps))
    return out


def gateway_sustained(results: dict[str, Any]) -> tuple[float | None, bool]:
    """The gateway's sustained rate: the highest rate a ladder step or a soak sustained,
    below any rate a soak failed at (the long run overrules a short step); and whether
    a higher rate failed (False: a lower bound)."""
    tries = results.get("ladder", []) + (results.get("soaks") or [])
    failed = [s["offered"] for s in tries if not s["sustained"]]
    soak_failed = [s["offered"] for s in results.get("soaks") or [] if not s["sustained"]]
    ok = [s["offered"] for s in tries if s["sustained"]
          and (not soak_failed or s["offered"] < min(soak_failed))]
    if not ok:
        return None, bool(failed)
    rate = max(ok)
    return rate, any(r > rate for r in failed)


def cpu_rows(s: dict[str, Any]) -> list[list[str]]:
    """CPU ms per 1,000 heartbeats of a step: the sums, then per gateway process."""
    rows = [["CPU ms per 1,000 heartbeats",
             f"all {fmt_num(s.get('all_ms_per_1k'))}: gateway {fmt_num(s['cpu_ms_per_1k'])}, "
             f"mosquitto {fmt_num(s['broker_ms_per_1k'])}, PostgreSQL backends "
             f"{fmt_num(s['pg_ms_per_1k'])}, load generator {fmt_num(s['loadgen_ms_per_1k'])}"]]
    by = s.get("cpu_by_process") or {}
    if len(by) > 1:
        rows.append(["  gateway, per process",
                     ", ".join(f"{name} {fmt_num(v)}" for name, v in by.items())])
    rows.append(["  PostgreSQL server processes",
                 f"{fmt_num(s.get('pg_background_ms_per_1k'))} (WAL writer, checkpointer, "
                 "autovacuum...: server-wide, not in 'all')"])
    return rows


def handled_rows(s: dict[str, Any], totals: dict[str, Any]) -> list[list[str]]:
    """The table of a soak or an overload run."""
    reasons = s.get("rejected_by") or {}
    others = ", ".join(f"{k} {v:,}" for k, v in reasons.items() if k != "overflow") or "none"
    drained = (f"drained {s['drain_seconds']:.1f} s after the last send"
               if s["drain_seconds"] is not None
               else f"NOT drained within {s['max_drain']:g} s")
    rss_procs = s.get("rss_by_process") or {}
    rows = [
        ["heartbeats sent / handled", f"{s['sent']:,} / {s['processed']:,} (sent at "
         f"{s['send_rate']:,.0f}/s): applied {s['applied']:,}, stale {s['stale']:,}, "
         f"superseded {s['superseded']:,}, rejected {s['rejected']:,}; not accounted for "
         f"{s['unaccounted']:,}"],
        ["rejected, by reason", f"overflow {s['overflow']:,}; other reasons: {others}"],
        ["backlog", f"{drained}; max {s['max_backlog']:,} (sent - handled), inbox depth max "
         f"{fmt_num(s['max_depth'])}; handled {s['capacity']:,.0f}/s from the start"],
        ["zero loss in PostgreSQL", f"{s['checked']:,} devices checked, "
         f"{s['mismatches']} not at the last heartbeat sent"],
        ["receive-to-commit lag", f"p50 {fmt_ms(s['lag_p50'])}, p99 "
         f"{fmt_ms(s['lag_p99'])}; {100 * (s['lag_le_250ms'] or 0):.2f}% <= 250 ms"],
        ["gateway RSS during the run", f"{fmt_num(s['rss_start'])} MiB at start, "
         f"{fmt_num(s['rss_end'])} MiB at end, max {fmt_num(s['rss_max'])} MiB"
         + (f"; after each minute: {', '.join(f'{mb:.0f}' for mb in s['rss_by_minute'])}"
            if len(s.get("rss_by_minute") or []) > 1 else "")
         + ("; at end / max: " + ", ".join(f"{name} {end:.0f} / {top:.0f}"
                                            for name, (end, top) in rss_procs.items())
            if len(rss_procs) > 1 else "")],
        ["gateway RSS, whole run", f"{fmt_num(totals.get('rss_start'))} -> "
         f"{fmt_num(totals.get('rss_end'))} MiB over {totals.get('minutes', 0):.1f} min, "
         f"max {fmt_num(totals.get('rss_max'))} MiB"],
        *cpu_rows(s),
    ]
    probe = s.get("probe")
    if probe:
        statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(probe["statuses"].items()))
        rows.append([
            "request probe", f"GET /v1/devices/{{id}} every {probe['interval'] * 1000:.0f} ms "
            f"for {probe['seconds']:.1f} s: {probe['sent']:,} sent, {probe['answered']:,} "
            f"answered within {probe['timeout']:g} s (statuses {statuses or 'none'}), "
            f"{probe['timeouts']} timeouts; latency p50 {probe['p50_ms']:.0f} ms, p99 "
            f"{probe['p99_ms']:.0f} ms, max {probe['max_ms']:.0f} ms"])
    if s.get("note"):
        rows.append(["note", s["note"].rstrip("; ")])
    return rows


def losses(results: dict[str, Any]) -> list[str]:
    """What each soak (and the overload run) lost, one line each; empty: nothing."""
    out = []
    runs = list(results.get("soaks") or [])
    if results.get("overload"):
        runs.append(results["overload"])
    for s in runs:
        if s["zero_loss"]:
            continue
        what = []
        if s["rejected"]:
            reasons = ", ".join(f"{k} {v:,}" for k, v in s["rejected_by"].items())
            what.append(f"rejected {s['rejected']:,} ({reasons})")
        if s["mismatches"]:
            what.append(f"{s['mismatches']:,} of {s['checked']:,} devices checked not at the "
                        "last heartbeat sent")
        handled = s["applied"] + s["stale"] + s["superseded"]
        if handled != s["sent"]:
            what.append(f"applied + stale + superseded = {handled:,} of {s['sent']:,} sent"
                        + ("" if s["accounted_for"] else
                           f" ({s['unaccounted']:,} not accounted for after "
                           f"{s['max_drain']:g} s)"))
        name = "overload" if s.get("kind") == "overload" else f"{s['seconds']:g} s soak"
        out.append(f"the {name} at {s['offered']:,.0f}/s: " + "; ".join(what))
    return out


def report(results: dict[str, Any]) -> str:
    env, args = results["environment"], results["args"]
    out: list[str] = [
        f"Gateway throughput benchmark, {env['date']}: {args['devices']:,} devices; "
        f"{env['nproc']} CPUs ({env['cpu']}), {env['mem_gib']} GiB RAM; load average "
        f"{env['loadavg'][0]:.2f} at start",
        f"python {env['python']}, mosquitto {env['mosquitto']}, PostgreSQL "
        f"{env['postgresql']}, aiomqtt {env['aiomqtt']}, paho-mqtt {env['paho-mqtt']}, "
        f"msgspec {env['msgspec']}, asyncpg {env['asyncpg']}, uvloop {env['uvloop']}",
    ]
    if args.get("gateway_pg_setting"):
        out.append("EXPERIMENT: the gateway's PostgreSQL sessions ran with "
                   + ", ".join(args["gateway_pg_setting"]))
    if args.get("gateway_env"):
        out.append("EXPERIMENT: the gateway ran with " + ", ".join(args["gateway_env"]))
    rows = []
    for name, steps in subjects(results):
        if name == "gateway":
            steps = steps + (results.get("soaks") or []) + (
                [results["overload"]] if results.get("overload") else [])
        for s in steps:
            verdict = "yes" if s["sustained"] else "no"
            if not s["zero_loss"]:
                # A step still draining when the wait ended has not lost what it has not
                # handled yet; a soak has (it fails the run).
                verdict = ("no (not drained)" if s["kind"] == "step" and not s["rejected"]
                           and not s["accounted_for"] else "no (LOSS)")
            label = s["subject"]
            if label == "gateway soak":
                label = f"gateway, {s['seconds']:g} s soak"
            elif label == "gateway overload":
                label = f"gateway, {s['seconds']:g} s overload"
            rows.append([
                label, fmt_num(s["offered"]), fmt_num(s["send_rate"]),
                fmt_num(s["sent"]), fmt_num(s["applied"]),
                f"{s['drain_seconds']:.1f} s" if s["drain_seconds"] is not None else "never",
                fmt_num(s["capacity"]), fmt_ms(s["lag_p50"]), fmt_ms(s["lag_p99"]),
                fmt_num(s["cpu_ms_per_1k"]), fmt_num(s["broker_ms_per_1k"]),
                fmt_num(s["pg_ms_per_1k"]), fmt_num(s["loadgen_ms_per_1k"]),
                f"{s['mismatches']}/{s['checked']:,}" if s["checked"] else "-", verdict,
            ])
    if rows:
        out += [
            "",
            f"Ladder: each offered rate for {args['step_seconds']:g} s, stopping at the first "
            f"not sustained (sustained: all applied within {args['grace']:g} s of the last "
            "send, none lost). drained: seconds after the last send until all was processed; "
            "handled/s: sent / (step start .. drained); CPU: ms per 1,000 heartbeats of the "
            "subject, mosquitto, the PostgreSQL backends of the bench database, the load "
            "generator; lost/checked: devices whose stored ts/battery is not the last sent.",
            table(["subject", "offered/s", "sent/s", "sent", "applied", "drained", "handled/s",
                   "lag p50", "lag p99", "CPU", "mosq", "PG", "loadgen", "lost/checked",
                   "sustained"], rows),
        ]

    summary = []
    for name, steps in subjects(results):
        if not steps:
            continue
        rate, exact = sustained_rate(steps)
        if name == "gateway":
            rate, exact = gateway_sustained(results)
        over = overloaded(steps)
        best = [s for s in steps if s["sustained"]]
        summary.append([
            name, ("" if exact else ">= ") + fmt_num(rate),
            f"{over['capacity']:,.0f} at {over['offered']:,.0f}/s offered" if over else "-",
            fmt_num(best[-1]["cpu_ms_per_1k"]) if best else "-",
        ])
    if summary:
        out += ["", "Per subject, same load",
                table(["subject", "sustained/s", "handled/s when overloaded",
                       "CPU ms/1k at best sustained"], summary)]

    soak = results.get("soak")
    totals = results.get("gateway_totals", {})
    if soak:
        verdict = "sustained" if soak["sustained"] else "NOT sustained"
        if not soak["zero_loss"]:
            verdict += ", LOSS"
        earlier = [f"{s['offered']:,.0f}/s NOT sustained"
                   + ("" if s["zero_loss"] else " and LOST heartbeats")
                   for s in results["soaks"][:-1]]
        out += ["", f"Soak: {soak['offered']:,.0f}/s offered for {soak['seconds']:g} s, "
                f"{verdict}" + (f" (after {', '.join(earlier)})" if earlier else ""),
                table(["", ""], handled_rows(soak, totals))]
        if soak["mismatch_examples"]:
            out.append("mismatches, e.g.: " + "; ".join(soak["mismatch_examples"][:3]))
    over = results.get("overload")
    if over:
        verdict = "zero loss" if over["zero_loss"] else "LOSS"
        out += ["", f"Overload: {over['offered']:,.0f}/s offered for {over['seconds']:g} s "
                f"(beyond what the gateway applies; not expected to keep up), then waited up "
                f"to {over['max_drain']:g} s for every heartbeat to be accounted for: "
                f"{verdict}", table(["", ""], handled_rows(over, totals))]
        if over["mismatch_examples"]:
            out.append("mismatches, e.g.: " + "; ".join(over["mismatch_examples"][:3]))
    if totals:
        rejected = ", ".join(f"{k} {v:,.0f}" for k, v in totals["rejected"].items()) or "none"
        out.append(
            f"gateway totals: received {totals['received']:,.0f}, applied "
            f"{totals['applied']:,.0f}, stale {totals['stale']:,.0f}, superseded "
            f"{totals.get('superseded', 0):,.0f}, rejected {rejected}; worker restarts "
            f"{totals.get('worker_restarts', 0):,.0f}; exit code "
            f"{results.get('gateway_exit_code')}"
        )
    for line in results.get("losses") or []:
        out.append(f"LOSS: {line}")

    rpc = results.get("rpc")
    if rpc:
        statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(rpc["statuses"].items()))
        out += ["", (
            f"Request/reply: GET /v1/devices/{{id}}, {rpc['in_flight']} in flight for "
            f"{rpc['seconds']:.1f} s: {rpc['rate']:,.0f} requests/s, latency p50 "
            f"{rpc['p50_ms']:.1f} ms, p99 {rpc['p99_ms']:.1f} ms, max {rpc['max_ms']:.1f} ms "
            f"(statuses {statuses}; {rpc['timeouts']} timeouts); CPU per request: gateway "
            f"{fmt_num(rpc['gateway_cpu_ms_per_request'], 2)} ms, PostgreSQL backends "
            f"{fmt_num(rpc['pg_cpu_ms_per_request'], 2)} ms, mosquitto "
            f"{fmt_num(rpc.get('broker_cpu_ms_per_request'), 2)} ms, client "
            f"{rpc['cpu_seconds'] * 1000 / max(rpc['completed'], 1):.2f} ms"
        )]

    out += ["", targets_table(results)]
    return "\n".join(out)


def targets_table(results: dict[str, Any]) -> str:
    args = results["args"]
    soak = results.get("soak")
    refs = results.get("references", {})
    rows: list[list[str]] = []

    def add(target: str, measured: str, ratio: float | None, met: bool | None) -> None:
        rows.append([target, measured, "-" if ratio is None else f"{ratio:.2f}",
                     "?" if met is None else ("yes" if met else "NO")])

    gw_rate, gw_exact = gateway_sustained(results)
    ge = "" if gw_exact else ">="
    if gw_rate is not None or soak:
        fleet = args["devices"] >= TARGET_DEVICES
        add(f"sustained >= {TARGET_RATE:,}/s, zero loss, {TARGET_DEVICES:,} devices",
            f"{ge}{fmt_num(gw_rate)}/s with {args['devices']:,} devices",
            None if gw_rate is None else gw_rate / TARGET_RATE,
            gw_rate is not None and gw_rate >= TARGET_RATE and fleet)
    if soak and soak["lag_p99"] is not None:
        add(f"p99 lag <= {TARGET_LAG_P99 * 1000:.0f} ms at {TARGET_RATE:,}/s",
            f"{fmt_ms(soak['lag_p99'])} at {soak['offered']:,.0f}/s",
            soak["lag_p99"] / TARGET_LAG_P99,
            soak["lag_p99"] <= TARGET_LAG_P99 and soak["offered"] >= TARGET_RATE)
    gw_over = overloaded(results.get("ladder", []))
    for kind, target, better in (("ceiling", TARGET_CEILING_RATIO, ">= {t:g} of the"),
                                 ("ceiling-drain", TARGET_CEILING_RATIO, ">= {t:g} of the"),
                                 ("baseline", TARGET_BASELINE_RATIO, ">= {t:g}x the")):
        steps = refs.get(kind)
        if not steps:
            continue
        ref_rate, ref_exact = sustained_rate(steps)
        ref_over = overloaded(steps)
        parts, ratio = [], None
        if gw_rate is not None and ref_rate is not None:
            ratio = gw_rate / ref_rate
            parts.append(f"sustained {ge}{gw_rate:,.0f} vs "
                         f"{'' if ref_exact else '>='}{ref_rate:,.0f}/s = {ratio:.2f}")
        if gw_over and ref_over:
            over_ratio = gw_over["capacity"] / ref_over["capacity"]
            parts.append(f"overloaded {gw_over['capacity']:,.0f} vs "
                         f"{ref_over['capacity']:,.0f}/s = {over_ratio:.2f}")
            if ratio is None:
                ratio = over_ratio
        elif gw_rate is not None and ref_rate is None and ref_over:
            # The reference sustained no rate of the ladder: compare with what it handled.
            ratio = gw_rate / ref_over["capacity"]
            parts.append(f"sustained {ge}{gw_rate:,.0f} vs {ref_over['capacity']:,.0f}/s "
                         f"handled overloaded = {ratio:.2f}")
        # An inexact comparison (a side sustained every rate tried) can only fail safely
        # one way.
        met: bool | None = None if ratio is None else ratio >= target
        if ratio is not None and not gw_exact and ratio < target:
            met = None
        if ratio is not None and ref_rate is not None and not ref_exact and ratio >= target:
            met = None
        add(f"{better.format(t=target)} {REFERENCE_NAMES[kind]}", "; ".join(parts) or "-",
            None if ratio is None else ratio / target, met)
    totals = results.get("gateway_totals")
    if totals and totals.get("rss_max") is not None:
        minutes = totals["minutes"]
        long_enough = minutes >= TARGET_RSS_MINUTES
        soak_growth = (f", {soak['rss_end'] - soak['rss_start']:+.0f} MiB over the soak"
                       if soak and soak["rss_start"] is not None else "")
        add(f"RSS <= {TARGET_RSS_MB:.0f} MB, flat over {TARGET_RSS_MINUTES:g} min",
            f"max {totals['rss_max']:.0f} MiB over {minutes:.1f} min{soak_growth}"
            + ("" if long_enough else " (run shorter than 5 min)"),
            totals["rss_max"] / TARGET_RSS_MB,
            (totals["rss_max"] <= TARGET_RSS_MB) if long_enough else None)
    rpc = results.get("rpc")
    if rpc:
        # The targets are for GET /v1/devices/{id} with auth at 64 in flight.
        fits = rpc["in_flight"] == TARGET_RPC_IN_FLIGHT
        how = f" ({rpc['in_flight']} in flight)" if not fits else ""
        add(f"request/reply >= {TARGET_RPC_RATE:,.0f}/s (GET /v1/devices/{{id}}, auth, "
            f"{TARGET_RPC_IN_FLIGHT} in flight)", f"{rpc['rate']:,.0f}/s{how}",
            rpc["rate"] / TARGET_RPC_RATE, rpc["rate"] >= TARGET_RPC_RATE if fits else None)
        add(f"request/reply p99 <= {TARGET_RPC_P99_MS:.0f} ms", f"{rpc['p99_ms']:.1f} ms{how}",
            rpc["p99_ms"] / TARGET_RPC_P99_MS,
            rpc["p99_ms"] <= TARGET_RPC_P99_MS if fits else None)
    if soak:
        at = f" at {soak['offered']:,.0f}/s soak"
        sums = (f" (gateway {fmt_num(soak['cpu_ms_per_1k'])} + mosquitto "
                 f"{fmt_num(soak['broker_ms_per_1k'])} + PG {fmt_num(soak['pg_ms_per_1k'])} + "
                 f"loadgen {fmt_num(soak['loadgen_ms_per_1k'])})")
        for label, key, target in (
                ("all processes", "all_ms_per_1k", TARGET_CPU_ALL_MS),
                ("the gateway" + (" (supervisor + workers)"
                                  if len(soak.get("cpu_by_process") or {}) > 1 else ""),
                 "cpu_ms_per_1k", TARGET_CPU_GATEWAY_MS),
                ("PostgreSQL backends", "pg_ms_per_1k", TARGET_CPU_PG_MS)):
            value = soak.get(key)
            add(f"CPU per 1,000 heartbeats, {label} <= {target:.0f} ms",
                f"{fmt_num(value)} ms{at}{sums if key == 'all_ms_per_1k' else ''}",
                None if value is None else value / target,
                None if value is None else value <= target)
    over = results.get("overload")
    if over:
        at = f" at {over['offered']:,.0f}/s offered"
        add("overload: overflow rejections = 0", f"{over['overflow']:,}{at}", None,
            over["overflow"] == 0)
        handled = over["applied"] + over["stale"] + over["superseded"]
        add("overload: 0 wrong (rejected, unaccounted, not at the last heartbeat)",
            f"{over['mismatches']:,} of {over['checked']:,} checked wrong; rejected "
            f"{over['rejected']:,}; applied+stale+superseded {handled:,} of {over['sent']:,}",
            None, over["zero_loss"])
        probe = over.get("probe")
        if probe:
            add(f"overload: every probe answered within {TARGET_PROBE_TIMEOUT:g} s",
                f"{probe['answered']:,} of {probe['sent']:,} ({probe['timeouts']} timeouts), "
                f"p99 {probe['p99_ms']:.0f} ms, max {probe['max_ms']:.0f} ms",
                probe["answered"] / probe["sent"] if probe["sent"] else None,
                probe["sent"] > 0 and probe["answered"] == probe["sent"])
    return ("Targets (ratio: measured / target, so below 1 is better for the <= targets; "
            "?: not decided by this run)\n"
            + table(["target", "measured", "ratio", "met"], rows))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description="Gateway throughput benchmark.")
    p.add_argument("--devices", type=int, default=TARGET_DEVICES)
    p.add_argument("--duration", type=float, default=60.0,
                   help="soak length at --soak-rate, seconds (0: no soak)")
    p.add_argument("--soak-attempts", type=int, default=2,
                   help="when a soak fails, retry at the next lower sustained ladder rate, "
                        "up to this many soaks in all")
    p.add_argument("--soak-rate", type=float,
                   help=f"heartbeats/s in the soak (default {TARGET_RATE:,}, or the highest "
                        "sustained ladder rate when that is lower)")
    p.add_argument("--rates", default=DEFAULT_RATES,
                   help="ladder of offered heartbeats/s, comma-separated ('' : no ladder)")
    p.add_argument("--step-seconds", type=float, default=10.0, help="ladder step length")
    p.add_argument("--grace", type=float, default=3.0,
                   help="a rate is sustained when the backlog drains within this many "
                        "seconds after the last send")
    p.add_argument("--max-drain", type=float,
                   help="how long to wait, after the last send, until every heartbeat sent "
                        f"is accounted for (default {MAX_DRAIN_STEP:g} s after a ladder "
                        f"step, {MAX_DRAIN_SOAK:g} s after a soak, {MAX_DRAIN_OVERLOAD:g} s "
                        "with --overload)")
    p.add_argument("--overload", action="store_true",
                   help="instead of the soak, offer --soak-rate (beyond what the gateway can "
                        "apply) for --duration, then wait up to --max-drain until every "
                        "heartbeat is accounted for; check zero loss, no overflow, bounded "
                        "RSS, and a GET every 100 ms answered within 5 s throughout")
    p.add_argument("--gateway-workers", type=int, default=1, metavar="N",
                   help="run the gateway as `gateway run --workers N` (a supervisor and N "
                        "worker processes; 1: a single process, no supervisor)")
    p.add_argument("--verify-sample", type=int, default=100_000,
                   help="devices checked in PostgreSQL after the soak (0: all)")
    p.add_argument("--step-verify-sample", type=int, default=2_000,
                   help="devices checked after each ladder step (0: all touched)")
    p.add_argument("--fleet", choices=PRESENCE_STATES, default="online",
                   help="presence at the start: online (every device reported a moment ago, "
                   "the steady state; the gateway's offline threshold is then an hour, since "
                   "the ladder visits each device less than once a minute), unknown (none "
                   "ever reported: every first heartbeat records device.online, a fleet's "
                   "first start) or as-is (the database's)")
    p.add_argument("--rpc-seconds", type=float, default=10.0, help="0: no request/reply")
    p.add_argument("--rpc-in-flight", type=int, default=TARGET_RPC_IN_FLIGHT)
    p.add_argument("--rpc-warmup", type=float, default=1.0, help="seconds not measured")
    p.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the ceiling and baseline references on the ladder")
    p.add_argument("--connections", type=int, default=4, help="load generator connections")
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    p.add_argument("--gateway-pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="experiment: a PostgreSQL setting for the gateway's sessions only, "
                        "e.g. plan_cache_mode=force_custom_plan (reported in the header)")
    p.add_argument("--gateway-env", action="append", default=[], metavar="GATEWAY_X=VALUE",
                   help="experiment: an environment variable for the gateway, e.g. "
                        "GATEWAY_INBOX_MAX=4000 (reported in the header)")
    p.add_argument("--rss-interval", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write every figure here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.devices < 1:
        _parser().error("--devices must be positive")
    if args.gateway_workers < 1:
        _parser().error("--gateway-workers must be at least 1")
    if args.overload and (args.soak_rate is None or args.duration <= 0):
        _parser().error("--overload needs --soak-rate and a --duration above 0")
    for setting in args.gateway_pg_setting:
        if not re.fullmatch(r"[a-z_.]+=[^&=\s]+", setting):
            _parser().error(f"--gateway-pg-setting {setting!r}: expected NAME=VALUE")
    for variable in args.gateway_env:
        if not re.fullmatch(r"GATEWAY_[A-Z_]+=\S*", variable):
            _parser().error(f"--gateway-env {variable!r}: expected GATEWAY_NAME=VALUE")
    results = run_loop(bench_main(args))
    results["losses"] = losses(results)
    text = report(results)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results | {"report": text}, indent=1,
                                              default=str))
    return 1 if results["losses"] else 0


if __name__ == "__main__":
    sys.exit(main())
