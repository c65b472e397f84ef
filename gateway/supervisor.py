"""`gateway run --workers N`: N gateway processes under one supervisor.

Each worker is a whole gateway (``gateway run``) with the client id ``{client id}-{i}``,
the same share group, and ``/metrics`` on a private loopback port. The supervisor:

- restarts a worker that exits without being asked to, after a capped backoff (1 s
  doubling to 30 s, starting over once a worker has run for a minute);
- passes SIGTERM and SIGINT on to every worker, waits for them to drain, and exits 0 when
  they all did;
- serves the configured ``/metrics`` and ``/healthz`` itself: ``/metrics`` gathers every
  worker's series with a ``worker`` label (and the supervisor's own), ``/healthz`` is 200
  only while every worker answers 200.

Gathering, rather than prometheus-client's multiprocess mode: each worker keeps its own
registry, so its process CPU and memory series (which multiprocess mode cannot export)
stay available per worker, nothing is shared on disk, and a restarted worker needs no
clean-up of a dead process's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import sys
import time

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gateway import metrics
from gateway.config import Config

log = structlog.get_logger("gateway.supervisor")

RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0
SCRAPE_TIMEOUT_SECONDS = 2.0

_registry = CollectorRegistry()
WORKER_RESTARTS = Counter("gateway_worker_restarts_total",
                          "Workers restarted after exiting unasked.", registry=_registry)
WORKERS_HEALTHY = Gauge("gateway_workers_healthy",
                        "Workers whose /healthz answered 200 at the last scrape.",
                        registry=_registry)


class Worker:
    def __init__(self, index: int, config: Config, port: int) -> None:
        self.index = index
        self.port = port
        self._config = config
        self.process: asyncio.subprocess.Process | None = None
        self._delay = RESTART_FIRST_SECONDS

    def command(self) -> list[str]:
        config = self._config
        args = [
            sys.executable, "-m", "gateway.cli", "run",
            "--mqtt-url", config.mqtt_url,
            "--database-url", config.database_url,
            "--metrics-addr", f"127.0.0.1:{self.port}",
            "--topic-prefix", config.topic_prefix,
            "--share-group", config.share_group or "gateway",
            "--client-id", f"{config.client_id or 'gateway-' + config.instance}-{self.index}",
            "--log-format", config.log_format,
            "--log-level", config.log_level,
            "--workers", "1",
            "--worker", str(self.index),
        ]
        if config.dynsec:
            args.append("--dynsec")
        return args

    async def start(self) -> None:
        # The environment as it is (the tuning variables have no flags); the flags above
        # win over the variables they share a setting with.
        self.process = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        log.info("supervisor.worker_started", worker=self.index, pid=self.process.pid)

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep this worker running until ``stopping`` is set and it has exited."""
        while True:
            await self.start()
            assert self.process is not None
            started = time.monotonic()
            code = await self.process.wait()
            if stopping.is_set():
                log.info("supervisor.worker_stopped", worker=self.index, code=code)
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                self._delay = RESTART_FIRST_SECONDS
            log.error("supervisor.worker_exited", worker=self.index, code=code,
                      restart_in_seconds=self._delay)
            WORKER_RESTARTS.inc()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._delay):
                    await stopping.wait()
            if stopping.is_set():
                return
            self._delay = min(self._delay * 2, RESTART_MAX_SECONDS)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


def _die_with_parent() -> None:
    """In the child: receive SIGTERM if the supervisor dies (Linux), so that no worker is
    left behind by a supervisor that was killed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _get(port: int, path: str) -> tuple[int, bytes]:
    async with asyncio.timeout(SCRAPE_TIMEOUT_SECONDS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _scrape(worker: Worker, path: str) -> tuple[int, bytes]:
    try:
        return await _get(worker.port, path)
    except (OSError, TimeoutError, ValueError, IndexError):
        return 0, b""


def merge(expositions: dict[int, bytes]) -> bytes:
    """Every worker's exposition as one, each sample labelled ``worker="i"``.

    Samples of one metric family stay together under one HELP and TYPE line, as the text
    format requires.
    """
    families: dict[str, tuple[list[str], list[str]]] = {}
    for index, text in expositions.items():
        family = ""
        for line in text.decode().splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                family = parts[2]
                head, _ = families.setdefault(family, ([], []))
                if line not in head:
                    head.append(line)
            elif line:
                name, brace, rest = line.partition("{")
                labelled = (f'{name}{{worker="{index}",{rest}' if brace
                            else f'{name.split(" ", 1)[0]}{{worker="{index}"}} '
                                 f'{name.split(" ", 1)[1]}')
                families.setdefault(family, ([], []))[1].append(labelled.replace(",}", "}"))
    lines = [line for head, samples in families.values() for line in (*head, *samples)]
    return ("\n".join(lines) + "\n").encode()


class Supervisor:
    def __init__(self, config: Config) -> None:
        self._config = config
        self.workers = [Worker(index, config, _free_port())
                        for index in range(1, config.workers + 1)]
        self._stopping = asyncio.Event()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self._stopping.set()
        for worker in self.workers:
            worker.signal(signum)

    async def healthy(self) -> bool:
        answers = await asyncio.gather(*(_scrape(w, "/healthz") for w in self.workers))
        up = sum(1 for status, _ in answers if status == 200)
        WORKERS_HEALTHY.set(up)
        return up == len(self.workers)

    async def exposition(self) -> bytes:
        scraped = await asyncio.gather(*(_scrape(w, "/metrics") for w in self.workers))
        await self.healthy()
        merged = merge({w.index: body for w, (status, body) in zip(self.workers, scraped,
                                                                     strict=True)
                        if status == 200})
        return merged + generate_latest(_registry)

    async def run(self) -> int:
        host, port = self._config.metrics_endpoint
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        async with metrics.serve(host, port, self.exposition, self.healthy):
            log.info("supervisor.ready", workers=len(self.workers),
                     metrics=f"http://{host}:{port}/metrics",
                     share_group=self._config.share_group or "gateway")
            async with asyncio.TaskGroup() as tasks:
                for worker in self.workers:
                    tasks.create_task(worker.run(self._stopping), name=f"worker-{worker.index}")
        codes = [w.process.returncode for w in self.workers if w.process is not None]
        log.info("supervisor.stopped", exit_codes=codes)
        return 0 if all(code == 0 for code in codes) else 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
