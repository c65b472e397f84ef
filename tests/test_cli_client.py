"""The registry commands of the console script (docs/protocol.md §8, docs/client.md), run as
subprocesses against a gateway on the real broker and database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import MQTT_URL, Caller, wait_for

from gateway import cli as console_script

_SCRIPT = Path(sys.executable).with_name("gateway")
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway.cli"]


class Cli:
    """The console script, with the environment a backend operator would set."""

    def __init__(self, topic_prefix: str, api_key: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {
            "GATEWAY_MQTT_URL": MQTT_URL, "GATEWAY_TOPIC_PREFIX": topic_prefix,
            "GATEWAY_API_KEY": api_key, "COLUMNS": "200"}

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *GATEWAY, *args, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        process = await self.start(*args)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, stdout.decode(), stderr.decode()

    async def json(self, *args: str) -> Any:
        code, stdout, stderr = await self(*args, "--json")
        assert code == 0, stderr
        return json.loads(stdout)


@pytest.fixture
def cli(api: Caller, topic_prefix: str) -> Cli:
    assert api.key is not None
    return Cli(topic_prefix, api.key)


async def test_device_commands_print_tables_and_json_and_exit_0(
    cli: Cli, api: Caller
) -> None:
    code, out, _ = await cli("devices", "register", "SN-CLI", "--device-type", "bota_pin_v1",
                             "--metadata", '{"site": "north"}')
    assert code == 0 and out.startswith("registered\n") and "SN-CLI" in out
    device = (await api.call("GET", "/v1/devices", query={"serial_number": "SN-CLI"}))[1][
        "data"][0]
    _, other = await api.call("POST", "/v1/devices", {"serial_number": "SN-CLI-2"})
    (code, out, _), got, (_, table, _), listing, missing, bound = await asyncio.gather(
        cli("devices", "register", "SN-CLI"), cli.json("devices", "get", device["id"]),
        cli("devices", "list"), cli.json("devices", "list", "--all"),
        cli("devices", "delete", "dev_none"),
        cli.json("devices", "bind", other["id"], "eu_cli"))
    assert code == 0 and out.startswith("already registered\n")
    assert got == device
    assert "SERIAL_NUMBER" in table and "SN-CLI" in table and "bota_pin_v1" in table
    assert listing["has_more"] is False
    assert [d["id"] for d in listing["data"]] == [other["id"], device["id"]]
    assert missing == (1, "", "404 not_found: No such object\n")
    assert (bound["status"], bound["end_user_id"]) == ("bound", "eu_cli")

    unbound, reset = await asyncio.gather(cli.json("devices", "unbind", other["id"]),
                                          cli.json("devices", "reset", device["id"]))
    assert unbound["status"] == reset["status"] == "unbound"
    assert (await cli.json("devices", "delete", device["id"]))["deleted"] is True
    assert (await cli.json("devices", "restore", device["id"]))["id"] == device["id"]


async def test_settings_commands_and_commands_commands(cli: Cli, api: Caller) -> None:
    _, device = await api.call("POST", "/v1/devices", {"serial_number": "SN-CLI-SET"})
    send = ("commands", "send", device["id"], "set_led", "--params", '{"color": "red"}',
            "--idempotency-key", "k1")
    patched, sent = await asyncio.gather(
        cli.json("settings", "patch", device["id"], '{"audio": {"codec": "aac"}}',
                 "--if-match", "1"),
        cli.json(*send))
    assert (patched["version"], patched["settings"]["audio"]["codec"]) == (2, "aac")
    assert (sent["type"], sent["params"]) == ("set_led", {"color": "red"})

    (code, _, err), (_, table, _), again, listed, got = await asyncio.gather(
        cli("settings", "put", device["id"], "{}", "--if-match", "1"),
        cli("settings", "get", device["id"]), cli.json(*send),
        cli.json("commands", "list", device["id"]), cli.json("commands", "get", sent["id"]))
    assert code == 1 and err.startswith("409 conflict: ")
    assert "settings.audio.codec" in table and "aac" in table
    assert again == got == sent and listed["data"] == [sent]
    assert (await cli.json("commands", "cancel", sent["id"]))["status"] == "canceled"


async def test_call_reaches_any_route(cli: Cli, api: Caller) -> None:
    created = await cli.json("call", "POST", "/v1/devices", '{"serial_number": "SN-CALL"}')
    listing = await cli.json("call", "GET", "/v1/devices?limit=1")
    assert listing == (await api.call("GET", "/v1/devices", query={"limit": "1"}))[1]
    assert listing["data"] == [created]
    patched = await cli.json("call", "patch", f"/v1/devices/{created['id']}/settings",
                             '{"power": {"auto_sleep_minutes": 1}}', "-H", "If-Match: 1")
    assert patched["version"] == 2


async def test_an_error_answer_exits_1_with_one_line_naming_status_and_type(cli: Cli) -> None:
    (code, out, err), (code2, _, err2), (code3, _, err3) = await asyncio.gather(
        cli("devices", "get", "dev_nope"),
        cli("call", "POST", "/v1/devices", '{"serial_number": "no spaces", "x": 1}'),
        cli("devices", "credentials", "dev_nope"))
    assert (code, out, err) == (1, "", "404 not_found: No such object\n")
    assert code2 == 1 and err2 == (
        "400 validation_error: Invalid device (serial_number: Must be 1 to 128 characters "
        "of A-Z, a-z, 0-9, '.', '_', ':' or '-'; x: Unknown field)\n")
    assert code3 == 1 and err3.startswith("409 conflict: ") and err3.count("\n") == 1


@pytest.mark.parametrize(("argv", "says"), [
    (["devices", "get", "dev_1", "--mqtt-url", "http://127.0.0.1", "--api-key", "k"],
     "mqtt:// or mqtts://"),
    (["devices", "list"], "no API key: set GATEWAY_API_KEY or pass --api-key"),
    (["call", "POST", "/v1/devices", "{not json", "--api-key", "k"], "not JSON"),
    (["devices", "list", "--limit", "0", "--api-key", "k"], "above 0"),
    (["devices", "frobnicate"], "invalid choice"),
], ids=["url", "no-key", "json", "limit", "subcommand"])
def test_a_command_line_that_cannot_be_used_exits_2_before_connecting(
    argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("GATEWAY_API_KEY", "GATEWAY_MQTT_URL"):
        monkeypatch.delenv(name, raising=False)
    try:
        code = console_script.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2 and says in capsys.readouterr().err


async def test_an_import_file_that_cannot_be_used_exits_2(cli: Cli, tmp_path: Path) -> None:
    bad_csv = tmp_path / "devices.csv"
    bad_csv.write_text("serial,colour\nSN-1,red\n")
    (code, _, err), (code2, _, err2) = await asyncio.gather(
        cli("devices", "import", str(bad_csv)),
        cli("devices", "import", str(tmp_path / "missing.csv")))
    assert code == code2 == 2
    assert "serial_number column" in err and "unknown: colour, serial" in err
    assert "cannot read" in err2


async def test_no_answer_exits_1_saying_what_to_check(cli: Cli) -> None:
    code, _, err = await cli("devices", "bind", "dev_1", "eu_1", "--topic-prefix", "nobody",
                             "--timeout", "0.2")
    assert code == 1
    assert err == ("gateway: no answer within 0.2 s: is a gateway running on "
                   f"{MQTT_URL} with topic prefix 'nobody'?\n")


async def test_import_registers_csv_and_json_lines_and_reports_each_failure(
    cli: Cli, api: Caller, db: asyncpg.Connection, tmp_path: Path
) -> None:
    _, gone = await api.call("POST", "/v1/devices", {"serial_number": "SN-IMP-GONE"})
    await api.call("DELETE", f"/v1/devices/{gone['id']}")
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text(
        "serial_number,device_type,firmware_version,metadata\n"
        + "".join(f'SN-IMP-{i},bota_pin_v1,,"{{""row"": {i}}}"\n' for i in range(1500))
        + "\n"  # a blank line is no device
        + "bad serial,,,\nSN-IMP-META,,,not json\nSN-IMP-GONE,,,\n")
    jsonl = tmp_path / "devices.jsonl"
    jsonl.write_text('{"serial_number": "SN-JL-1", "firmware_version": "1.0"}\n\n'
                     '[1, 2]\n{"serial_number": "SN-IMP-0"}\n')

    code, out, err = await cli("devices", "import", str(csv_file), "--batch-size", "400")
    assert code == 1, err
    assert "created" in out and "1,500" in out
    assert "line 1503 (bad serial): 400 validation_error: Invalid device (serial_number:" in out
    assert "line 1504 (SN-IMP-META): 400 validation_error: Invalid device (metadata: Must " \
           "be an object)" in out
    assert "line 1505 (SN-IMP-GONE): 409 conflict: Serial number SN-IMP-GONE belongs to a " \
           "deleted device" in out
    assert "1503/1503" in err  # the progress bar, on stderr
    stored = await db.fetch("SELECT metadata FROM devices WHERE serial_number LIKE 'SN-IMP-%'"
                            " AND deleted_at IS NULL")
    assert len(stored) == 1500 and {"row": 7} in [json.loads(r["metadata"]) for r in stored]

    code, out, _ = await cli("devices", "import", str(csv_file), "--json")
    again = json.loads(out)
    assert code == 1 and (again["created"], again["already_registered"], again["failed"]) == (
        0, 1500, 3)
    code, out, _ = await cli("devices", "import", str(jsonl), "--json")
    lines = json.loads(out)
    assert (lines["created"], lines["already_registered"], lines["failed"]) == (1, 1, 1)
    assert lines["failures"] == [{"line": 3, "serial_number": None,
                                  "reason": "not a JSON object"}]


async def test_import_stopped_by_ctrl_c_finishes_when_run_again(
    cli: Cli, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Ctrl-C ends the import with 130 and a line saying to run it again; the second run
    registers the rest and reads what the first did as already registered."""
    total = 6000
    devices = tmp_path / "devices.csv"
    devices.write_text("serial_number\n" + "".join(f"SN-INT-{i}\n" for i in range(total)))
    process = await cli.start("devices", "import", str(devices), "--batch-size", "50",
                              "--concurrency", "1")

    async def some_registered() -> bool:
        return bool(await db.fetchval("SELECT count(*) >= 200 FROM devices"))

    await wait_for(some_registered, 20)
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 130
    assert "registering is idempotent: run the same command again to finish" in (
        stderr.decode())
    first = await db.fetchval("SELECT count(*) FROM devices")
    assert first < total

    summary = await cli.json("devices", "import", str(devices))
    assert summary["created"] + summary["already_registered"] == total
    assert summary["already_registered"] >= first - 50  # a batch may land after Ctrl-C
    assert await db.fetchval("SELECT count(*) FROM devices") == total


async def test_events_commands_list_and_follow(cli: Cli, api: Caller) -> None:
    _, device = await api.call("POST", "/v1/devices", {"serial_number": "SN-CLI-EVT"})

    async def listed() -> list[str]:  # listed once the relay gave it its id
        listing = await cli.json("events", "list", "--device-id", device["id"])
        return [e["type"] for e in listing["data"]]

    assert await wait_for(listed, 15) == ["device.registered"]
    follower = await cli.start("events", "follow", "--type", "device.bound", "--json")
    try:
        await api.call("POST", f"/v1/devices/{device['id']}/bind", {"end_user_id": "eu_1"})
        assert follower.stdout is not None
        line = await asyncio.wait_for(follower.stdout.readline(), 10)
        assert json.loads(line)["device_id"] == device["id"]
    finally:
        follower.send_signal(signal.SIGINT)
        # Its pipes drained meanwhile: a follower blocked writing to a full pipe would
        # never get to exit.
        try:
            await asyncio.wait_for(follower.communicate(), 20)
        except TimeoutError:
            follower.kill()
            await follower.wait()
            raise AssertionError("gateway events follow did not exit on SIGINT") from None
