"""Processes that fault tests own: a Mosquitto, a PostgreSQL cluster, a gateway.

Fault tests stop, kill and restart these, so they never touch the shared services: each
runs on a free loopback port with its state in a temporary directory that is removed
afterwards. Also here: waiting for a port, reading a process's resident memory, and
reading the gateway's ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO_BIN = "/usr/sbin/mosquitto"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> float:
    """Seconds until ``port`` accepts connections; raises TimeoutError after ``timeout``."""
    started = time.monotonic()
    while not port_open(port, host):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- Mosquitto ----------------------------------------------------------------------------


class Mosquitto:
    """A broker of our own that a test may SIGTERM, SIGKILL and start again.

    Persistence is on (in the temp dir, saved at SIGTERM, never autosaved), so a SIGTERM
    restart keeps sessions and their queued QoS 1 messages and a SIGKILL loses them.
    Queues are unbounded like ``deploy/mosquitto/mosquitto.conf``, so nothing a slow
    subscriber has not taken yet is dropped, and TCP_NODELAY is on as there (otherwise
    Nagle holds each small message behind the previous one's unacknowledged segment, up
    to 40 ms). ``max_packet_size`` 0 keeps Mosquitto's default (the MQTT maximum, 256 MiB).
    """

    def __init__(self, *, max_packet_size: int = 0, extra: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gw-test-mosquitto-"))
        self.port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        limit = f"max_packet_size {max_packet_size}\n" if max_packet_size else ""
        (self.dir / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\n"
            "set_tcp_nodelay true\n"
            "allow_anonymous true\n"
            # We run as root; without this Mosquitto drops to a user that cannot write here.
            "user root\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 0\n"
            "max_queued_messages 1000000\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            "sys_interval 0\n"
            f"{limit}"
            f"log_dest file {self.dir}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"{extra}"
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> float:
        """Start the broker; seconds until it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [MOSQUITTO_BIN, "-c", str(self.dir / "mosquitto.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log()[-2000:]}")
            if time.monotonic() - started > timeout:
                raise TimeoutError("mosquitto did not start")
            time.sleep(0.01)
        return time.monotonic() - started

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Send ``sig`` and wait for the process to exit (SIGKILL after ``timeout``)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- PostgreSQL ---------------------------------------------------------------------------


class Postgres:
    """A throwaway PostgreSQL 15 cluster owned by the ``postgres`` OS user.

    We run as root, and PostgreSQL refuses to run as root, so ``initdb`` and ``pg_ctl`` run
    through ``runuser``. The socket directory is the temp dir, so the cluster never
    collides with the shared one. fsync is off: this cluster's data is disposable.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gw-test-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, timeout=60,
        )

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C")

    def start(self) -> float:
        """Start the cluster; seconds until ``pg_ctl`` reports it ready."""
        started = time.monotonic()
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=50 -c shared_buffers=32MB")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.dir / "postgres.log"), "-w", "-t", "30", "start")
        self.running = True
        return time.monotonic() - started

    def stop(self, mode: str = "fast") -> float:
        """Stop the cluster (``fast``: disconnect clients, roll back, shut down)."""
        started = time.monotonic()
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30",
                  "stop")
        self.running = False
        return time.monotonic() - started

    def pids(self) -> list[int]:
        """The postmaster and every process it started (none when not running)."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return []
        postmaster = int(pid_file.read_text().split("\n", 1)[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True,
                                  text=True, check=False).stdout.split()
        return [postmaster, *map(int, children)]

    def log(self) -> str:
        path = self.dir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the gateway as a process -------------------------------------------------------------


class GatewayProcess:
    """``python -m gateway.cli run`` with JSON logs to a file, for tests that kill it."""

    def __init__(self, *, mqtt_url: str, database_url: str, topic_prefix: str = "",
                 client_id: str, env: Mapping[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-test-gateway-"))
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "GATEWAY_MQTT_URL": mqtt_url,
            "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
            "GATEWAY_TOPIC_PREFIX": topic_prefix,
            "GATEWAY_CLIENT_ID": client_id,
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_LOG_LEVEL": "info",
            **(env or {}),
        }

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / f"gateway-{self.runs}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run"], cwd=ROOT, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    async def wait_healthy(self, within: float = 20.0) -> float:
        """Seconds until ``/healthz`` answers 200; fails if the process exits first."""
        started = time.monotonic()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()[-3000:]}")
            if await healthz(self.metrics_port) == 200:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(f"gateway not healthy after {within} s:\n"
                                     f"{self.log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.05)

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, within: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway still running after {within} s")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def events(self, run: int | None = None) -> list[dict[str, Any]]:
        """The JSON log lines of run number ``run`` (default: the latest)."""
        path = self.dir / f"gateway-{run or self.runs}.log"
        events = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if os.environ.get("GATEWAY_TEST_KEEP_LOGS"):
            print(f"gateway logs kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---- /healthz and /metrics ----------------------------------------------------------------


async def http_get(port: int, path: str, within: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET to 127.0.0.1:port; (0, b"") when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), within
        )
    except (OSError, TimeoutError):
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), within)
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


async def healthz(port: int) -> int:
    return (await http_get(port, "/healthz"))[0]


async def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {"name{labels}": value}; empty when nothing answers."""
    status, body = await http_get(port, "/metrics")
    samples: dict[str, float] = {}
    if status != 200:
        return samples
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


class HealthLog:
    """Samples ``/healthz`` and ``gateway_mqtt_connected`` / ``gateway_database_connected``.

    ``samples`` holds (monotonic time, healthz status, mqtt gauge, database gauge); a
    status of 0 means the endpoint did not answer.
    """

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port = port
        self.interval = interval
        self.samples: list[tuple[float, int, float, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _run(self) -> None:
        while not self._stopping:
            status = await healthz(self.port)
            metrics = await scrape(self.port)
            self.samples.append((
                time.monotonic(), status,
                metrics.get("gateway_mqtt_connected", -1.0),
                metrics.get("gateway_database_connected", -1.0),
            ))
            await asyncio.sleep(self.interval)  # the sampling period

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health-log")

    async def stop(self) -> None:
        # A flag, not Task.cancel(): Python 3.11's asyncio.wait_for (inside `http_get`)
        # swallows a cancellation that arrives as its inner call completes, and the
        # sampler would then run on while this waited for it.
        self._stopping = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    def first(self, after: float, status: int | None = None, mqtt: float | None = None,
              database: float | None = None) -> float | None:
        """Time of the first sample after ``after`` matching every given value."""
        for at, code, mqtt_gauge, db_gauge in self.samples:
            if at < after:
                continue
            if status is not None and code != status:
                continue
            if mqtt is not None and mqtt_gauge != mqtt:
                continue
            if database is not None and db_gauge != database:
                continue
            return at
        return None


# ---- MQTT clients for a broker of our own -------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, no credentials."""
    cid = client_id.encode()
    body = (b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
            + len(cid).to_bytes(2, "big") + cid)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """MQTT 3.1.1 QoS 1 PUBLISH; ``topic`` is raw bytes, so a test can make it invalid."""
    body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _remaining_length(len(body)) + body


async def raw_publish(port: int, topic: bytes, payload: bytes, within: float = 3.0) -> str:
    """Publish one QoS 1 message over a bare MQTT 3.1.1 connection, bypassing every client
    library check. Returns ``"acked"`` (PUBACK), ``"closed"`` (the broker hung up: a
    protocol violation) or ``"timeout"``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(connect_packet(f"raw-{os.getpid()}-{time.monotonic_ns()}"))
        connack = await asyncio.wait_for(reader.readexactly(4), within)
        assert connack[0] == 0x20 and connack[3] == 0, connack
        writer.write(publish_packet(topic, 1, payload))
        await writer.drain()
        try:
            packet = await asyncio.wait_for(reader.readexactly(4), within)
        except asyncio.IncompleteReadError:
            return "closed"
        except TimeoutError:
            return "timeout"
        return "acked" if packet[0] == 0x40 else f"unexpected {packet.hex()}"
    except (ConnectionError, asyncio.IncompleteReadError):
        return "closed"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class RequestClient:
    """A backend calling the gateway over MQTT 5 request/reply, across broker outages.

    Requests go to paho without waiting for the broker, so a request made while the
    broker is down waits in paho's queue and is sent on reconnect; the client reconnects
    by itself. With ``persistent`` its session (and so its reply subscription and any
    replies queued for it) survives its disconnections. `call` returns None when no
    reply comes within its timeout: the caller's clean time-out.
    """

    def __init__(self, port: int, prefix: str, key: str | None, *,
                 persistent: bool = False) -> None:
        tag = os.urandom(4).hex()
        self.prefix = prefix
        self.key = key
        self.reply_topic = f"{prefix}/api/v1/replies/{tag}"
        properties = Properties(PacketTypes.CONNECT)
        if persistent:
            properties.SessionExpiryInterval = 600
        self.client = aiomqtt.Client(
            "127.0.0.1", port, identifier=f"caller-{tag}", protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not persistent, properties=properties, timeout=5,
            max_queued_outgoing_messages=10_000,
        )
        self.connected = asyncio.Event()
        self.connections = 0
        self.replies = 0
        self._ids = 0
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                async with self.client:
                    await self.client.subscribe(self.reply_topic, qos=1)
                    self.connections += 1
                    self.connected.set()
                    async for message in self.client.messages:
                        assert isinstance(message.payload, bytes)
                        reply = msgspec.json.decode(message.payload)
                        self.replies += 1
                        future = self._waiting.pop(str(reply.get("correlation_id")), None)
                        if future is not None and not future.done():
                            future.set_result(reply)
            except aiomqtt.MqttError as exc:
                # As in the gateway's edge (`Edge.run`): aiomqtt may leave its lock held
                # after a failed exit, and that error may stand for a cancellation.
                if self.client._lock.locked():
                    self.client._lock.release()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc
                self.connected.clear()
                await asyncio.sleep(0.1)  # a caller's pause before it reconnects

    async def __aenter__(self) -> RequestClient:
        self._task = asyncio.create_task(self._run(), name="request-client")
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 15)

    def _future(self, correlation: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        return future

    def _publish(self, payload: bytes, properties: Properties | None = None) -> None:
        # paho queues a QoS 1 message while disconnected and sends it on reconnect.
        self.client._client.publish(f"{self.prefix}/api/v1/requests", payload, qos=1,
                                    properties=properties)

    def send(self, method: str, path: str, body: Any = None, *,
             query: dict[str, str] | None = None, headers: dict[str, str] | None = None,
             ) -> asyncio.Future[dict[str, Any]]:
        """Publish a request now (or queue it while disconnected); the future is its reply."""
        self._ids += 1
        correlation = f"c{self._ids}"
        all_headers = dict(headers or {})
        if self.key is not None:
            all_headers.setdefault("authorization", f"Bearer {self.key}")
        envelope: dict[str, Any] = {
            "method": method, "path": path, "headers": all_headers,
            "reply_to": self.reply_topic, "correlation_id": correlation,
        }
        if query:
            envelope["query"] = query
        if body is not None:
            envelope["body"] = body
        future = self._future(correlation)
        self._publish(msgspec.json.encode(envelope))
        return future

    def send_raw(self, payload: bytes) -> asyncio.Future[dict[str, Any]]:
        """Publish ``payload`` as is, naming the reply topic and correlation in MQTT 5
        properties (so even an envelope that cannot be parsed can be answered)."""
        self._ids += 1
        correlation = f"p{self._ids}"
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.reply_topic
        properties.CorrelationData = correlation.encode()
        future = self._future(correlation)
        self._publish(payload, properties)
        return future

    async def call(self, method: str, path: str, body: Any = None, *, within: float = 10.0,
                   **kwargs: Any) -> tuple[int, Any] | None:
        """(status, body), or None when no reply came in ``within`` seconds."""
        reply = await wait_reply(self.send(method, path, body, **kwargs), within)
        return None if reply is None else (reply["status"], reply.get("body"))


async def wait_reply(future: asyncio.Future[dict[str, Any]],
                     within: float) -> dict[str, Any] | None:
    try:
        return await asyncio.wait_for(future, within)
    except TimeoutError:
        return None
