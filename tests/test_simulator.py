"""The device simulator (gateway/simulator.py) behaves as firmware following
docs/protocol.md would, against a real gateway, broker and database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import pty
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import asyncpg
import dynsec_broker
import msgspec
import pytest
from conftest import (
    MQTT_HOST,
    MQTT_PORT,
    MQTT_URL,
    NODELAY,
    Caller,
    free_port,
    reading,
    running_gateway,
    wait_for,
)
from gateway_codecs.device import Heartbeat, SettingsPatch, decode_heartbeat
from processes import Mosquitto

from gateway import simulator
from gateway.app import Gateway
from gateway.config import Config
from gateway.simulator import Options, Simulator

INTERVAL = 0.25  # seconds between a simulated device's heartbeats


def options(prefix: str, key: str | None, devices: int, **changes: Any) -> Options:
    values: dict[str, Any] = {
        "devices": devices, "interval": INTERVAL, "mqtt_url": MQTT_URL, "topic_prefix": prefix,
        "register": key is not None, "api_key": key, "serial_prefix": "SIM-", "seed": 7,
    }
    return Options(**(values | changes))


@contextlib.asynccontextmanager
async def fleet(opts: Options) -> AsyncIterator[Simulator]:
    """A running fleet, all of its connections up; stopped on exit."""
    sim = Simulator(opts, status_stream=io.StringIO())
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(sim.run(stop, ready))
    up = asyncio.create_task(ready.wait())
    await asyncio.wait({task, up}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        up.cancel()
        stop.set()
        await task  # raises what stopped it
        raise AssertionError("the fleet did not connect")
    try:
        yield sim
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class Heartbeats:
    """Every heartbeat the broker passes on, with its MQTT 5 content type."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[tuple[str, bytes, str | None]] = []

    async def _read(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            content_type = getattr(message.properties, "ContentType", None)
            serial = message.topic.value.split("/")[-2]
            self.seen.append((serial, message.payload, content_type))

    def of(self, serial: str) -> list[Heartbeat]:
        return [decode_heartbeat(payload, kind) for s, payload, kind in self.seen
                if s == serial]


@contextlib.asynccontextmanager
async def heartbeats(prefix: str) -> AsyncIterator[Heartbeats]:
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, protocol=aiomqtt.ProtocolVersion.V5,
                              socket_options=NODELAY) as client:
        await client.subscribe(f"{prefix}/devices/+/heartbeat", qos=1)
        seen = Heartbeats(client)
        async with reading(seen._read()):
            yield seen


async def heard_from(db: asyncpg.Connection, serials: list[str]) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM device_health WHERE serial_number = ANY($1)"
        " AND last_heartbeat_at IS NOT NULL", serials)
    return bool(count == len(serials))


async def applied(db: asyncpg.Connection, serial: str) -> int:
    return int(await db.fetchval(
        "SELECT applied_version FROM device_health WHERE serial_number = $1", serial))


# ---- heartbeats -----------------------------------------------------------------------------


async def test_fleet_registers_and_heartbeats_in_json_and_messagepack(
    gateway: Gateway, topic_prefix: str, api_key: str, db: asyncpg.Connection
) -> None:
    """Registered through the API, every device heartbeats; half send MessagePack (with
    its content type), half JSON; `ts` is the clock in milliseconds and grows."""
    async with heartbeats(topic_prefix) as seen, fleet(
            options(topic_prefix, api_key, 6)) as sim:
        serials = list(sim.devices)
        assert set(sim.device_ids) == set(serials)
        await wait_for(lambda: heard_from(db, serials))
        await wait_for(lambda: all(len(seen.of(s)) >= 3 for s in serials))
    kinds = {s: sim.devices[s].msgpack for s in serials}
    assert sorted(kinds.values()) == [False] * 3 + [True] * 3
    now_ms = time.time() * 1000
    for serial, payload, content_type in seen.seen:
        msgpack = kinds[serial]
        assert content_type == ("application/msgpack" if msgpack else "application/json")
        assert (payload[:1] == b"{") is not msgpack
    for serial in serials:
        beats = seen.of(serial)
        stamps = [beat.ts for beat in beats]
        assert stamps == sorted(set(stamps)), "ts grows with every heartbeat"
        assert all(stamp is not None and abs(stamp - now_ms) < 60_000 for stamp in stamps)
        assert all(beat.settings_version is not None for beat in beats)
    rows = await db.fetch("SELECT battery_percent, storage_total_mb FROM device_health"
                          " WHERE serial_number = ANY($1)", serials)
    assert all(r["battery_percent"] is not None and r["storage_total_mb"] for r in rows)


async def test_heartbeats_keep_the_pace_of_the_interval(topic_prefix: str) -> None:
    """Each device heartbeats once per interval, after a first one within the ramp."""
    interval = 0.5
    async with heartbeats(topic_prefix) as seen, fleet(
            options(topic_prefix, None, 20, interval=interval)):
        await asyncio.sleep(0.2)
        started, before = time.monotonic(), len(seen.seen)
        await asyncio.sleep(2.0)
        rate = (len(seen.seen) - before) / (time.monotonic() - started)
    assert 20 / interval * 0.8 < rate < 20 / interval * 1.3, rate


# ---- settings -------------------------------------------------------------------------------


async def test_settings_updates_are_applied_and_reported(
    api: Caller, topic_prefix: str, api_key: str, db: asyncpg.Connection
) -> None:
    """A new device reports 0, gets the whole document, reports version 1; a patch is
    applied onto it and its version reported in the next heartbeat."""
    async with fleet(options(topic_prefix, api_key, 2)) as sim:
        serial, device_id = next(iter(sim.device_ids.items()))
        device = sim.devices[serial]
        await wait_for(lambda: applied(db, serial), timeout=10)
        assert await applied(db, serial) == 1
        status, body = await api.call("PATCH", f"/v1/devices/{device_id}/settings",
                                      {"audio": {"codec": "aac"}, "power": {
                                          "auto_sleep_minutes": 5}})
        assert status == 200 and body["version"] == 2
        await wait_for(lambda: device.settings_version == 2)
        assert device.settings == body["settings"]
        await wait_for(lambda: applied_is(db, serial, 2))
    assert sim.stats.settings_applied >= 3  # two full documents, one patch


async def applied_is(db: asyncpg.Connection, serial: str, version: int) -> bool:
    return await applied(db, serial) == version


def test_a_patch_onto_a_document_the_device_does_not_hold_asks_for_the_whole_one() -> None:
    sim = Simulator(options("x", None, 1), status_stream=io.StringIO())
    device = next(iter(sim.devices.values()))
    device.on_settings(simulator.decode_settings(
        b'{"version":1,"base_version":null,"settings":{"audio":{"codec":"opus"}}}'))
    assert device.settings_version == 1
    device.on_settings(SettingsPatch(version=9, base_version=7, patch={"audio": {}}))
    assert device.settings_version == 0
    assert device.settings == {"audio": {"codec": "opus"}}


# ---- commands -------------------------------------------------------------------------------


async def command_status(api: Caller, command_id: str) -> dict[str, Any] | None:
    status, body = await api.call("GET", f"/v1/commands/{command_id}")
    assert status == 200
    return body if body["status"] not in ("pending", "delivered") else None


async def test_commands_are_executed_once_and_acknowledged(
    api: Caller, topic_prefix: str, api_key: str
) -> None:
    """A known command succeeds, an unknown type is rejected; a command delivered again is
    acknowledged again but not executed again."""
    async with heartbeats(topic_prefix) as seen, fleet(
            options(topic_prefix, api_key, 1)) as sim:
        serial, device_id = next(iter(sim.device_ids.items()))
        device = sim.devices[serial]
        ids = {}
        for kind in ("start_recording", "self_destruct"):
            status, body = await api.call("POST", f"/v1/devices/{device_id}/commands",
                                          {"type": kind})
            assert status == 201
            ids[kind] = body["id"]
        done = await wait_for(lambda: command_status(api, ids["start_recording"]))
        assert done["status"] == "succeeded" and done["result"] == {"detail": None}
        rejected = await wait_for(lambda: command_status(api, ids["self_destruct"]))
        assert rejected["status"] == "rejected"
        assert rejected["result"] == {"detail": "unknown command type self_destruct"}
        assert device.executed == 1 and device.recording

        # The gateway delivers at least once: the same batch again, as it would send it.
        acked_before = sum(1 for b in seen.of(serial) for a in b.acks or ()
                           if a.id == ids["start_recording"])
        batch = {"commands": [{"id": ids["start_recording"], "type": "start_recording",
                               "params": {}, "created_at": done["created_at"],
                               "expires_at": done["expires_at"]}]}
        async with aiomqtt.Client(MQTT_HOST, MQTT_PORT) as client:
            await client.publish(f"{topic_prefix}/devices/{serial}/commands",
                                 msgspec.json.encode(batch), qos=1)
        await wait_for(lambda: sum(1 for b in seen.of(serial) for a in b.acks or ()
                                   if a.id == ids["start_recording"]) > acked_before)
        assert device.executed == 1
    assert sim.stats.commands_done == 1 and sim.stats.commands_rejected == 1


async def test_factory_reset_wipes_the_device_and_it_resynchronises(
    api: Caller, topic_prefix: str, api_key: str, db: asyncpg.Connection
) -> None:
    """`POST .../reset` reaches the device as factory_reset: the heartbeat that
    acknowledges it shows the defaults (battery 100, storage 0, settings version 0); then
    the device gets the current settings again."""
    async with heartbeats(topic_prefix) as seen, fleet(
            options(topic_prefix, api_key, 1)) as sim:
        serial, device_id = next(iter(sim.device_ids.items()))
        device = sim.devices[serial]
        status, body = await api.call("PATCH", f"/v1/devices/{device_id}/settings",
                                      {"upload": {"mode": "wifi_only"}})
        assert status == 200
        await wait_for(lambda: applied_is(db, serial, 2))
        status, _ = await api.call("POST", f"/v1/devices/{device_id}/reset")
        assert status == 200
        _, commands = await api.call("GET", f"/v1/devices/{device_id}/commands")
        reset_id = commands["data"][0]["id"]
        done = await wait_for(lambda: command_status(api, reset_id))
        assert done["status"] == "succeeded"
        acking = next(b for b in seen.of(serial) if any(a.id == reset_id for a in b.acks or ()))
        assert (acking.settings_version, acking.battery_percent,
                acking.storage_used_mb) == (0, 100, 0)
        await wait_for(lambda: device.settings_version == 2)
        assert device.settings == body["settings"]
    assert sim.stats.resets == 1


# ---- connections ----------------------------------------------------------------------------


@pytest.mark.fault
async def test_devices_reconnect_after_the_broker_goes_away() -> None:
    """The broker stops and comes back on the same port: every device connects again and
    heartbeats on."""
    with Mosquitto() as broker:
        opts = options("sim", None, 30, mqtt_url=broker.url, per_connection=10)
        async with fleet(opts) as sim:
            await wait_for(lambda: sim.stats.acknowledged >= 30)
            await asyncio.to_thread(broker.stop)
            await wait_for(lambda: sim.stats.connected == 0)
            await asyncio.to_thread(broker.start)
            acked = sim.stats.acknowledged
            await wait_for(lambda: sim.stats.connected == 30, timeout=10)
            await wait_for(lambda: sim.stats.acknowledged >= acked + 30)
            assert sim.stats.reconnects == 3  # one per connection


@pytest.mark.fault
async def test_a_broker_that_is_not_there_is_retried_with_backoff() -> None:
    """Nothing listens yet: the fleet keeps trying, backing off, and connects once the
    broker is up."""
    broker = Mosquitto()
    said = io.StringIO()
    try:
        sim = Simulator(options("sim", None, 5, mqtt_url=broker.url), status_stream=said)
        stop = asyncio.Event()
        task = asyncio.create_task(sim.run(stop))
        await asyncio.sleep(1.0)
        assert sim.stats.connected == 0 and not task.done()
        await asyncio.to_thread(broker.start)
        await wait_for(lambda: sim.stats.acknowledged >= 5, timeout=10)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        broker.close()
    assert " failed: " in said.getvalue()  # said once, not at every attempt


# ---- the command line -----------------------------------------------------------------------


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    env_key = os.environ.pop("GATEWAY_API_KEY", None)
    try:
        assert simulator.main(["--devices", "3", "--register"]) == 2
        assert "need an API key" in capsys.readouterr().err
        assert simulator.main(["--devices", "3", "--msgpack-share", "2"]) == 2
        assert "--msgpack-share" in capsys.readouterr().err
        assert simulator.main(["--devices", "0"]) == 2
    finally:
        if env_key is not None:
            os.environ["GATEWAY_API_KEY"] = env_key


async def test_a_refused_api_key_exits_1_with_the_gateways_answer(
    gateway: Gateway, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    simulator.add_arguments(parser)
    args = parser.parse_args(["--devices", "2", "--register", "--mqtt-url", MQTT_URL,
                              "--topic-prefix", topic_prefix, "--api-key", "sk_live_nope"])
    assert await simulator.run(args, asyncio.Event()) == 1
    assert "401 authentication_error: Invalid API key" in capsys.readouterr().err


async def test_gateway_simulate_runs_until_sigint_with_log_lines(
    gateway: Gateway, topic_prefix: str, api_key: str, db: asyncpg.Connection
) -> None:
    """`python -m gateway.simulator` reads the GATEWAY_* variables, registers, writes a
    status line every --status-every seconds when not on a terminal, and exits 0 on
    SIGINT."""
    env = dict(os.environ, GATEWAY_MQTT_URL=MQTT_URL, GATEWAY_API_KEY=api_key,
               GATEWAY_TOPIC_PREFIX=topic_prefix)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.simulator", "--devices", "4", "--interval", "0.3",
        "--register", "--status-every", "0.3", "--serial-prefix", "CLI-", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while "4/4 devices connected" not in (lines[-1] if lines else ""):
                lines.append((await process.stderr.readline()).decode())
        await wait_for(lambda: heard_from(db, [f"CLI-{n:06d}" for n in range(4)]))
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 0
    assert any("registered 4 devices" in line for line in lines)
    assert "heartbeats/s" in lines[-1] and lines[-1][:4].isdigit()  # a timestamped line


def test_status_is_one_line_redrawn_on_a_terminal() -> None:
    """On a terminal the status is redrawn in place (rich when installed), not logged."""
    main, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.simulator", "--devices", "2", "--interval", "0.3",
         "--topic-prefix", "pty-test", "--mqtt-url", MQTT_URL],
        stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    out = b""
    deadline = time.monotonic() + 15
    try:
        while b"2/2 devices connected" not in out and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                out += os.read(main, 65536)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        os.close(main)
    assert b"2/2 devices connected" in out
    assert b"\r" in out or b"\x1b[" in out  # drawn in place


# ---- per-device credentials -----------------------------------------------------------------


@pytest.mark.fault
async def test_devices_log_in_with_credentials_issued_through_the_registry(
    database_url: str, api_key: str, db: asyncpg.Connection
) -> None:
    """With --credentials the simulator registers each device, has the gateway issue its
    broker password (dynamic security), and connects each device as itself: the broker
    refuses anonymous clients, and the backend account it calls the registry with may
    not publish heartbeats."""
    reason = dynsec_broker.available()
    if reason is not None:
        pytest.skip(reason)
    prefix = "simdsec"
    with dynsec_broker.dynsec_broker(prefix) as broker:
        config = Config(
            mqtt_url=broker.url("gateway", broker.gateway_password), database_url=database_url,
            metrics_addr=f"127.0.0.1:{free_port()}", topic_prefix=prefix,
            client_id=f"gw-test-{uuid.uuid4().hex[:10]}", log_format="console",
            batch_wait_ms=2, drain_seconds=5, dynsec=True, command_sweep_seconds=3600.0,
            revocation_pass_seconds=3600.0, history_prune_seconds=3600.0)
        async with running_gateway(config):
            opts = options(prefix, api_key, 4, credentials=True, mqtt_url=broker.url(
                broker.backend, broker.backend_password))
            async with fleet(opts) as sim:
                assert len(sim.links()) == 4  # a connection per device
                serials = list(sim.devices)
                await wait_for(lambda: heard_from(db, serials))
                assert all(device.password for device in sim.devices.values())
                assert sim.stats.refused == 0
                assert await db.fetchval("SELECT count(*) FROM device_credentials") == 4


# ---- a large fleet --------------------------------------------------------------------------


@pytest.mark.slow
async def test_ten_thousand_devices_on_one_core(topic_prefix: str) -> None:
    """10,000 devices over 20 connections keep a 5 s pace (2,000 heartbeats/s, 33 times
    the load of the default 60 s) using well under one core."""
    opts = options(topic_prefix, None, 10_000, interval=5.0)
    async with fleet(opts) as sim:
        assert len(sim.links()) == 20
        await asyncio.sleep(1.0)
        wall, cpu, sent = time.monotonic(), time.process_time(), sim.stats.acknowledged
        await asyncio.sleep(4.0)
        seconds = time.monotonic() - wall
        rate = (sim.stats.acknowledged - sent) / seconds
        busy = (time.process_time() - cpu) / seconds
    assert 2000 * 0.85 < rate < 2000 * 1.15, rate
    assert busy < 0.5, f"{busy:.0%} of a core for {rate:.0f} heartbeats/s"
