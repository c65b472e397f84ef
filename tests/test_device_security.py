"""Device security: per-device broker access (Mosquitto dynamic security) and key material.

The broker tests run against a Mosquitto of their own with the dynamic security plugin,
set up with deploy/mosquitto/dynsec-setup.sh: the gateway logs in with its own account,
a backend service with another, and each device with the credentials the gateway issued.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest
from aiomqtt.exceptions import MqttConnectError
from conftest import (
    Caller,
    Device,
    create_key,
    event_published,
    free_port,
    reading,
    running_gateway,
    wait_for,
)
from dynsec_broker import DynsecBroker, available, dynsec_broker
from paho.mqtt.reasoncodes import ReasonCode

from gateway import auth, cli
from gateway.app import Gateway
from gateway.config import Config
from gateway.errors import AuthenticationFailed
from gateway.storage import Storage

# The gateway's broker role (dynsec-setup.sh) is made for this topic prefix.
PREFIX = "dsec"
V5 = aiomqtt.ProtocolVersion.V5
REVOCATION_PASS = 0.1  # seconds between the gateway's full revocation passes

# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[DynsecBroker]:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with dynsec_broker(PREFIX) as running:
        yield running


def gateway_config(broker: DynsecBroker, database_url: str, *, dynsec: bool) -> Config:
    return Config(
        mqtt_url=broker.url("gateway", broker.gateway_password),
        database_url=database_url,
        metrics_addr=f"127.0.0.1:{free_port()}",
        topic_prefix=PREFIX,
        client_id=f"gw-test-{uuid.uuid4().hex[:10]}",
        session_expiry_seconds=60,
        log_format="console",
        batch_wait_ms=2,
        drain_seconds=5,
        dynsec=dynsec,
        # Periodic work at this module's own pace, not the module defaults.
        health_interval_seconds=2.0,
        health_recheck_seconds=0.1,
        command_sweep_seconds=0.2,  # expiries found within 0.2 s
        revocation_pass_seconds=REVOCATION_PASS,
        history_prune_seconds=3600.0,
    )


@pytest.fixture
async def gw(broker: DynsecBroker, database_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_config(broker, database_url, dynsec=True)) as gateway:
        yield gateway


@contextlib.asynccontextmanager
async def backend_caller(broker: DynsecBroker, key: str) -> AsyncIterator[Caller]:
    """A backend service logged in with its own account (replies under its name only)."""
    reply_topic = f"{PREFIX}/api/v1/replies/{broker.backend}/{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(broker.host, broker.port, username=broker.backend,
                              password=broker.backend_password, protocol=V5) as client:
        [granted] = await client.subscribe(reply_topic, qos=1)
        assert not refused_code(granted)
        caller = Caller(client, PREFIX, reply_topic, key, True)
        async with reading(caller._read()):
            yield caller


@pytest.fixture
async def api(gw: Gateway, broker: DynsecBroker, api_key: str) -> AsyncIterator[Caller]:
    async with backend_caller(broker, api_key) as caller:
        yield caller


@dataclass
class Session:
    """A device logged in with its own credentials; ``reader`` ends when it is cut off."""

    device: Device
    reader: asyncio.Task[None]

    @property
    def client(self) -> aiomqtt.Client:
        return self.device.client

    async def cut_off(self, within: float = 5) -> bool:
        """True when the broker disconnects this session within ``within`` seconds."""
        done, _ = await asyncio.wait({self.reader}, timeout=within)
        return self.reader in done and isinstance(self.reader.exception(), aiomqtt.MqttError)


@contextlib.asynccontextmanager
async def device_session(broker: DynsecBroker, serial: str, password: str) -> AsyncIterator[
        Session]:
    async with aiomqtt.Client(broker.host, broker.port, username=serial, password=password,
                              identifier=f"{serial}-{uuid.uuid4().hex[:6]}",
                              protocol=V5) as client:
        granted = await client.subscribe([(f"{PREFIX}/devices/{serial}/commands", 1),
                                          (f"{PREFIX}/devices/{serial}/settings", 1)])
        assert not any(refused_code(code) for code in granted), granted
        device = Device(client, PREFIX, serial)
        session = Session(device, asyncio.create_task(device._read()))
        try:
            yield session
        finally:
            session.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await session.reader


async def refused(broker: DynsecBroker, username: str, password: str) -> bool:
    """True when the broker refuses a CONNECT with these credentials."""
    try:
        async with aiomqtt.Client(broker.host, broker.port, username=username,
                                  password=password, protocol=V5):
            return False
    except MqttConnectError:
        return True


async def admin_command(broker: DynsecBroker, command: dict[str, Any]) -> dict[str, Any]:
    """One dynamic security command as the broker's admin; its response."""
    async with aiomqtt.Client(broker.host, broker.port, username="admin",
                              password=broker.admin_password, protocol=V5) as client:
        await client.subscribe("$CONTROL/dynamic-security/v1/response", qos=1)
        command = {**command, "correlationData": "test-admin"}
        await client.publish("$CONTROL/dynamic-security/v1",
                             json.dumps({"commands": [command]}), qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                for response in msgspec.json.decode(message.payload)["responses"]:
                    if response.get("correlationData") == "test-admin":
                        return dict(response)
    raise AssertionError("no response")


def refused_code(code: int | ReasonCode) -> bool:
    """A SUBACK or PUBACK reason code that says no (MQTT 5 reason codes >= 0x80)."""
    return isinstance(code, ReasonCode) and code.is_failure


def now_ms() -> int:
    return int(time.time() * 1000)


def new_serial() -> str:
    return f"SN-{uuid.uuid4().hex[:10]}"


async def provision(api: Caller, serial: str | None = None) -> tuple[str, str, str]:
    """Register a device and issue its credentials: (device id, serial, password)."""
    serial = serial or new_serial()
    status, device = await api.call("POST", "/v1/devices", {"serial_number": serial})
    assert status == 201, device
    status, issued = await api.call("POST", f"/v1/devices/{device['id']}/credentials")
    assert status == 201, issued
    return device["id"], serial, issued["password"]


# ---- issuing and the gateway's own account ----------------------------------------------


async def test_gateway_account_carries_heartbeats_and_requests_for_a_device_with_credentials(
    api: Caller, broker: DynsecBroker, db: asyncpg.Connection
) -> None:
    """Requests and replies flow over the gateway's account; a device logged in with the
    credentials it was issued heartbeats and gets its settings; only a hash is stored."""
    serial = new_serial()
    status, device = await api.call("POST", "/v1/devices", {"serial_number": serial})
    assert status == 201
    status, issued = await api.call("POST", f"/v1/devices/{device['id']}/credentials")
    assert status == 201
    assert issued["object"] == "device_credentials"
    assert issued["device_id"] == device["id"] and issued["username"] == serial
    assert len(issued["password"]) >= 32 and issued["rotated"] is False
    assert issued["topics"] == {
        "heartbeat": f"{PREFIX}/devices/{serial}/heartbeat",
        "commands": f"{PREFIX}/devices/{serial}/commands",
        "settings": f"{PREFIX}/devices/{serial}/settings",
    }
    stored = await db.fetchval(
        "SELECT password_hash FROM device_credentials WHERE device_id = $1", device["id"]
    )
    assert stored is not None and issued["password"].encode() not in stored

    async with device_session(broker, serial, issued["password"]) as session:
        await session.device.heartbeat({"ts": now_ms(), "battery_percent": 64,
                                        "settings_version": 0})
        update = await session.device.next(session.device.settings)
        assert update["version"] == 1

    async def battery() -> bool:
        _, body = await api.call("GET", f"/v1/devices/{device['id']}")
        return bool(body["battery_percent"] == 64)

    await wait_for(battery)


async def test_issuing_again_rotates_the_password_and_drops_the_old_session(
    api: Caller, broker: DynsecBroker
) -> None:
    """A second call returns a new password; the old one is refused and its session is
    disconnected; the new one works."""
    device_id, serial, old = await provision(api)
    async with device_session(broker, serial, old) as session:
        status, issued = await api.call("POST", f"/v1/devices/{device_id}/credentials")
        assert status == 201 and issued["rotated"] is True
        assert issued["password"] != old
        assert await session.cut_off()
    assert await refused(broker, serial, old)
    async with device_session(broker, serial, issued["password"]) as session:
        assert not session.reader.done()


# ---- what a device cannot do --------------------------------------------------------------


async def test_device_cannot_publish_to_another_devices_heartbeat(
    api: Caller, broker: DynsecBroker, db: asyncpg.Connection
) -> None:
    """A heartbeat device A publishes on B's topic never reaches anyone: B's state stays
    empty while A's own heartbeat, published after it, is applied."""
    a_id, a_serial, a_password = await provision(api)
    b_id, b_serial, _ = await provision(api)
    async with aiomqtt.Client(broker.host, broker.port, username="admin",
                              password=broker.admin_password, protocol=V5) as spy:
        await spy.subscribe(f"{PREFIX}/devices/+/heartbeat", qos=1)
        async with device_session(broker, a_serial, a_password) as a:
            with contextlib.suppress(aiomqtt.MqttCodeError):  # PUBACK "not authorized"
                await a.client.publish(f"{PREFIX}/devices/{b_serial}/heartbeat",
                                       json.dumps({"ts": now_ms(), "battery_percent": 11}),
                                       qos=1)
            await a.device.heartbeat({"ts": now_ms(), "battery_percent": 22})
            # The broker forwards in order: A's own heartbeat comes after the forged one.
            seen: list[str] = []
            async with asyncio.timeout(5):
                async for message in spy.messages:
                    seen.append(message.topic.value)
                    if message.topic.value.endswith(f"/{a_serial}/heartbeat"):
                        break
            assert seen == [f"{PREFIX}/devices/{a_serial}/heartbeat"]

    await wait_for(lambda: db.fetchval(
        "SELECT battery_percent = 22 FROM device_health WHERE device_id = $1", a_id))
    b = await db.fetchrow(
        "SELECT battery_percent, last_heartbeat_at FROM device_health WHERE device_id = $1", b_id
    )
    assert b["battery_percent"] is None and b["last_heartbeat_at"] is None


async def test_device_cannot_subscribe_to_other_devices_topics(
    api: Caller, broker: DynsecBroker
) -> None:
    """SUBACK refuses B's commands and settings, wildcards over devices and '#', and A
    receives nothing of what the gateway sends B."""
    a_id, a_serial, a_password = await provision(api)
    b_id, b_serial, b_password = await provision(api)
    status, _ = await api.call("POST", f"/v1/devices/{b_id}/commands", {"type": "reboot"})
    assert status == 201
    async with device_session(broker, a_serial, a_password) as a, \
            device_session(broker, b_serial, b_password) as b:
        for topic in (f"{PREFIX}/devices/{b_serial}/commands",
                      f"{PREFIX}/devices/{b_serial}/settings",
                      f"{PREFIX}/devices/#", f"{PREFIX}/devices/+/commands", "#",
                      f"{PREFIX}/api/v1/requests"):
            [code] = await a.client.subscribe(topic, qos=1)
            assert refused_code(code), topic
        await b.device.heartbeat({"ts": now_ms(), "settings_version": 0})
        assert (await b.device.next(b.device.commands))["commands"][0]["type"] == "reboot"
        assert (await b.device.next(b.device.settings))["version"] == 1
        # Barrier: what the gateway sends A now comes behind anything of B's that reached
        # A (the broker routed B's before A heartbeats), on each of A's two topics; A's own
        # command and settings at version 2 tell them apart from B's.
        status, own = await api.call("POST", f"/v1/devices/{a_id}/commands", {"type": "locate"})
        assert status == 201
        status, _ = await api.call("PATCH", f"/v1/devices/{a_id}/settings",
                                   {"audio": {"codec": "aac"}})
        assert status == 200
        await a.device.heartbeat({"ts": now_ms(), "settings_version": 0})
        assert [c["id"] for c in (await a.device.next(a.device.commands))["commands"]] == [
            own["id"]]
        assert (await a.device.next(a.device.settings))["version"] == 2


async def test_device_cannot_publish_requests_or_replies(
    gw: Gateway, api: Caller, broker: DynsecBroker, db: asyncpg.Connection, api_key: str
) -> None:
    """Even with a valid API key, a device's request never reaches the gateway (nothing
    registered, no reply), and it cannot inject a reply into a backend's topic."""
    _, serial, password = await provision(api)
    evil = new_serial()
    async with device_session(broker, serial, password) as session:
        envelope = {"method": "POST", "path": "/v1/devices",
                    "headers": {"authorization": f"Bearer {api_key}"},
                    "body": {"serial_number": evil},
                    "reply_to": api.reply_topic, "correlation_id": "from-device"}
        with contextlib.suppress(aiomqtt.MqttCodeError):
            await session.client.publish(f"{PREFIX}/api/v1/requests",
                                         json.dumps(envelope), qos=1)
        with contextlib.suppress(aiomqtt.MqttCodeError):
            await session.client.publish(api.reply_topic, json.dumps(
                {"status": 200, "body": {}, "correlation_id": "forged"}), qos=1)
    # A later request answered means the gateway had the device's request by now, had it
    # got it (the broker hands the gateway its messages in order, and workers take them in
    # order); once none is in flight, that one is done too. The reply comes on the reply
    # topic behind a forged one, had the broker let it through.
    status, _ = await api.call("GET", "/v1/devices")
    assert status == 200
    await wait_for(lambda: gw.requests.in_flight == 0)
    assert api.unmatched == []
    assert await db.fetchval("SELECT count(*) FROM devices WHERE serial_number = $1",
                             evil) == 0


# ---- revocation ---------------------------------------------------------------------------


async def test_deleting_a_device_disconnects_it_and_refuses_its_credentials(
    api: Caller, broker: DynsecBroker, db: asyncpg.Connection
) -> None:
    """DELETE cuts the connected device off at once and it cannot log in again."""
    device_id, serial, password = await provision(api)
    async with device_session(broker, serial, password) as session:
        status, _ = await api.call("DELETE", f"/v1/devices/{device_id}")
        assert status == 200
        assert await session.cut_off(within=2)
    assert await refused(broker, serial, password)
    row = await db.fetchrow(
        "SELECT revoked_at, broker_revoked_at FROM device_credentials WHERE device_id = $1",
        device_id,
    )
    assert row["revoked_at"] is not None and row["broker_revoked_at"] is not None
    # Credentials of a deleted device are not reissued.
    status, body = await api.call("POST", f"/v1/devices/{device_id}/credentials")
    assert status == 404, body


async def test_reset_device_keeps_access_until_it_acknowledges_the_factory_reset(
    api: Caller, broker: DynsecBroker, db: asyncpg.Connection
) -> None:
    """After a reset the device still receives factory_reset; its ack cuts it off."""
    device_id, serial, password = await provision(api)
    async with device_session(broker, serial, password) as session:
        status, _ = await api.call("POST", f"/v1/devices/{device_id}/reset")
        assert status == 200
        reset_at = await db.fetchval("SELECT now()")
        await session.device.heartbeat({"ts": now_ms()})
        batch = await session.device.next(session.device.commands)
        [command] = batch["commands"]
        assert command["type"] == "factory_reset"
        # Not cut off before the ack. Barrier: a full revocation pass that started after
        # the reset has run (each pass is claimed in the sweeps table, and a claim more than
        # two periods after the reset follows a whole pass that began after it), and the
        # session still carries a round trip after it.
        await wait_for(lambda: db.fetchval(
            "SELECT next_run > $1::timestamptz + $2::float8 * interval '1 second' FROM sweeps"
            " WHERE name = 'credential_revocations'", reset_at, 3 * REVOCATION_PASS))
        await session.device.heartbeat({"ts": now_ms()})
        assert (await session.device.next(session.device.commands))["commands"] == [command]
        assert not session.reader.done()
        await session.device.heartbeat(
            {"ts": now_ms(), "acks": [{"id": command["id"], "status": "succeeded"}]}
        )
        assert await session.cut_off()
    assert await refused(broker, serial, password)
    _, acked = await api.call("GET", f"/v1/commands/{command['id']}")
    assert acked["status"] == "succeeded"
    # The device can be given new credentials once it is set up again.
    status, issued = await api.call("POST", f"/v1/devices/{device_id}/credentials")
    assert status == 201 and issued["rotated"] is False
    async with device_session(broker, serial, issued["password"]) as session:
        assert not session.reader.done()


async def test_factory_reset_that_expires_unacknowledged_revokes_the_credentials(
    api: Caller, broker: DynsecBroker
) -> None:
    """A factory_reset the device never acknowledges revokes its access when it expires."""
    device_id, serial, password = await provision(api)
    async with device_session(broker, serial, password) as session:
        cut_at: list[dt.datetime] = []
        session.reader.add_done_callback(lambda _: cut_at.append(dt.datetime.now(dt.UTC)))
        status, command = await api.call("POST", f"/v1/devices/{device_id}/commands",
                                         {"type": "factory_reset", "ttl_seconds": 1})
        assert status == 201
        assert await session.cut_off(within=5)
        # Not before the command expired (the TTL passing is what is tested).
        assert cut_at[0] >= dt.datetime.fromisoformat(command["expires_at"])
    assert await refused(broker, serial, password)


# ---- errors -------------------------------------------------------------------------------


# ---- events under the broker's access rules ----------------------------------------------


async def next_event(client: aiomqtt.Client, device_id: str, within: float = 10
                     ) -> dict[str, Any]:
    """The next event about ``device_id`` that ``client`` receives."""
    async with asyncio.timeout(within):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            event: dict[str, Any] = msgspec.json.decode(message.payload)
            if event["device_id"] == device_id:
                return event
    raise AssertionError("the subscription ended")


async def test_events_reach_backends_not_devices_and_wait_while_the_broker_refuses_them(
    api: Caller, broker: DynsecBroker, db: asyncpg.Connection
) -> None:
    """A backend's account receives events; a device's cannot subscribe to them. While the
    broker refuses the gateway's event publishes (PUBACK "not authorized"), the event stays
    unpublished in the outbox; once the rule is back it goes out and is marked published."""
    events = f"{PREFIX}/events/v1/#"
    async with aiomqtt.Client(broker.host, broker.port, username=broker.backend,
                              password=broker.backend_password, protocol=V5) as backend:
        [code] = await backend.subscribe(events, qos=1)
        assert not refused_code(code)
        device_id, serial, password = await provision(api)
        assert (await next_event(backend, device_id))["type"] == "device.registered"
        async with device_session(broker, serial, password) as session:
            [code] = await session.client.subscribe(events, qos=1)
            assert refused_code(code)

        rule = {"rolename": "gateway", "acltype": "publishClientSend",
                "topic": f"{PREFIX}/events/v1/#"}
        assert "error" not in await admin_command(broker, {"command": "removeRoleACL", **rule})
        try:
            status, _ = await api.call("POST", f"/v1/devices/{device_id}/bind",
                                       {"end_user_id": "eu_events"})
            assert status == 200
            await asyncio.sleep(2)  # two relay attempts, both refused
            assert await event_published(db, device_id, "device.bound") is False
        finally:
            assert "error" not in await admin_command(
                broker, {"command": "addRoleACL", **rule, "allow": True})
        event = await next_event(backend, device_id)
        assert event["type"] == "device.bound"
        assert event["data"]["object"]["end_user_id"] == "eu_events"
    await wait_for(lambda: event_published(db, device_id, "device.bound"))


async def test_credentials_route_errors(
    api: Caller, broker: DynsecBroker, database_url: str
) -> None:
    """404 unknown device, 403 read-only key, 400 unknown body field, 409 when the broker
    has a client of that name the gateway did not create (its own account)."""
    status, body = await api.call("POST", "/v1/devices/dev_nosuchdevice/credentials")
    assert status == 404, body
    _, device = await api.call("POST", "/v1/devices", {"serial_number": new_serial()})
    status, body = await api.call("POST", f"/v1/devices/{device['id']}/credentials",
                                  {"password": "mine"})
    assert status == 400 and body["error"]["type"] == "validation_error"
    _, read_only = await create_key(database_url, auth.READ)
    status, body = await api.call("POST", f"/v1/devices/{device['id']}/credentials",
                                  key=read_only)
    assert status == 403

    _, gateway_device = await api.call("POST", "/v1/devices", {"serial_number": "gateway"})
    status, body = await api.call("POST", f"/v1/devices/{gateway_device['id']}/credentials")
    assert status == 409 and body["error"]["type"] == "conflict", body
    assert not await refused(broker, "gateway", broker.gateway_password)
    client = await admin_command(broker, {"command": "getClient", "username": "gateway"})
    assert [role["rolename"] for role in client["data"]["client"]["roles"]] == ["gateway"]


async def test_credentials_need_dynamic_security(
    broker: DynsecBroker, database_url: str, api_key: str
) -> None:
    """Without GATEWAY_DYNSEC the route answers 409 and says why."""
    config = gateway_config(broker, database_url, dynsec=False)
    async with running_gateway(config), backend_caller(broker, api_key) as caller:
        _, device = await caller.call("POST", "/v1/devices", {"serial_number": new_serial()})
        status, body = await caller.call("POST", f"/v1/devices/{device['id']}/credentials")
    assert status == 409
    assert "dynamic security" in body["error"]["message"]


# ---- key material -------------------------------------------------------------------------


async def test_api_keys_are_compared_in_constant_time(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check, valid or not, known id or not, goes through hmac.compare_digest on
    sha256 digests: no early-exit comparison tells a caller how much of a key matched."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # gateway.auth calls it through hmac
    key_id, secret = await create_key(database_url, auth.READ)
    wrong = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
    unknown = auth.KEY_PREFIX + "nosuchkeyid0_" + "x" * 32
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        principal = await auth.authenticate(storage.keys, {"authorization": f"Bearer {secret}"})
        assert principal.key_id == key_id
        for presented in (wrong, unknown):
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(storage.keys, {"x-api-key": presented})
    assert [presented for presented, _ in compared] == [
        auth.hash_key(secret), auth.hash_key(wrong), auth.hash_key(unknown)
    ]
    assert all(len(a) == len(b) == 32 for a, b in compared)
    assert compared[2][1] == b"\0" * 32  # unknown id: compared against a dummy all the same


def _cli(*argv: str) -> int:
    return cli.main([*argv, "--log-format", "console", "--log-level", "warning"])


async def test_apikey_is_shown_once_and_never_listed(
    database_url: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`apikey create` prints the key once (last line); only its sha256 is stored;
    `apikey list` shows the id and never the secret or its hash."""
    monkeypatch.setenv("GATEWAY_DATABASE_URL", database_url)
    assert await asyncio.to_thread(_cli, "apikey", "create", "--scope", auth.READ,
                                   "--name", "ci") == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    key_id = auth.key_id_of(secret)
    assert key_id is not None
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert bytes(row["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert all(secret not in str(value) for value in row.values())

    assert await asyncio.to_thread(_cli, "apikey", "list") == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "ci" in listing
    assert secret not in listing
    assert secret.rsplit("_", 1)[1] not in listing
    assert bytes(row["key_hash"]).hex() not in listing


async def test_database_dump_holds_no_key_material(
    api: Caller, database_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pg_dump of the database has the keys' and credentials' rows but no API key secret
    and no device password, in clear or hex."""
    monkeypatch.setenv("GATEWAY_DATABASE_URL", database_url)
    assert await asyncio.to_thread(_cli, "apikey", "create", "--scope", auth.WRITE) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    device_id, _, password = await provision(api)
    dump_process = await asyncio.create_subprocess_exec(
        "pg_dump", "--no-owner", database_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(dump_process.communicate(), 30)
    assert dump_process.returncode == 0, err.decode()
    dump = out.decode()
    assert str(auth.key_id_of(secret)) in dump and device_id in dump  # the rows are there
    for material in (secret, secret.rsplit("_", 1)[1], password, api.key or ""):
        assert material and material not in dump
        assert material.encode().hex() not in dump
