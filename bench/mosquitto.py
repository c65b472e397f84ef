"""Start a throwaway Mosquitto tuned for benchmarks, on a free port in a temp dir.

The stock broker keeps Mosquitto's defaults, which throttle a fast subscriber:

* ``max_inflight_messages 20``: at most 20 unacknowledged QoS 1 messages per
  subscriber, so throughput is bounded by the subscriber's PUBACK round trip. ``0``
  means "no maximum" in Mosquitto 2.0 (it also accepts 65535 as "no maximum").
  An MQTT 5 client that sends its own Receive Maximum overrides this for itself;
  paho/aiomqtt send none unless given ``properties``.
* ``max_queued_messages 1000``: messages beyond the in-flight ones are queued per
  client and *silently dropped* past this limit (the publisher still gets its PUBACK),
  which would look like loss in a zero-loss check.

Usage::

    with TunedMosquitto() as broker:          # or: async with TunedMosquitto() as broker:
        print(broker.host, broker.port)

CLI (runs in the foreground until Ctrl-C)::

    python -m bench.mosquitto [--port 0] [--log]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

MOSQUITTO_BIN = "/usr/sbin/mosquitto"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto binds
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick; racy but fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def tuned_config(
    port: int,
    host: str = "127.0.0.1",
    *,
    log_file: Path | None = None,
    max_queued_messages: int = 1_000_000,
    extra: str = "",
) -> str:
    """The text of a mosquitto.conf for benchmarks."""
    log = (
        f"log_dest file {log_file}\nlog_type error\nlog_type warning\n"
        if log_file
        else ("log_dest none\n")
    )
    return (
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        # 0 = no limit on unacknowledged QoS 1/2 messages towards each subscriber.
        "max_inflight_messages 0\n"
        f"max_queued_messages {max_queued_messages}\n"
        # No byte limit on the queue either (0 is the default, stated for clarity).
        "max_queued_bytes 0\n"
        # Nobody reads $SYS during a benchmark; don't spend broker CPU on it.
        "sys_interval 0\n"
        f"{log}"
        f"{extra}"
    )


class TunedMosquitto:
    """A Mosquitto process with `tuned_config`, usable as a sync or async context manager.

    ``port=0`` picks a free port. On enter, waits until the port accepts connections;
    on exit, terminates the broker (SIGTERM, then SIGKILL after 5 s) and removes the
    temp dir.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        binary: str = MOSQUITTO_BIN,
        log: bool = False,
        max_queued_messages: int = 1_000_000,
        extra_config: str = "",
        start_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.binary = binary
        self.log = log
        self.max_queued_messages = max_queued_messages
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.tempdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path | None:
        return self.tempdir / "mosquitto.log" if self.tempdir and self.log else None

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("broker already started")
        self.tempdir = Path(tempfile.mkdtemp(prefix="bench-mosquitto-"))
        # A port picked with free_port() can be taken before the broker binds it: retry.
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or free_port(self.host)
            # Otherwise the readiness probe below could connect to whoever holds the port.
            if not port_is_free(port, self.host):
                self._cleanup_dir()
                raise RuntimeError(f"{self.host}:{port} is already in use")
            conf = self.tempdir / "mosquitto.conf"
            conf.write_text(
                tuned_config(
                    port,
                    self.host,
                    log_file=self.tempdir / "mosquitto.log" if self.log else None,
                    max_queued_messages=self.max_queued_messages,
                    extra=self.extra_config,
                )
            )
            with (self.tempdir / "stderr.log").open("wb") as stderr:
                self.proc = subprocess.Popen(
                    [self.binary, "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            if self._wait_listening(port) and self.proc.poll() is None:
                self.port = port
                return
            self._terminate()
            if attempt == attempts - 1:
                err = (self.tempdir / "stderr.log").read_text(errors="replace")
                self._cleanup_dir()
                raise RuntimeError(f"mosquitto did not start on {self.host}:{port}: {err}")

    def _wait_listening(self, port: int) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, port), timeout=0.2),
            ):
                return True
            time.sleep(0.02)
        return False

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _cleanup_dir(self) -> None:
        if self.tempdir is not None:
            shutil.rmtree(self.tempdir, ignore_errors=True)
            self.tempdir = None

    def stop(self) -> None:
        self._terminate()
        self._cleanup_dir()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        # start() blocks for a few ms while the broker comes up: keep it off the loop.
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a benchmark-tuned Mosquitto.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--log", action="store_true", help="log errors/warnings to a file")
    args = parser.parse_args(argv)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    with TunedMosquitto(args.port, args.host, log=args.log) as broker:
        assert broker.proc is not None
        print(f"mosquitto pid {broker.proc.pid} listening on {broker.host}:{broker.port}")
        if broker.log_file:
            print(f"log: {broker.log_file}")
        print(f"config dir: {broker.tempdir}", flush=True)
        try:
            while not stop and broker.proc.poll() is None:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    print("mosquitto stopped")


if __name__ == "__main__":
    main()
