"""No silent failures: what the gateway logs when it starts, drops, rejects or is knocked
off (docs/operations.md, Logs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest
from conftest import (
    MQTT_HOST,
    MQTT_PORT,
    MQTT_URL,
    NODELAY,
    Caller,
    free_port,
    wait_for,
)
from gateway_codecs.device import DecodeError, decode_heartbeat
from processes import GatewayProcess
from sync_support import metric, now_ms, register

from gateway import logs
from gateway.app import Gateway
from gateway.config import Config, ConfigError

_SCRIPT = Path(sys.executable).with_name("gateway")
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway.cli"]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_library_log_records_come_out_as_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """aiomqtt's and asyncpg's own records (stdlib logging) go through the same renderer
    as the gateway's: one JSON object per line, with level and logger."""
    logs.configure("json", "info")
    try:
        logging.getLogger("mqtt").warning("Could not gracefully disconnect: %d", 4)
        logging.getLogger("asyncpg.pool").error("connection lost")
        logging.getLogger("mqtt").debug("below the level: not shown")
        records = json_lines(capsys.readouterr().err)
    finally:
        logs.configure("console", "warning")
    assert [(r["logger"], r["level"], r["event"]) for r in records] == [
        ("mqtt", "warning", "Could not gracefully disconnect: 4"),
        ("asyncpg.pool", "error", "connection lost"),
    ]
    assert all("timestamp" in r for r in records)


async def test_one_ready_line_names_broker_database_and_metrics(
    database_url: str, topic_prefix: str
) -> None:
    """`gateway run` logs `gateway.ready` once connected: the broker, the database with
    its password masked, the metrics address."""
    secret_url = database_url.replace("postgres@", "postgres:pw-secret@")
    metrics_addr = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = await asyncio.create_subprocess_exec(
        *GATEWAY, "run", "--database-url", secret_url, "--mqtt-url", MQTT_URL,
        "--metrics-addr", metrics_addr, "--topic-prefix", topic_prefix, "--client-id", "",
        "--log-format", "json", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(15):
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "gateway run ended before it was ready"
                if '"gateway.ready"' in line:
                    break
    finally:
        process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(process.stderr.read(), 15)).decode()
        code = await asyncio.wait_for(process.wait(), 15)
    ready = json.loads(line)
    assert ready["broker"] == MQTT_URL
    assert ready["database"] == database_url.replace("postgres@", "postgres:***@")
    assert ready["metrics"] == f"http://{metrics_addr}/metrics"
    assert "pw-secret" not in line + rest
    assert code == 0
    assert [r["event"] for r in json_lines(rest)].count("gateway.ready") == 0


async def test_requests_without_a_reply_topic_are_dropped_with_rate_limited_warnings(
    gateway: Gateway, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Thirty requests nobody can be answered for: each is counted, and the log says so,
    at most 20 times in 10 s."""
    before = metric("gateway_requests_dropped_total", reason="no_reply_topic")
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, socket_options=NODELAY,
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        for _ in range(30):
            await client.publish(f"{topic_prefix}/api/v1/requests",
                                 b'{"method": "GET", "path": "/v1/devices"}', qos=1)
    await wait_for(lambda: metric("gateway_requests_dropped_total",
                                  reason="no_reply_topic") == before + 30)
    warned = capsys.readouterr().err.count("request.dropped")
    assert 1 <= warned <= 20


async def test_a_ts_in_seconds_is_warned_about_once(
    gateway: Gateway, api: Caller, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device that sends `ts` in seconds gets its heartbeats ignored as stale behind any
    millisecond one: the gateway says why, once a minute at most."""
    device = await register(api, "SN-SECONDS")
    before = metric("gateway_heartbeats_received_total")
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, socket_options=NODELAY) as client:
        for offset in (0, 1):
            await client.publish(f"{topic_prefix}/devices/{device['serial_number']}/heartbeat",
                                 msgspec.json.encode({"ts": int(time.time()) + offset}), qos=1)
        await client.publish(f"{topic_prefix}/devices/{device['serial_number']}/heartbeat",
                             msgspec.json.encode({"ts": now_ms()}), qos=1)
    await wait_for(lambda: metric("gateway_heartbeats_received_total") >= before + 3)
    assert capsys.readouterr().err.count("heartbeat.ts_in_seconds") == 1


@pytest.mark.parametrize(("payload", "says"), [
    (b"hello", "neither a JSON object nor a MessagePack map"),
    (b"12345", "neither a JSON object nor a MessagePack map"),
    (b"[1, 2]", "a JSON array, not an object"),
])
def test_a_heartbeat_that_is_no_object_says_so(payload: bytes, says: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_heartbeat(payload)
    assert says in str(caught.value)
    assert "Expected" not in str(caught.value)


async def test_a_client_id_taken_over_is_an_error_naming_cause_and_fix(
    gateway: Gateway, config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another client that keeps connecting with the gateway's client id knocks it off
    again and again: the gateway logs an error that names the likely cause and the fix
    (Mosquitto 2.0 closes the socket without a reason code, so the gateway recognises the
    pattern: connections closed right after they were made)."""
    seen = ""

    def logged() -> bool:
        nonlocal seen
        seen += capsys.readouterr().err
        return "mqtt.session_taken_over" in seen

    async def rogue() -> None:
        while True:
            with contextlib.suppress(aiomqtt.MqttError):
                async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=config.client_id,
                                          protocol=aiomqtt.ProtocolVersion.V5) as client:
                    async for _ in client.messages:
                        pass
            await asyncio.sleep(0.05)

    fighting = asyncio.create_task(rogue())
    try:
        await wait_for(logged, timeout=20)
    finally:
        fighting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fighting
    line = next(line for line in seen.splitlines() if "mqtt.session_taken_over" in line)
    assert "GATEWAY_CLIENT_ID" in line and "same client id" in line


def test_a_metrics_port_past_65535_is_refused() -> None:
    with pytest.raises(ConfigError, match="0 to 65535"):
        Config(metrics_addr="127.0.0.1:65536")
    assert Config(metrics_addr="127.0.0.1:65535").metrics_endpoint == ("127.0.0.1", 65535)


async def test_the_gateway_warns_once_ready_when_autovacuum_is_off(
    database_url: str, topic_prefix: str
) -> None:
    """Without autovacuum the outbox keeps every moved event as a dead row: the gateway
    says so in its log once it is ready (and not when it is on; CI clusters run with it
    off, so this checks whichever this server has)."""
    conn = await asyncpg.connect(database_url)
    try:
        autovacuum = await conn.fetchval("SHOW autovacuum")
    finally:
        await conn.close()
    gateway = GatewayProcess(mqtt_url=MQTT_URL, database_url=database_url,
                             topic_prefix=topic_prefix, client_id="autovacuum-check")
    try:
        gateway.start()
        await gateway.wait_healthy()
        await asyncio.sleep(0.5)
        lines = [json.loads(line) for line in gateway.log_path.read_text().splitlines()
                 if line.startswith("{")]
    finally:
        gateway.close()
    events = [line["event"] for line in lines]
    assert events.count("database.autovacuum_off") == (autovacuum == "off"), events
    if autovacuum == "off":
        assert events.index("database.autovacuum_off") > events.index("gateway.ready")
        [warning] = [line for line in lines if line["event"] == "database.autovacuum_off"]
        assert warning["level"] == "warning" and "event_outbox" in warning["hint"]
