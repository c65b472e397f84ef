"""The console script helps the people who run it (docs/protocol.md §8)."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import create_key

from gateway import cli

_SCRIPT = Path(sys.executable).with_name("gateway")
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=30,
                          env={**clean, **(env or {}), "COLUMNS": "200"})


def test_help_is_plain_text() -> None:
    out = run("--help").stdout
    assert "``" not in out and ":class:" not in out
    assert "run" in out and "apikey" in out


def test_run_help_shows_every_flags_default_and_variable() -> None:
    out = run("run", "--help").stdout
    options = out[out.index("options:"):]
    entries = re.split(r"\n  (?=--)", options)[1:]  # one per flag, with its help text
    flags = {entry.split()[0] for entry in entries}
    assert {"--mqtt-url", "--database-url", "--metrics-addr", "--topic-prefix",
            "--share-group", "--client-id", "--log-format", "--log-level",
            "--dynsec"} <= flags
    for entry in entries:
        assert "default:" in entry and "GATEWAY_" in entry, entry
    assert "mqtt://127.0.0.1:1883" in out and "GATEWAY_MQTT_URL" in out


def test_apikey_create_shows_only_its_own_flags() -> None:
    out = run("apikey", "create", "--help").stdout
    flags = set(re.findall(r"^\s+(--[a-z-]+)", out, re.M))
    assert flags == {"--scope", "--name", "--database-url", "--log-format", "--log-level"}


@pytest.mark.parametrize("form", ["id", "key"])
async def test_apikey_revoke_takes_the_key_id_or_the_whole_key(
    database_url: str, form: str
) -> None:
    key_id, secret = await create_key(database_url, "devices:read")
    given = key_id if form == "id" else secret
    revoke = ("apikey", "revoke", given, "--database-url", database_url)
    first = await asyncio.to_thread(run, *revoke)
    assert (first.returncode, first.stdout.strip()) == (0, f"revoked {key_id}")
    again = await asyncio.to_thread(run, *revoke)
    assert again.returncode == 0
    assert re.fullmatch(rf"{key_id} was already revoked at \d{{4}}-.*Z", again.stdout.strip())


@pytest.mark.parametrize("given", ["nonsense", "sk_live_", "key_no/slash", "Bearer x"])
def test_apikey_revoke_says_what_it_takes_when_given_neither(given: str) -> None:
    result = run("apikey", "revoke", given)
    assert result.returncode == 2
    assert "key id (key_...) or a whole key (sk_live_...)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_apikey_list_has_a_header_on_a_terminal_and_none_in_a_pipe(
    database_url: str,
) -> None:
    """People get a header row; a script reading a pipe gets one line per key."""
    key_id, _ = await create_key(database_url, "devices:read")
    listing = ("apikey", "list", "--database-url", database_url)
    piped = (await asyncio.to_thread(run, *listing)).stdout.splitlines()
    assert [line.split("\t")[0] for line in piped] == [key_id]
    lines = (await asyncio.to_thread(on_a_terminal, *listing)).strip().splitlines()
    assert lines[0].split() == ["ID", "NAME", "SCOPES", "CREATED", "REVOKED"]
    assert lines[1].split()[0] == key_id


def on_a_terminal(*args: str) -> str:
    """What the console script prints with a terminal as its stdout."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execvpe(GATEWAY[0], [*GATEWAY, *args],
                   {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")})
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the terminal closes with the child
            break
        if not chunk:
            break
        output += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    return output.decode().replace("\r", "")


def test_a_metrics_address_past_65535_exits_2_with_one_line() -> None:
    result = run("run", "--metrics-addr", "127.0.0.1:70000")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "0 to 65535" in result.stderr


def test_revoked_key_id_accepts_ids_and_keys_only() -> None:
    assert cli.revoked_key_id("key_abc123") == "key_abc123"
    assert cli.revoked_key_id("sk_live_abc123_secret") == "key_abc123"
    assert cli.revoked_key_id("abc") is None
