"""`gateway demo` (gateway/demo.py) starts the whole stack, prints the next steps that
work as printed, and stops and removes everything on SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_for

from gateway.client import GatewayClient

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Demo:
    process: asyncio.subprocess.Process
    stdout: list[str]
    stderr: Path

    def said(self) -> str:
        return self.stderr.read_text()

    def printed(self) -> str:
        return "\n".join(self.stdout)

    @property
    def env(self) -> dict[str, str]:
        found = re.findall(r"^  export (GATEWAY_\w+)=(.*)$", self.printed(), re.M)
        return {name: shlex.split(value)[0] if value else "" for name, value in found}

    @property
    def directory(self) -> Path:
        match = re.search(r"stop everything and remove (/\S+)\.$", self.printed(), re.M)
        assert match, self.printed()
        return Path(match.group(1))

    def port(self, pattern: str) -> int:
        match = re.search(pattern, self.printed())
        assert match, pattern
        return int(match.group(1))

    def line(self, containing: str) -> str:
        return next(line.strip() for line in self.stdout if containing in line)


@contextlib.asynccontextmanager
async def demo(log: Path, *args: str) -> AsyncIterator[Demo]:
    """`python -m gateway.demo ARGS`, until it printed its next steps; SIGINT on exit.
    Its stderr goes to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.demo", *args, stdout=asyncio.subprocess.PIPE,
            stderr=err, env=env, cwd=ROOT)
    assert process.stdout is not None
    running = Demo(process, [], log)
    try:
        async with asyncio.timeout(90):
            while not running.stdout or "Press Ctrl-C" not in running.stdout[-1]:
                line = await process.stdout.readline()
                if not line:
                    raise AssertionError(f"the demo exited: {running.said()}")
                running.stdout.append(line.decode().rstrip("\n"))
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(process.communicate(), 60)


def closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in args:
                found.append(args)
    return found


def gone(directory: Path) -> bool:
    """The directory is removed and no process names it any more."""
    return not directory.exists() and not processes_mentioning(str(directory))


async def shell(command: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ, **env), cwd=ROOT, executable="/bin/bash")
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode()


@pytest.mark.slow
async def test_demo_runs_the_stack_and_its_next_steps_work_then_sigint_removes_it(
    tmp_path: Path,
) -> None:
    """The printed key and environment reach the gateway, the simulated devices'
    heartbeats are stored, the printed reset reaches a device that acknowledges it; SIGINT
    stops every process it started (ports closed), removes its directory and exits 0."""
    async with demo(tmp_path / "demo.log", "--devices", "100", "--interval", "1") as running:
        env = running.env
        assert set(env) == {"GATEWAY_MQTT_URL", "GATEWAY_API_KEY", "GATEWAY_TOPIC_PREFIX",
                            "GATEWAY_DATABASE_URL"}
        directory = running.directory
        assert directory.is_dir()
        ports = [running.port(r"mqtt://127\.0\.0\.1:(\d+)"),
                 running.port(r"postgresql://postgres@127\.0\.0\.1:(\d+)/"),
                 running.port(r"http://127\.0\.0\.1:(\d+)/metrics")]

        async with GatewayClient(env["GATEWAY_MQTT_URL"], api_key=env["GATEWAY_API_KEY"],
                                 topic_prefix=env["GATEWAY_TOPIC_PREFIX"]) as gateway:
            async def all_heard_from() -> bool:
                devices = [d async for d in gateway.devices.list()]
                return len(devices) == 100 and all(d.last_heartbeat_at for d in devices)

            await wait_for(all_heard_from, timeout=20)

            # The printed reset, as printed, with the printed environment.
            reset = running.line("devices reset ")
            device_id = re.findall(r"devices reset (dev_\w+)", reset)[0]
            code, out = await shell(reset.split("#")[0], env)
            assert code == 0, out

            async def acknowledged() -> bool:
                commands = [c async for c in gateway.commands.list(device_id)]
                return any(c.type == "factory_reset" and c.status == "succeeded"
                           for c in commands)

            await wait_for(acknowledged, timeout=20)

        if shutil.which("mosquitto_rr"):
            code, out = await shell(running.line("mosquitto_rr "), env)
            assert code == 0, out
            answer: dict[str, Any] = msgspec.json.decode(out.strip().splitlines()[-1])
            assert answer["status"] == 200 and len(answer["body"]["data"]) == 3

        running.process.send_signal(signal.SIGINT)
        await asyncio.wait_for(running.process.communicate(), 60)
        assert running.process.returncode == 0, running.said()
    assert all(closed(port) for port in ports)
    assert gone(directory)
    assert f"removed {directory}" in running.said()


@pytest.mark.slow
async def test_sigint_while_starting_stops_what_was_started() -> None:
    """Ctrl-C before the demo is up still stops and removes what it had started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.demo", "--devices", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    assert process.stderr is not None
    said = ""
    async with asyncio.timeout(60):
        while "starting Mosquitto" not in said:
            line = await process.stderr.readline()
            assert line, said
            said += line.decode()
    process.send_signal(signal.SIGINT)
    _, rest = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, rest
    directory = re.search(r"removed (/\S+)$", rest.decode(), re.M)
    assert directory, rest
    assert gone(Path(directory.group(1)))


def test_without_mosquitto_it_says_so_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import demo as demo_module

    before = set(Path(tempfile.gettempdir()).glob("gateway-demo-*"))
    assert demo_module.main(["--mosquitto", "/nonexistent/mosquitto"]) == 1
    assert "no Mosquitto broker at /nonexistent/mosquitto" in capsys.readouterr().err
    assert set(Path(tempfile.gettempdir()).glob("gateway-demo-*")) == before
