"""Events and presence (docs/protocol.md §11, §12): every change records its event in its
own transaction, the relay publishes it on ``events/v1/{type}`` at least once and in
commit order per device, and ``GET /v1/events`` lets a consumer catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import re
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest
from conftest import (
    EVENTS_RECORDED_SQL,
    MQTT_HOST,
    MQTT_PORT,
    NODELAY,
    Caller,
    caller,
    create_key,
    reading,
    running_gateway,
    wait_for,
)
from sync_support import handled, metric, now_ms, register, settled, sim_device

from gateway import auth
from gateway.app import Gateway
from gateway.config import Config
from gateway.routes import new_id
from gateway.storage import Storage
from gateway.storage.devices import NewDevice
from gateway.storage.events import NewEvent, record

EVENT_ID = re.compile(r"^evt_[0-9]{20}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Tap:
    """A consumer subscribed to every event topic under the prefix."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.topics: list[str] = []

    async def _read(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            self.events.append(msgspec.json.decode(message.payload))
            self.topics.append(message.topic.value)

    def of(self, device_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["device_id"] == device_id]

    def types(self, device_id: str) -> list[str]:
        return [e["type"] for e in self.of(device_id)]


@contextlib.asynccontextmanager
async def tap(prefix: str, host: str = MQTT_HOST, port: int = MQTT_PORT
              ) -> AsyncIterator[Tap]:
    async with aiomqtt.Client(host, port, socket_options=NODELAY,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"{prefix}/events/v1/#", qos=1)
        consumer = Tap(client)
        async with reading(consumer._read()):
            yield consumer


async def listed(api: Caller, **query: str) -> dict[str, Any]:
    status, body = await api.call("GET", "/v1/events", query=query)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def all_events(api: Caller, **query: str) -> list[dict[str, Any]]:
    """Every event the route lists (paging with ``after``), oldest first."""
    found: list[dict[str, Any]] = []
    while True:
        page = await listed(api, limit="1000", **query,
                            **({"after": found[-1]["id"]} if found else {}))
        found.extend(page["data"])
        if not page["has_more"]:
            return found


async def types_of(api: Caller, device_id: str) -> list[str]:
    return [e["type"] for e in await all_events(api, device_id=device_id)]


async def types_when(api: Caller, device_id: str, count: int) -> list[str]:
    """The types listed for the device once at least ``count`` are: the relay moves an
    event into the log a moment after its transaction commits."""
    async def enough() -> list[str] | None:
        types = await types_of(api, device_id)
        return types if len(types) >= count else None

    return await wait_for(enough, 10)  # type: ignore[no-any-return]


async def call_ok(api: Caller, method: str, path: str, body: Any = None,
                  status: int = 200) -> dict[str, Any]:
    got, reply = await api.call(method, path, body)
    assert got == status, reply
    return reply  # type: ignore[no-any-return]


async def published(consumer: Tap, device_id: str, count: int) -> list[dict[str, Any]]:
    await wait_for(lambda: len(consumer.of(device_id)) >= count, 10)
    return consumer.of(device_id)


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exits:
        yield exits


# ---- every event type, from its route or device action --------------------------------------


async def test_each_registry_change_records_its_event_with_the_object_after_it(
    api: Caller, gateway: Gateway, topic_prefix: str
) -> None:
    async with tap(topic_prefix) as consumer:
        dev = await register(api, "SN-EV-1", metadata={"site": "a"})
        path = f"/v1/devices/{dev['id']}"
        await call_ok(api, "PATCH", path, {"metadata": {"site": "b"}})
        await call_ok(api, "PATCH", path, {"metadata": {"site": "b"}})  # no change
        await call_ok(api, "POST", f"{path}/bind", {"end_user_id": "user-1"})
        await call_ok(api, "POST", f"{path}/bind", {"end_user_id": "user-1"})  # no change
        await call_ok(api, "PATCH", f"{path}/settings", {"audio": {"bitrate_kbps": 64}})
        await call_ok(api, "PATCH", f"{path}/settings", {"audio": {"bitrate_kbps": 64}})
        command = await call_ok(api, "POST", f"{path}/commands", {"type": "reboot"}, 201)
        await call_ok(api, "POST", f"/v1/commands/{command['id']}/cancel")
        await call_ok(api, "POST", f"{path}/unbind")
        await call_ok(api, "POST", f"{path}/unbind")  # no change
        await call_ok(api, "POST", f"{path}/bind", {"end_user_id": "user-2"})
        await call_ok(api, "POST", f"{path}/reset")
        await call_ok(api, "DELETE", path)
        await call_ok(api, "POST", f"{path}/restore")
        expected = [
            "device.registered", "device.updated", "device.bound", "device.settings_changed",
            "command.created", "command.canceled", "device.unbound", "device.bound",
            "device.unbound", "device.reset", "command.created", "device.deleted",
            "device.restored",
        ]
        assert await types_when(api, dev["id"], len(expected)) == expected
        live = await published(consumer, dev["id"], len(expected))

    events = await all_events(api, device_id=dev["id"])
    # Published as listed: the same events, in the same order, each on its type's topic.
    assert live == events
    assert all(topic == f"{topic_prefix}/events/v1/{event['type']}"
               for topic, event in zip(consumer.topics, consumer.events, strict=True))
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    for event in events:
        assert EVENT_ID.match(event["id"]) and TIMESTAMP.match(event["created_at"])
        assert event["object"] == "event" and event["device_id"] == dev["id"]
        assert event["data"]["object"]["object"] in ("device", "command")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event["data"]["object"])
    assert by_type["device.registered"][0]["metadata"] == {"site": "a"}
    assert by_type["device.updated"][0]["metadata"] == {"site": "b"}
    assert by_type["device.bound"][0]["end_user_id"] == "user-1"
    assert by_type["device.bound"][1]["end_user_id"] == "user-2"
    assert by_type["device.settings_changed"][0]["settings"]["audio"]["bitrate_kbps"] == 64
    created, reset_command = by_type["command.created"]
    assert created["id"] == command["id"] and created["status"] == "pending"
    assert reset_command["type"] == "factory_reset"
    assert by_type["command.canceled"][0]["status"] == "canceled"
    assert all(d["status"] == "unbound" for d in by_type["device.unbound"])
    assert by_type["device.reset"][0]["status"] == "unbound"
    assert by_type["device.restored"][0]["id"] == dev["id"]
    # The device object is the one the routes answer with.
    assert by_type["device.restored"][0] == await call_ok(api, "GET", path)


async def test_vendor_upsert_and_batch_registration_record_registrations(
    api: Caller, gateway: Gateway
) -> None:
    upsert = {"identifier": "SN-EV-T", "type": "bota_pin_v1", "properties": {"a": 1}}
    created = await call_ok(api, "POST", "/api/ext-v1/device", upsert)
    await call_ok(api, "POST", "/api/ext-v1/device", {**upsert, "properties": {"b": 2}})
    assert await types_when(api, created["deviceId"], 2) == [
        "device.registered", "device.updated"]

    existing = await register(api, "SN-EV-B0")
    status, body = await api.call("POST", "/v1/devices/batch", {"devices": [
        {"serial_number": "SN-EV-B0"}, {"serial_number": "SN-EV-B1"},
        {"serial_number": "SN-EV-B2"}, {"serial_number": "bad serial!"},
    ]})
    assert status == 200, body
    made = [item["device"]["id"] for item in body["data"] if item["status"] == 201]
    assert len(made) == 2
    for device_id in made:
        await types_when(api, device_id, 1)
    registrations = await all_events(api, type="device.registered")
    assert [e["device_id"] for e in registrations][-3:] == [existing["id"], *made]
    assert await types_of(api, existing["id"]) == ["device.registered"]


async def test_device_actions_record_online_settings_applied_and_command_events(
    api: Caller, gateway: Gateway, topic_prefix: str
) -> None:
    outcomes = ("succeeded", "failed", "rejected")
    ts = now_ms()

    async def beat(sim: Any, **fields: Any) -> None:
        nonlocal ts
        ts += 1
        before = handled()
        await sim.heartbeat({"ts": ts, **fields})
        await settled(before)

    async with tap(topic_prefix) as consumer, sim_device(topic_prefix, "SN-EV-D") as sim:
        dev = await register(api, "SN-EV-D")
        path = f"/v1/devices/{dev['id']}"
        commands = [
            await call_ok(api, "POST", f"{path}/commands", {"type": f"do_{outcome}"}, 201)
            for outcome in outcomes
        ]
        await beat(sim, settings_version=1)  # online; delivers the three commands
        await sim.next(sim.commands)
        await beat(sim, settings_version=1)  # delivered again: no second delivered event
        await sim.next(sim.commands)
        await beat(sim, acks=[{"id": c["id"], "status": outcome, "detail": outcome}
                              for c, outcome in zip(commands, outcomes, strict=True)])
        await call_ok(api, "PATCH", f"{path}/settings", {"power": {"auto_sleep_minutes": 5}})
        await beat(sim, settings_version=1)  # still behind: not applied
        await beat(sim, settings_version=2)  # applied
        await beat(sim, settings_version=2)  # already applied: nothing new
        types = await types_when(api, dev["id"], 14)
        assert [e["type"] for e in await published(consumer, dev["id"], len(types))] == types
    assert types == [
        "device.registered", "command.created", "command.created", "command.created",
        "device.online", "device.settings_applied",  # the first report of version 1
        "command.delivered", "command.delivered", "command.delivered",
        "command.succeeded", "command.failed", "command.rejected",
        "device.settings_changed", "device.settings_applied",
    ]
    events = await all_events(api, device_id=dev["id"])
    online = next(e for e in events if e["type"] == "device.online")["data"]["object"]
    assert online["connectivity"] == "online" and online["last_heartbeat_at"] is not None
    delivered = [e["data"]["object"] for e in events if e["type"] == "command.delivered"]
    assert [c["id"] for c in delivered] == [c["id"] for c in commands]
    assert all(c["status"] == "delivered" and c["attempts"] == 1 for c in delivered)
    for outcome, command in zip(outcomes, commands, strict=True):
        [finished] = [e["data"]["object"] for e in events if e["type"] == f"command.{outcome}"]
        assert finished["id"] == command["id"]
        assert finished["status"] == outcome and finished["result"] == {"detail": outcome}
    first, second = [e["data"]["object"] for e in events
                     if e["type"] == "device.settings_applied"]
    assert first["settings"]["power"]["auto_sleep_minutes"] == 30  # the defaults
    assert second["settings"]["power"]["auto_sleep_minutes"] == 5


async def test_the_expiry_sweep_records_command_expired(
    config: Config, api_key: str, topic_prefix: str
) -> None:
    async with running_gateway(dataclasses.replace(config, command_sweep_seconds=0.1)), \
            caller(topic_prefix, api_key) as api:
        dev = await register(api, "SN-EV-X")
        command = await call_ok(api, "POST", f"/v1/devices/{dev['id']}/commands",
                                {"type": "reboot", "ttl_seconds": 1}, 201)
        await wait_for(lambda: _has(api, dev["id"], "command.expired"), 10)
        [expired] = await all_events(api, type="command.expired", device_id=dev["id"])
    assert expired["data"]["object"]["id"] == command["id"]
    assert expired["data"]["object"]["status"] == "expired"


async def _has(api: Caller, device_id: str, event_type: str) -> bool:
    return event_type in await types_of(api, device_id)


# ---- presence ---------------------------------------------------------------------------------


async def test_presence_goes_online_offline_and_back_with_events_filter_and_gauge(
    config: Config, api_key: str, topic_prefix: str
) -> None:
    quick = dataclasses.replace(config, offline_after_seconds=1.0)  # swept every 0.5 s
    async with running_gateway(quick), caller(topic_prefix, api_key) as api:
        dev = await register(api, "SN-EV-P")
        never = await register(api, "SN-EV-P-NEVER")
        path = f"/v1/devices/{dev['id']}"
        assert (await call_ok(api, "GET", path))["connectivity"] == "unknown"

        async with sim_device(topic_prefix, "SN-EV-P") as sim:
            before = handled()
            await sim.heartbeat({"ts": now_ms()})
            await settled(before)
            assert (await call_ok(api, "GET", path))["connectivity"] == "online"
            assert await _connectivity(api, "online") == [dev["id"]]
            await wait_for(lambda: _has(api, dev["id"], "device.offline"), 10)
            assert (await call_ok(api, "GET", path))["connectivity"] == "offline"
            assert await _connectivity(api, "offline") == [dev["id"]]
            assert await _connectivity(api, "unknown") == [never["id"]]
            await wait_for(lambda: metric("gateway_devices", connectivity="offline") == 1, 10)
            assert metric("gateway_devices", connectivity="unknown") == 1
            assert metric("gateway_devices", connectivity="online") == 0

            before = handled()
            await sim.heartbeat({"ts": now_ms()})
            await settled(before)
            assert (await call_ok(api, "GET", path))["connectivity"] == "online"
        events = await all_events(api, device_id=dev["id"])
    assert [e["type"] for e in events] == [
        "device.registered", "device.online", "device.offline", "device.online"]
    assert events[2]["data"]["object"]["connectivity"] == "offline"
    assert events[3]["data"]["object"]["connectivity"] == "online"


async def test_a_large_silence_is_swept_in_parts_each_saying_what_is_left(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Devices gone silent together are marked offline at most ``most`` per call, each call
    reporting how many are left, until none is: every one gets its device.offline."""
    ids = [new_id("dev_") for _ in range(6)]
    async with Storage.open(database_url, min_size=1, max_size=1, offline_after=60) as storage:
        await storage.devices.register_batch(
            [NewDevice(i, f"SN-EV-SILENT-{n}") for n, i in enumerate(ids)])
        await db.execute(
            "UPDATE device_health SET last_heartbeat_at = now() - interval '1 hour',"
            " online_since = now() - interval '1 hour' WHERE device_id = ANY($1::text[])", ids)
        fleet, marked, left = await storage.presence.sweep(chunk=2, most=4)
        assert (fleet.offline, marked, left) == (6, 4, 2)
        _, marked, left = await storage.presence.sweep(chunk=2, most=4)
        assert (marked, left) == (2, 0)
        _, marked, left = await storage.presence.sweep(chunk=2, most=4)
        assert (marked, left) == (0, 0)
    offline = await db.fetchval(
        "SELECT count(*) FROM (SELECT device_id FROM event_outbox WHERE type = 'device.offline'"
        " UNION ALL SELECT device_id FROM events WHERE type = 'device.offline') e"
        " WHERE device_id = ANY($1::text[])", ids)
    assert offline == 6


async def _connectivity(api: Caller, connectivity: str) -> list[str]:
    status, body = await api.call("GET", "/v1/devices", query={"connectivity": connectivity})
    assert status == 200, body
    return [d["id"] for d in body["data"]]


async def test_a_bad_connectivity_filter_is_400(api: Caller) -> None:
    status, body = await api.call("GET", "/v1/devices", query={"connectivity": "away"})
    assert status == 400 and body["error"]["details"][0]["field"] == "connectivity", body


# ---- nothing without a commit -----------------------------------------------------------------


async def test_a_refused_or_rolled_back_change_records_no_event(
    api: Caller, gateway: Gateway, database_url: str, db: asyncpg.Connection
) -> None:
    dev = await register(api, "SN-EV-R")
    path = f"/v1/devices/{dev['id']}"
    await call_ok(api, "POST", f"{path}/commands", {"type": "factory_reset"}, 201)
    before = await db.fetchval(EVENTS_RECORDED_SQL)
    # Refused inside their transactions, after the change had begun.
    status, _ = await api.call("POST", f"{path}/commands", {"type": "factory_reset"})
    assert status == 409  # the second open reset fails on the unique index
    status, _ = await api.call("PATCH", f"{path}/settings", {"audio": {"bitrate_kbps": 96}},
                               headers={"if-match": "7"})
    assert status == 409
    await call_ok(api, "POST", f"{path}/bind", {"end_user_id": "a"})
    status, _ = await api.call("POST", f"{path}/bind", {"end_user_id": "b"})
    assert status == 409
    assert await db.fetchval(EVENTS_RECORDED_SQL) == before + 1  # the first bind

    # An event recorded in a transaction that then rolls back is gone with it.
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        device = await storage.devices.get(dev["id"])
        with pytest.raises(RuntimeError):
            async with storage.db.transaction() as conn:
                await record(conn, [NewEvent("device.updated", device)])
                raise RuntimeError("the change failed")
    assert await db.fetchval(EVENTS_RECORDED_SQL) == before + 1


# ---- catching up ----------------------------------------------------------------------------


async def test_a_consumer_catches_up_from_the_last_id_it_saw(
    api: Caller, gateway: Gateway
) -> None:
    first = [await register(api, f"SN-EV-C{i}") for i in range(5)]
    seen = await listed(api, limit="3")
    assert len(seen["data"]) == 3 and seen["has_more"] is True
    later = [await register(api, f"SN-EV-C{i}") for i in range(5, 8)]
    rest = await listed(api, after=seen["data"][-1]["id"])
    assert [e["device_id"] for e in seen["data"] + rest["data"]] == [
        d["id"] for d in first + later]
    assert rest["has_more"] is False
    assert (await listed(api, after=rest["data"][-1]["id"]))["data"] == []
    # An id past the end, or one whose event is gone with retention, still marks a place.
    assert (await listed(api, after="evt_99999999999999999999"))["data"] == []
    assert len((await listed(api, after="evt_0"))["data"]) == 8
    only = await listed(api, type="device.registered", device_id=later[0]["id"])
    assert [e["device_id"] for e in only["data"]] == [later[0]["id"]]


@pytest.mark.parametrize(("query", "field"), [
    ({"after": "dev_123"}, "after"),
    ({"after": "evt_12x"}, "after"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"type": "device.exploded"}, "type"),
])
async def test_bad_event_queries_are_400_naming_the_field(
    api: Caller, query: dict[str, str], field: str
) -> None:
    status, body = await api.call("GET", "/v1/events", query=query)
    assert status == 400 and body["error"]["details"][0]["field"] == field, body


async def test_listing_events_needs_the_read_scope(gateway: Gateway, topic_prefix: str,
                                                   database_url: str) -> None:
    _, writer_only = await create_key(database_url, auth.WRITE)
    async with caller(topic_prefix, writer_only) as api:
        status, body = await api.call("GET", "/v1/events")
    assert status == 403, body


# ---- order, retention, metrics ------------------------------------------------------------


async def test_one_devices_events_come_in_commit_order_under_concurrent_writers(
    api: Caller, gateway: Gateway, topic_prefix: str, api_key: str,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Writers race on one device: settings changes guarded by if-match (each success
    sets a counter to its new version), commands created, delivered and acknowledged by
    heartbeats. Events must follow each change's commit: the counter rises by one per
    settings event, and each command goes created → delivered → succeeded."""
    consumer = await stack.enter_async_context(tap(topic_prefix))
    dev = await register(api, "SN-EV-O")
    path = f"/v1/devices/{dev['id']}"

    async def settings_writer() -> None:
        async with caller(topic_prefix, api_key) as own:
            for _ in range(15):
                status, current = await own.call("GET", f"{path}/settings")
                assert status == 200, current
                version = current["version"]
                await own.call("PATCH", f"{path}/settings",
                               {"upload": {"upload_delay_minutes": version + 1}},
                               headers={"if-match": str(version)})

    async def command_writer() -> None:
        async with caller(topic_prefix, api_key) as own:
            for _ in range(10):
                status, body = await own.call("POST", f"{path}/commands", {"type": "ping"})
                assert status == 201, body

    async def device() -> None:
        async with sim_device(topic_prefix, "SN-EV-O") as sim:
            ts = now_ms()
            acks: list[dict[str, Any]] = []
            for _ in range(40):
                ts += 1
                await sim.heartbeat({"ts": ts, "acks": acks})
                acks = []
                with contextlib.suppress(TimeoutError):
                    batch = await sim.next(sim.commands, timeout=0.05)
                    acks = [{"id": c["id"], "status": "succeeded"} for c in batch["commands"]]
            ts += 1
            await sim.heartbeat({"ts": ts, "acks": acks})

    await asyncio.gather(settings_writer(), settings_writer(), command_writer(),
                         command_writer(), device())
    events = await all_events(api, device_id=dev["id"])
    await published(consumer, dev["id"], len(events))
    assert consumer.of(dev["id"]) == events
    counters = [e["data"]["object"]["settings"]["upload"]["upload_delay_minutes"]
                for e in events if e["type"] == "device.settings_changed"]
    assert counters == list(range(2, 2 + len(counters))) and len(counters) >= 15
    stages: dict[str, list[str]] = {}
    for event in events:
        if event["type"].startswith("command."):
            stages.setdefault(event["data"]["object"]["id"], []).append(event["type"])
    assert len(stages) == 20
    for history in stages.values():
        assert history[0] == "command.created"
        assert history == sorted(history, key=["command.created", "command.delivered",
                                               "command.succeeded"].index)


async def test_published_events_are_pruned_after_the_retention_and_unpublished_kept(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Published events past the retention go; an older one not yet acknowledged (past
    event_relay.published) stays, and so does an old one still in the outbox."""
    for position, days in ((1, 8), (2, 8), (3, 1), (4, 9)):
        await db.execute(
            "INSERT INTO events (position, type, device_id, data, created_at)"
            " VALUES ($1, 'device.updated', 'dev_x', '{}', now() - $2::interval)",
            position, dt.timedelta(days=days))
    await db.execute("UPDATE event_relay SET assigned = 4, published = 3")
    await db.execute("INSERT INTO event_outbox (type, device_id, data, created_at)"
                     " VALUES ('device.updated', 'dev_x', '{}', now() - interval '9 days')")
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        assert await storage.events.prune(dt.timedelta(days=7)) == 2
    kept = await db.fetch("SELECT position FROM events ORDER BY position")
    assert [row["position"] for row in kept] == [3, 4]
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 1


async def test_published_events_are_counted_by_type(api: Caller, gateway: Gateway) -> None:
    before = metric("gateway_events_published_total", type="device.registered")
    await register(api, "SN-EV-M1")
    await register(api, "SN-EV-M2")
    await wait_for(lambda: metric("gateway_events_published_total",
                                  type="device.registered") == before + 2, 10)
