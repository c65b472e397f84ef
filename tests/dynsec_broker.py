"""A Mosquitto of the tests' own with the dynamic security plugin, on a free port.

Set up as an operator would (deploy/mosquitto/README.md): ``mosquitto_ctrl dynsec init``
for the admin account, then ``deploy/mosquitto/dynsec-setup.sh`` for the gateway's account
and a backend's. The shared broker is never touched.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PLUGIN = os.environ.get(
    "GATEWAY_TEST_DYNSEC_PLUGIN", "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
)
SETUP_SCRIPT = Path(__file__).resolve().parent.parent / "deploy/mosquitto/dynsec-setup.sh"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class DynsecBroker:
    port: int
    admin_password: str
    gateway_password: str
    backend: str
    backend_password: str
    directory: Path

    @property
    def host(self) -> str:
        return HOST

    def url(self, username: str, password: str) -> str:
        return f"mqtt://{username}:{password}@{HOST}:{self.port}"

    def log(self) -> str:
        return (self.directory / "mosquitto.log").read_text(errors="replace")


def available() -> str | None:
    """Why the broker cannot be started here, or None."""
    for tool in ("mosquitto", "mosquitto_ctrl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed"
    if not Path(PLUGIN).exists():
        return f"the dynamic security plugin is not at {PLUGIN}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _mosquitto() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError("mosquitto did not start listening within 5 s")


@contextlib.contextmanager
def dynsec_broker(topic_prefix: str) -> Iterator[DynsecBroker]:
    """A running broker whose gateway account is set up for ``topic_prefix``."""
    directory = Path(tempfile.mkdtemp(prefix="gw-dynsec-"))
    broker = DynsecBroker(
        port=_free_port(),
        admin_password=secrets.token_hex(12),
        gateway_password=secrets.token_hex(12),
        backend="svc",
        backend_password=secrets.token_hex(12),
        directory=directory,
    )
    state = directory / "dynamic-security.json"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(state), "admin", broker.admin_password],
        check=True, capture_output=True, timeout=10,
    )
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {broker.port} {HOST}\n"
        "set_tcp_nodelay true\n"  # as deploy/mosquitto/mosquitto.conf
        # Started as root, mosquitto would become the mosquitto user and lose the files.
        f"user {getpass.getuser()}\n"
        "allow_anonymous false\n"
        f"plugin {PLUGIN}\n"
        f"plugin_opt_config_file {state}\n"
        "max_queued_messages 1000000\n"
        "max_queued_bytes 0\n"
        "max_inflight_messages 0\n"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )
    log = directory / "mosquitto.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [_mosquitto(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=log_file
        )
    try:
        _wait_listening(broker.port, process, log)
        env = dict(
            os.environ,
            MOSQUITTO_CTRL_OPTS=f"-h {HOST} -p {broker.port} -u admin -P {broker.admin_password}",
        )
        for args in (
            ["gateway", broker.gateway_password, topic_prefix],
            ["backend", broker.backend, broker.backend_password, topic_prefix],
        ):
            subprocess.run(
                [str(SETUP_SCRIPT), *args], check=True, capture_output=True, env=env, timeout=30
            )
        yield broker
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
