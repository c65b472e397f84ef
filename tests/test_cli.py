"""The ``gateway`` console script (docs/protocol.md §8), run as a subprocess against the real
PostgreSQL and Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from conftest import MQTT_URL, PG_ADMIN, caller, create_key, free_port, wait_for

from gateway import auth
from gateway.config import Config, ConfigError, MqttEndpoint, load
from gateway.errors import AuthenticationFailed
from gateway.storage import Storage

_SCRIPT = Path(sys.executable).with_name("gateway")
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway.cli"]
KEY_LINE = re.compile(r"^sk_live_[A-Za-z0-9]+_[A-Za-z0-9]+$")


def clean_env(**variables: str) -> dict[str, str]:
    """The test's environment without any GATEWAY_* variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(variables)
    return env


async def gateway_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the console script to completion: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *GATEWAY, *args, env=env if env is not None else clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def http_get(addr: str, path: str) -> tuple[int, str]:
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
    head, _, body = data.partition("\r\n\r\n")
    return int(head.split()[1]), body


@contextlib.asynccontextmanager
async def running(database_url: str, prefix: str, metrics_addr: str
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    """``gateway run`` against the real services, healthy (``/healthz`` 200) on entry."""
    process = await asyncio.create_subprocess_exec(
        *GATEWAY, "run", "--database-url", database_url, "--mqtt-url", MQTT_URL,
        "--metrics-addr", metrics_addr, "--topic-prefix", prefix,
        "--client-id", "",  # a clean session: nothing stays behind on the broker
        "--log-level", "warning",
        env=clean_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )

    async def healthy() -> bool:
        if process.returncode is not None:
            raise AssertionError(f"gateway run exited {process.returncode}")
        try:
            return (await http_get(metrics_addr, "/healthz"))[0] == 200
        except OSError:
            return False

    try:
        await wait_for(healthy, timeout=15, interval=0.05)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stopped_by(process: asyncio.subprocess.Process, signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    assert process.stderr is not None
    stderr = await asyncio.wait_for(process.stderr.read(), 15)
    return await asyncio.wait_for(process.wait(), 15), stderr.decode()


# ---- db migrate ----------------------------------------------------------------------


async def test_db_migrate_creates_a_missing_database_and_can_run_again() -> None:
    """`gateway db migrate` creates a database that does not exist, applies the schema,
    and a second run succeeds without changing anything."""
    name = f"gw_cli_{uuid.uuid4().hex[:10]}"
    url = f"{PG_ADMIN}/{name}"
    try:
        for _ in range(2):
            code, _, stderr = await gateway_cli("db", "migrate", "--database-url", url)
            assert code == 0, stderr
        conn = await asyncpg.connect(url)
        try:
            for table in ("devices", "device_settings", "commands", "api_keys"):
                assert await conn.fetchval("SELECT to_regclass($1)", table) is not None, table
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(f"{PG_ADMIN}/postgres")
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


# ---- apikey --------------------------------------------------------------------------


async def test_apikey_create_prints_a_working_key_alone_on_the_last_line(
    database_url: str,
) -> None:
    """`apikey create` prints the key alone as the last stdout line; it authenticates
    with exactly the scopes asked for."""
    code, stdout, stderr = await gateway_cli(
        "apikey", "create", "--scope", "devices:read", "--name", "x",
        "--database-url", database_url)
    assert code == 0, stderr
    key = stdout.rstrip("\n").splitlines()[-1]
    assert KEY_LINE.match(key), stdout
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        principal = await auth.authenticate(storage.keys, {"x-api-key": key})
    assert principal.scopes == frozenset({"devices:read"})


async def test_apikey_list_shows_ids_first_and_never_the_secret(database_url: str) -> None:
    """`apikey list`: one line per key, its id first, its name and scopes, and no revoked
    time for a live key; never the secret."""
    created = await asyncio.gather(
        gateway_cli("apikey", "create", "--scope", "devices:read", "--name", "reader",
                    "--database-url", database_url),
        gateway_cli("apikey", "create", "--scope", "devices:read", "--scope", "devices:write",
                    "--name", "both", "--database-url", database_url),
    )
    keys = {}
    for (code, stdout, stderr), name in zip(created, ("reader", "both"), strict=True):
        assert code == 0, stderr
        keys[name] = stdout.splitlines()[-1]
    code, stdout, stderr = await gateway_cli("apikey", "list", "--database-url", database_url)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    for name, key in keys.items():
        assert key not in stdout and key.rpartition("_")[2] not in stdout
        key_id = "key_" + key.removeprefix("sk_live_").split("_")[0]
        (line,) = [line for line in lines if line.split()[0] == key_id]
        assert name in line and "devices:read" in line
        assert ("devices:write" in line) == (name == "both")
        assert not re.search(r"\d{4}-\d\d-\d\d", line.split("\t")[-1]), line


async def test_apikey_revoke_marks_the_key_revoked_and_it_stops_working(
    database_url: str,
) -> None:
    """`apikey revoke KEY_ID`: list then shows a revoked time for it, and the key no longer
    authenticates; an id that does not exist is an error, not a traceback."""
    code, stdout, _ = await gateway_cli("apikey", "create", "--scope", "devices:write",
                                        "--name", "doomed", "--database-url", database_url)
    key = stdout.splitlines()[-1]
    key_id = "key_" + key.removeprefix("sk_live_").split("_")[0]
    code, _, stderr = await gateway_cli("apikey", "revoke", key_id,
                                        "--database-url", database_url)
    assert code == 0, stderr
    (_, listing, _), (unknown_code, _, unknown_stderr) = await asyncio.gather(
        gateway_cli("apikey", "list", "--database-url", database_url),
        gateway_cli("apikey", "revoke", "key_doesnotexist", "--database-url", database_url),
    )
    assert listing.split()[0] == key_id
    revoked = listing.strip().split("\t")[-1]
    assert re.match(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d", revoked), listing
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(storage.keys, {"x-api-key": key})
    assert unknown_code != 0
    assert "key_doesnotexist" in unknown_stderr and "Traceback" not in unknown_stderr


# ---- run: failures at start ----------------------------------------------------------


async def test_run_with_unreachable_database_exits_with_a_one_line_error() -> None:
    """An unreachable database: non-zero exit, one line on stderr, no traceback, and the
    password of the URL is not printed."""
    started = time.monotonic()
    code, _, stderr = await gateway_cli(
        "run", "--database-url", "postgresql://postgres:topsecret@127.0.0.1:1/nope",
        "--mqtt-url", MQTT_URL, "--metrics-addr", f"127.0.0.1:{free_port()}",
        "--client-id", "")
    assert code != 0
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and "topsecret" not in stderr
    assert time.monotonic() - started < 20


async def test_run_with_unreachable_broker_exits_with_a_one_line_error(
    database_url: str,
) -> None:
    """An unreachable broker: non-zero exit, one line on stderr, no traceback."""
    code, _, stderr = await gateway_cli(
        "run", "--database-url", database_url,
        "--mqtt-url", f"mqtt://gw:brokersecret@127.0.0.1:{free_port()}",
        "--metrics-addr", f"127.0.0.1:{free_port()}", "--client-id", "")
    assert code != 0
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and "brokersecret" not in stderr


async def test_run_with_metrics_address_in_use_exits_with_a_one_line_error(
    database_url: str, topic_prefix: str
) -> None:
    """The metrics port already taken: non-zero exit, one line on stderr, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, stderr = await gateway_cli(
            "run", "--database-url", database_url, "--mqtt-url", MQTT_URL,
            "--metrics-addr", f"127.0.0.1:{port}", "--topic-prefix", topic_prefix,
            "--client-id", "")
    assert code != 0
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and str(port) in stderr


async def test_apikey_on_a_database_without_the_schema_says_to_migrate() -> None:
    """`apikey list` against a database that was never migrated: a one-line hint to run
    `gateway db migrate`, no traceback."""
    name = f"gw_cli_empty_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(f"{PG_ADMIN}/postgres")
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        code, _, stderr = await gateway_cli("apikey", "list",
                                            "--database-url", f"{PG_ADMIN}/{name}")
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    assert code != 0
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "gateway db migrate" in stderr and "Traceback" not in stderr


# ---- run: the real thing -------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_exits_0_on_signal(database_url: str, topic_prefix: str,
                                     signum: signal.Signals) -> None:
    """`gateway run` against the real services, once healthy, exits 0 on SIGTERM and on
    SIGINT, without a traceback."""
    async with running(database_url, topic_prefix, f"127.0.0.1:{free_port()}") as process:
        code, stderr = await stopped_by(process, signum)
    assert code == 0, stderr
    assert "Traceback" not in stderr


async def test_metrics_count_requests_by_route_template(
    database_url: str, topic_prefix: str,
) -> None:
    """After a request, /metrics has gateway_requests_total labelled with the route
    template; the device id of the path appears in no label."""
    metrics_addr = f"127.0.0.1:{free_port()}"
    _, key = await create_key(database_url, "devices:read", "devices:write")
    async with running(database_url, topic_prefix, metrics_addr) as process, \
            caller(topic_prefix, key) as api:
        status, _ = await api.call("GET", "/v1/devices/dev_metricsprobe")
        assert status == 404
        assert (await api.call("GET", "/v1/devices"))[0] == 200
        status, text = await http_get(metrics_addr, "/metrics")
        code, _ = await stopped_by(process, signal.SIGTERM)
    assert status == 200 and code == 0
    assert re.search(r'^gateway_requests_total\{route="/v1/devices/\{id\}",status="404"\} 1\.0$',
                     text, re.M), text
    assert re.search(r'^gateway_requests_total\{route="/v1/devices",status="200"\} 1\.0$',
                     text, re.M)
    assert "dev_metricsprobe" not in text
    assert re.search(r'^gateway_request_duration_seconds_count\{route="/v1/devices/\{id\}"\}',
                     text, re.M)


# ---- configuration -------------------------------------------------------------------


async def test_database_url_flag_wins_over_the_environment(database_url: str) -> None:
    """GATEWAY_DATABASE_URL is read (an unreachable one fails), and --database-url wins
    over it."""
    unreachable = "postgresql://postgres@127.0.0.1:1/nope"
    (env_code, _, env_stderr), (flag_code, _, flag_stderr) = await asyncio.gather(
        gateway_cli("apikey", "list", env=clean_env(GATEWAY_DATABASE_URL=unreachable)),
        gateway_cli("apikey", "list", "--database-url", database_url,
                    env=clean_env(GATEWAY_DATABASE_URL=unreachable)),
    )
    assert env_code != 0 and "127.0.0.1:1" in env_stderr
    assert flag_code == 0, flag_stderr


def test_config_comes_from_the_environment_and_flags_win() -> None:
    """Every variable of docs/protocol.md §8 (Configuration) is read; a flag of the same
    name overrides it; unset → default."""
    environ = {
        "GATEWAY_MQTT_URL": "mqtts://broker.example:8883",
        "GATEWAY_DATABASE_URL": "postgresql://gw@db.example/gateway",
        "GATEWAY_METRICS_ADDR": "0.0.0.0:9200",
        "GATEWAY_TOPIC_PREFIX": "acme",
        "GATEWAY_SHARE_GROUP": "gw",
        "GATEWAY_LOG_FORMAT": "console",
    }
    cfg = load(environ, {})
    assert (cfg.mqtt_url, cfg.database_url, cfg.metrics_addr, cfg.topic_prefix,
            cfg.share_group, cfg.log_format) == (
        "mqtts://broker.example:8883", "postgresql://gw@db.example/gateway", "0.0.0.0:9200",
        "acme", "gw", "console")
    assert cfg.mqtt.tls and cfg.mqtt.port == 8883
    assert cfg.topic("devices/SN1/heartbeat") == "acme/devices/SN1/heartbeat"
    assert cfg.subscription("api/v1/requests") == "$share/gw/acme/api/v1/requests"
    flags = load(environ, {"topic_prefix": "other", "log_format": "json",
                           "mqtt_url": "mqtt://127.0.0.1:1884", "share_group": None})
    assert (flags.topic_prefix, flags.log_format, flags.mqtt_url, flags.share_group) == (
        "other", "json", "mqtt://127.0.0.1:1884", "gw")
    defaults = load({}, {"log_format": "json"})
    assert (defaults.mqtt_url, defaults.database_url, defaults.metrics_addr,
            defaults.topic_prefix, defaults.share_group) == (
        "mqtt://127.0.0.1:1883", "postgresql://postgres@127.0.0.1:5432/gateway",
        "127.0.0.1:9108", "", None)


def test_presence_and_events_settings_are_numbers_above_zero() -> None:
    """GATEWAY_OFFLINE_AFTER_SECONDS and GATEWAY_EVENTS_RETENTION_DAYS take decimals, flags
    win, and anything not above 0 is a configuration error naming the setting."""
    cfg = load({"GATEWAY_OFFLINE_AFTER_SECONDS": "1.5", "GATEWAY_EVENTS_RETENTION_DAYS": "30"},
               {"log_format": "json"})
    assert (cfg.offline_after_seconds, cfg.events_retention_days) == (1.5, 30.0)
    assert cfg.presence_sweep_seconds == 0.5
    assert load({}, {"log_format": "json"}).presence_sweep_seconds == 30.0
    flags = load({"GATEWAY_OFFLINE_AFTER_SECONDS": "1.5"},
                 {"log_format": "json", "offline_after_seconds": 60.0})
    assert (flags.offline_after_seconds, flags.presence_sweep_seconds) == (60.0, 10.0)
    for variable, value, says in [
        ("GATEWAY_OFFLINE_AFTER_SECONDS", "0", "offline threshold"),
        ("GATEWAY_OFFLINE_AFTER_SECONDS", "soon", "GATEWAY_OFFLINE_AFTER_SECONDS"),
        ("GATEWAY_EVENTS_RETENTION_DAYS", "-1", "events retention"),
        ("GATEWAY_EVENTS_RETENTION_DAYS", "nan", "GATEWAY_EVENTS_RETENTION_DAYS"),
    ]:
        with pytest.raises(ConfigError, match=says):
            load({variable: value}, {"log_format": "json"})


def test_config_repr_never_shows_a_password() -> None:
    """repr/str of the config (and of the broker endpoint) hide the URLs' passwords,
    however they are spelled."""
    cases = [
        ("mqtt://gw:hunter2@broker:1883", "postgresql://gw:pgsecret@db/gateway",
         ["hunter2", "pgsecret"]),
        ("mqtts://gw:p%40ss%3Aw0rd@broker", "postgresql://:lonely-secret@db/gateway",
         ["p%40ss%3Aw0rd", "p@ss:w0rd", "lonely-secret"]),
        ("mqtt://u:a:b:c@broker", "postgresql://gw:x@y@db:5432/gateway",
         ["a:b:c", "x@y"]),
        ("mqtt://127.0.0.1", "postgresql://gw@db/gateway?password=query-secret&sslmode=require",
         ["query-secret"]),
    ]
    for mqtt_url, database_url, secrets in cases:
        cfg = Config(mqtt_url=mqtt_url, database_url=database_url)
        for text in (repr(cfg), str(cfg), repr(cfg.mqtt), str(cfg.mqtt)):
            for secret in secrets:
                assert secret not in text, (secret, text)
        assert "broker" in repr(cfg) or "127.0.0.1" in repr(cfg)
    endpoint = MqttEndpoint.parse("mqtt://gw:hunter2@broker")
    assert endpoint.password == "hunter2" and "hunter2" not in repr(endpoint)


def test_config_errors_do_not_show_a_password() -> None:
    """A bad URL is reported without the password that was in it."""
    with pytest.raises(ConfigError) as bad_scheme:
        Config(mqtt_url="http://gw:hunter2@broker")
    with pytest.raises(ConfigError) as bad_port:
        Config(mqtt_url="mqtt://gw:hunter2@broker:notaport")
    for error in (bad_scheme, bad_port):
        assert "hunter2" not in str(error.value)
