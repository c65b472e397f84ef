"""Heartbeat ingest against a real broker and database (docs/protocol.md §2).

Heartbeats land in the devices table; absent fields keep their values; a heartbeat whose
``ts`` is not newer never rolls health back but its acks count; rejections are counted by
reason and change nothing; batching never changes the outcome; nothing is lost in a burst.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest
from conftest import MQTT_HOST, MQTT_PORT, Caller, wait_for
from gateway_codecs import settings as settings_schema
from gateway_codecs.device import Heartbeat, RecordingState
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sync_support import (
    HEALTH_COLUMNS,
    command_row,
    device_row,
    handled,
    insert_devices,
    metric,
    now_ms,
    publish_burst,
    register,
    rejected,
    settled,
    sim_device,
)

from gateway.app import Gateway
from gateway.heartbeat_buffer import Pending
from gateway.routes import new_id

FULL: dict[str, Any] = {
    "firmware_version": "2.4.1",
    "battery_percent": 87,
    "storage_used_mb": 1024,
    "storage_total_mb": 32768,
    "signal_strength_dbm": -67,
    "recording_state": {
        "device_state": "recording",
        "pending_recordings": 3,
        "flags": 5,
        "connection_type": ["wifi", "ble"],
    },
}


async def applied(db: asyncpg.Connection, serial: str, ts: int) -> dict[str, Any]:
    """Wait until the device's newest applied ts is ``ts``; return its row."""

    async def check() -> dict[str, Any] | None:
        row = await device_row(db, serial)
        return row if row is not None and row["last_ts"] == ts else None

    return await wait_for(check)  # type: ignore[no-any-return]


def health(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in HEALTH_COLUMNS}


def ids(batch: dict[str, Any]) -> list[str]:
    return [command["id"] for command in batch["commands"]]


# --- landing in the table --------------------------------------------------------------


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_heartbeat_lands_in_devices_table(
    api: Caller, topic_prefix: str, db: asyncpg.Connection, msgpack: bool
) -> None:
    """A JSON or MessagePack heartbeat writes every health field and last_ts."""
    created = await register(api, "SN-HB-1")
    ts = now_ms() - 60_000
    async with sim_device(topic_prefix, "SN-HB-1") as dev:
        await dev.heartbeat({"ts": ts, **FULL}, msgpack=msgpack)
        row = await applied(db, "SN-HB-1", ts)
    assert health(row) == FULL
    status, body = await api.call("GET", f"/v1/devices/{created['id']}")
    assert status == 200
    assert {name: body[name] for name in HEALTH_COLUMNS} == FULL
    assert body["last_heartbeat_at"] is not None


@pytest.mark.parametrize("offset_ms", [-3 * 24 * 3600 * 1000, 4 * 60 * 1000],
                         ids=["device-clock-behind", "device-clock-ahead"])
async def test_last_heartbeat_at_is_receive_time_not_device_clock(
    api: Caller, topic_prefix: str, db: asyncpg.Connection, offset_ms: int
) -> None:
    """last_heartbeat_at is the gateway's clock at receipt, whatever the device's ts says."""
    await register(api, "SN-HB-CLOCK")
    ts = now_ms() + offset_ms
    before = dt.datetime.now(dt.UTC)
    async with sim_device(topic_prefix, "SN-HB-CLOCK") as dev:
        await dev.heartbeat({"ts": ts, "battery_percent": 50})
        row = await applied(db, "SN-HB-CLOCK", ts)
    after = dt.datetime.now(dt.UTC)
    seen = row["last_heartbeat_at"]
    assert before - dt.timedelta(milliseconds=50) <= seen <= after
    device_clock = dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
    assert abs((seen - device_clock).total_seconds()) > 60


async def test_last_heartbeat_at_is_when_the_gateway_received_it(
    gateway: Gateway, db: asyncpg.Connection
) -> None:
    """last_heartbeat_at is the receive time even when the write happens later."""
    await gateway.storage.devices.register(new_id("dev_"), "SN-HB-RECV", None, None, None)
    received = time.time() - 30  # e.g. held in the buffer through a database outage
    ts = now_ms()
    gateway.buffer.add("SN-HB-RECV", Pending(Heartbeat(ts=ts, battery_percent=3), received))
    row = await applied(db, "SN-HB-RECV", ts)
    assert abs(row["last_heartbeat_at"].timestamp() - received) < 0.01


async def test_partial_heartbeat_keeps_fields_it_does_not_carry(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """Absent fields leave the stored health as it was; present ones overwrite it."""
    await register(api, "SN-HB-PART")
    ts = now_ms() - 10_000
    async with sim_device(topic_prefix, "SN-HB-PART") as dev:
        await dev.heartbeat({"ts": ts, **FULL})
        await applied(db, "SN-HB-PART", ts)
        await dev.heartbeat({"ts": ts + 1, "battery_percent": 12})
        row = await applied(db, "SN-HB-PART", ts + 1)
        assert health(row) == {**FULL, "battery_percent": 12}
        await dev.heartbeat({"ts": ts + 2, "recording_state": {"device_state": "idle"},
                             "firmware_version": None})
        row = await applied(db, "SN-HB-PART", ts + 2)
    assert health(row) == {**FULL, "battery_percent": 12,
                           "recording_state": {"device_state": "idle"}}


async def test_heartbeat_without_ts_applies_and_keeps_last_ts(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """A heartbeat without ts is applied (nothing to order it by) and keeps last_ts."""
    await register(api, "SN-HB-NOTS")
    ts = now_ms() - 10_000
    async with sim_device(topic_prefix, "SN-HB-NOTS") as dev:
        await dev.heartbeat({"ts": ts, "battery_percent": 40})
        await applied(db, "SN-HB-NOTS", ts)
        await dev.heartbeat({"battery_percent": 41})

        async def battery_41() -> bool:
            row = await device_row(db, "SN-HB-NOTS")
            return row is not None and row["battery_percent"] == 41

        await wait_for(battery_41)
    row = await device_row(db, "SN-HB-NOTS")
    assert row is not None and row["last_ts"] == ts


async def test_content_type_property_decides_the_format(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """The MQTT 5 content type wins over sniffing: MessagePack labelled JSON is rejected,
    labelled MessagePack it is applied."""
    await register(api, "SN-HB-CTYPE")
    ts = now_ms() - 1000
    payload = msgspec.msgpack.encode({"ts": ts, "battery_percent": 33})
    topic = f"{topic_prefix}/devices/SN-HB-CTYPE/heartbeat"
    async with sim_device(topic_prefix, "SN-HB-CTYPE") as dev:
        count = rejected("malformed")
        await dev.client.publish(topic, payload, qos=1,
                                 properties=content_type("application/json"))
        await wait_for(lambda: rejected("malformed") == count + 1)
        await dev.client.publish(topic, payload, qos=1,
                                 properties=content_type("application/msgpack"))
        row = await applied(db, "SN-HB-CTYPE", ts)
    assert row["battery_percent"] == 33


def content_type(value: str) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.ContentType = value
    return properties


# --- ordering --------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0, -1, -60_000], ids=["same-ts", "older-by-1", "older"])
async def test_heartbeat_not_newer_keeps_health_but_processes_acks(
    api: Caller, topic_prefix: str, db: asyncpg.Connection, delta: int
) -> None:
    """A heartbeat whose ts is not newer changes no health, yet its acks complete commands."""
    created = await register(api, "SN-HB-STALE")
    status, command = await api.call("POST", f"/v1/devices/{created['id']}/commands",
                                     {"type": "reboot"})
    assert status == 201
    ts = now_ms() - 5_000
    async with sim_device(topic_prefix, "SN-HB-STALE") as dev:
        await dev.heartbeat({"ts": ts, **FULL})
        before = await applied(db, "SN-HB-STALE", ts)
        assert (await dev.next(dev.commands))["commands"][0]["id"] == command["id"]
        stale_before = metric("gateway_heartbeats_stale_total")
        await dev.heartbeat({
            "ts": ts + delta, "battery_percent": 1, "firmware_version": "0.0.1",
            "recording_state": {"device_state": "off"}, "settings_version": 0,
            "acks": [{"id": command["id"], "status": "succeeded", "detail": "done"}],
        })

        async def acked() -> bool:
            return (await command_row(db, command["id"]))["status"] == "succeeded"

        await wait_for(acked)
        # Counted once the batch is committed (or when it arrives behind a newer one).
        await wait_for(lambda: metric("gateway_heartbeats_stale_total") == stale_before + 1)
        after = await device_row(db, "SN-HB-STALE")
        assert after is not None
        assert health(after) == health(before) == FULL
        assert after["last_ts"] == ts
        assert after["last_heartbeat_at"] == before["last_heartbeat_at"]
        assert after["applied_version"] == before["applied_version"]
        # Not applied, so not answered either: no settings update, no commands. Barrier: after
        # a settings write (version 2), a newer heartbeat reporting version 1 gets the patch
        # to 2, on the same topic and behind anything the stale one got (that would be
        # version 1: it reported 0 before the write).
        status, _ = await api.call("PATCH", f"/v1/devices/{created['id']}/settings",
                                   {"audio": {"codec": "aac"}})
        assert status == 200
        await dev.heartbeat({"ts": ts + 1, "settings_version": 1})
        update = await dev.next(dev.settings)
        assert (update["version"], update["base_version"]) == (2, 1)
        assert dev.commands.empty()


async def test_duplicate_heartbeat_is_harmless(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """The same heartbeat delivered twice (QoS 1 redelivery) applies once."""
    await register(api, "SN-HB-DUP")
    ts = now_ms()
    payload = {"ts": ts, **FULL}
    async with sim_device(topic_prefix, "SN-HB-DUP") as dev:
        applied_before = metric("gateway_heartbeats_applied_total")
        stale_before = metric("gateway_heartbeats_stale_total")
        await dev.heartbeat(payload)
        await applied(db, "SN-HB-DUP", ts)
        await dev.heartbeat(payload)
        await wait_for(lambda: metric("gateway_heartbeats_stale_total") == stale_before + 1)
    assert metric("gateway_heartbeats_applied_total") == applied_before + 1
    row = await device_row(db, "SN-HB-DUP")
    assert row is not None and health(row) == FULL


async def test_late_heartbeat_in_the_same_batch_does_not_overwrite(
    gateway: Gateway, db: asyncpg.Connection
) -> None:
    """Newer then older in one batch: the older one is stale, as if they came one by one."""
    await gateway.storage.devices.register(new_id("dev_"), "SN-HB-LATE", None, None, None)
    ts = now_ms()
    received = time.time()
    before = handled()
    # Both are buffered before the writer runs: one batch, two heartbeats of one device.
    gateway.buffer.add("SN-HB-LATE", Pending(Heartbeat(ts=ts, battery_percent=90), received))
    gateway.buffer.add("SN-HB-LATE", Pending(
        Heartbeat(ts=ts - 1000, battery_percent=10, firmware_version="old",
                  signal_strength_dbm=-120, settings_version=3),
        received,
    ))
    await applied(db, "SN-HB-LATE", ts)
    await settled(before, 2)  # the late one too: applied, stale or rejected by now
    row = await device_row(db, "SN-HB-LATE")
    assert row is not None
    assert row["battery_percent"] == 90
    assert row["firmware_version"] is None
    assert row["signal_strength_dbm"] is None
    assert row["applied_version"] == 0


async def test_superseded_heartbeat_still_records_its_settings_version(
    gateway: Gateway, db: asyncpg.Connection
) -> None:
    """Two heartbeats in one batch: the older one's settings_version is not lost."""
    await gateway.storage.devices.register(new_id("dev_"), "SN-HB-SV", None, None, None)
    ts = now_ms()
    received = time.time()
    gateway.buffer.add("SN-HB-SV", Pending(Heartbeat(ts=ts, battery_percent=5,
                                                     settings_version=1), received))
    gateway.buffer.add("SN-HB-SV", Pending(Heartbeat(ts=ts + 1, battery_percent=6), received))
    await applied(db, "SN-HB-SV", ts + 1)
    row = await device_row(db, "SN-HB-SV")
    assert row is not None
    assert row["battery_percent"] == 6
    assert row["applied_version"] == 1


# --- rejections ------------------------------------------------------------------------


def _too_large(ack: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"ts": now_ms(), "battery_percent": 1, "acks": [ack],
                                "padding": "x" * 65_536})


def _malformed(ack: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"ts": now_ms(), "battery_percent": 1, "acks": [ack]})[:-1]


def _invalid(ack: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"ts": now_ms(), "battery_percent": 101, "acks": [ack]})


def _future(ack: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"ts": now_ms() + 6 * 60 * 1000, "battery_percent": 1,
                                "acks": [ack]})


def _int64(ack: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode({"ts": now_ms(), "storage_used_mb": 2**63, "acks": [ack]})


def _nul(ack: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"ts": now_ms(), "firmware_version": "1\x00", "acks": [ack]})


@pytest.mark.parametrize(
    ("reason", "payload"),
    [
        ("too_large", _too_large),
        ("malformed", _malformed),
        ("invalid", _invalid),
        ("future_ts", _future),
        ("invalid", _int64),
        ("invalid", _nul),
    ],
    ids=["too_large", "malformed", "invalid", "future_ts", "beyond-int64", "nul-character"],
)
async def test_rejected_heartbeat_is_counted_and_changes_nothing(
    api: Caller, topic_prefix: str, db: asyncpg.Connection, gateway: Gateway,
    reason: str, payload: Any,
) -> None:
    """A rejected heartbeat increments its reason's counter; health, acks, replies untouched."""
    created = await register(api, "SN-HB-REJ")
    status, command = await api.call("POST", f"/v1/devices/{created['id']}/commands",
                                     {"type": "reboot"})
    assert status == 201
    ts = now_ms() - 1000
    async with sim_device(topic_prefix, "SN-HB-REJ") as dev:
        await dev.heartbeat({"ts": ts, **FULL})
        before = await applied(db, "SN-HB-REJ", ts)
        await dev.next(dev.commands)
        count = rejected(reason)
        await dev.heartbeat(payload({"id": command["id"], "status": "succeeded"}))
        await wait_for(lambda: rejected(reason) == count + 1)
        # The gateway goes on: the next good heartbeat is applied and answered. Its answer
        # is also the barrier for the rejected one, which got nothing: it comes on the same
        # topic behind anything that got, and carries a command created only now.
        status, later = await api.call("POST", f"/v1/devices/{created['id']}/commands",
                                       {"type": "later"})
        assert status == 201
        await dev.heartbeat({"ts": ts + 1, "battery_percent": 55})
        after = await applied(db, "SN-HB-REJ", ts + 1)
        batch = await dev.next(dev.commands)
        assert batch["commands"][0]["id"] == command["id"]
        assert ids(batch) == [command["id"], later["id"]]
        assert dev.settings.empty()
    assert {**before, "battery_percent": 55, "last_ts": ts + 1,
            "last_heartbeat_at": after["last_heartbeat_at"]} == after
    stored = await command_row(db, command["id"])
    assert stored["status"] == "delivered" and stored["result"] is None


async def test_heartbeat_of_unknown_serial_is_rejected_and_creates_nothing(
    gateway: Gateway, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """A heartbeat from an unregistered serial counts as unknown_device and adds no row."""
    count = rejected("unknown_device")
    devices = await db.fetchval("SELECT count(*) FROM devices")
    async with sim_device(topic_prefix, "SN-HB-NOBODY") as dev:
        await dev.heartbeat({"ts": now_ms(), **FULL, "settings_version": 0})
        await wait_for(lambda: rejected("unknown_device") == count + 1)
        assert await db.fetchval("SELECT count(*) FROM devices") == devices
        assert await device_row(db, "SN-HB-NOBODY") is None
        # Barrier: registered now, with its settings at version 2, the serial's next
        # heartbeat reporting version 1 gets the patch to 2 on the same topic, behind
        # anything the rejected heartbeat got.
        device_id = new_id("dev_")
        await gateway.storage.devices.register(device_id, "SN-HB-NOBODY", None, None, None)
        await gateway.storage.settings.write(
            device_id, None,
            lambda current: settings_schema.patch(current, {"audio": {"codec": "aac"}}))
        await dev.heartbeat({"ts": now_ms(), "settings_version": 1})
        update = await dev.next(dev.settings)
        assert (update["version"], update["base_version"]) == (2, 1)


async def test_heartbeat_of_deleted_device_is_rejected_and_changes_nothing(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """A soft-deleted device's heartbeat counts as deleted_device; health and acks unchanged."""
    created = await register(api, "SN-HB-DEL")
    status, command = await api.call("POST", f"/v1/devices/{created['id']}/commands",
                                     {"type": "reboot"})
    assert status == 201
    ts = now_ms() - 1000
    async with sim_device(topic_prefix, "SN-HB-DEL") as dev:
        await dev.heartbeat({"ts": ts, **FULL})
        before = await applied(db, "SN-HB-DEL", ts)
        await dev.next(dev.commands)
        status, _ = await api.call("DELETE", f"/v1/devices/{created['id']}")
        assert status == 200
        before = await device_row(db, "SN-HB-DEL")
        count = rejected("deleted_device")
        await dev.heartbeat({"ts": ts + 1, "battery_percent": 2, "settings_version": 0,
                             "acks": [{"id": command["id"], "status": "failed"}]})
        await wait_for(lambda: rejected("deleted_device") == count + 1)
        assert await device_row(db, "SN-HB-DEL") == before
        assert (await command_row(db, command["id"]))["status"] == "delivered"
        # Barrier: restored, the device's next heartbeat is answered on the same topic,
        # behind anything the rejected one got, with a command created only now.
        status, _ = await api.call("POST", f"/v1/devices/{created['id']}/restore")
        assert status == 200
        status, later = await api.call("POST", f"/v1/devices/{created['id']}/commands",
                                       {"type": "later"})
        assert status == 201
        await dev.heartbeat({"ts": ts + 2, "battery_percent": 3})
        assert ids(await dev.next(dev.commands)) == [command["id"], later["id"]]
        assert dev.settings.empty()


async def test_heartbeat_within_five_minutes_ahead_is_accepted(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """A device clock up to 5 minutes ahead is tolerated."""
    await register(api, "SN-HB-AHEAD")
    ts = now_ms() + 4 * 60 * 1000 + 30_000
    async with sim_device(topic_prefix, "SN-HB-AHEAD") as dev:
        await dev.heartbeat({"ts": ts, "battery_percent": 60})
        row = await applied(db, "SN-HB-AHEAD", ts)
    assert row["battery_percent"] == 60


# --- batching never changes the outcome ------------------------------------------------

FIELD_VALUES = {
    "firmware_version": st.sampled_from(["1.0", "1.1", "2.0"]),
    "battery_percent": st.integers(0, 100),
    "storage_used_mb": st.integers(0, 10),
    "storage_total_mb": st.integers(10, 12),
    "signal_strength_dbm": st.integers(-150, 0),
    "recording_state": st.fixed_dictionaries(
        {}, optional={"device_state": st.sampled_from(["idle", "rec"]),
                      "pending_recordings": st.integers(0, 3)},
    ),
    "settings_version": st.integers(0, 4),
}
heartbeats = st.builds(
    lambda ts, fields: {"ts": ts, **fields},
    st.integers(1, 6) | st.none(),  # a heartbeat without ts is applied, keeping last_ts
    st.fixed_dictionaries({}, optional=FIELD_VALUES),
)
# A pool of distinct heartbeats, then an arrival sequence drawn from it (duplicates and any
# order), each arrival followed or not by a pause that lets the writer take a batch.
arrivals = st.lists(heartbeats, min_size=1, max_size=5).flatmap(
    lambda pool: st.lists(st.tuples(st.sampled_from(pool), st.booleans()),
                          min_size=1, max_size=10)
)


def sequential_model(sequence: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply heartbeats one by one: applies iff ts > the newest applied ts (or has no ts)."""
    state: dict[str, Any] = {name: None for name in HEALTH_COLUMNS}
    state["last_ts"] = None
    state["applied_version"] = 0
    for heartbeat in sequence:
        ts = heartbeat["ts"]
        if ts is not None and state["last_ts"] is not None and ts <= state["last_ts"]:
            continue
        if ts is not None:
            state["last_ts"] = ts
        for name, value in heartbeat.items():
            if name == "settings_version":
                state["applied_version"] = value
            elif name != "ts":
                state[name] = value
    return state


def to_heartbeat(doc: dict[str, Any], base: int) -> Heartbeat:
    fields = dict(doc)
    fields["ts"] = None if doc["ts"] is None else base + doc["ts"]
    if "recording_state" in fields:
        fields["recording_state"] = RecordingState(**fields["recording_state"])
    return Heartbeat(**fields)


@settings(max_examples=int(os.environ.get("GATEWAY_PROPERTY_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=arrivals)
async def test_any_interleaving_of_heartbeats_leaves_the_sequential_state(
    gateway: Gateway, db: asyncpg.Connection, sequence: list[tuple[dict[str, Any], bool]]
) -> None:
    """However heartbeats are duplicated, reordered and batched (two of one device in one
    batch included), the row equals applying them one by one in arrival order."""
    serial = f"SN-PROP-{uuid.uuid4().hex[:8]}"
    sentinel = f"SN-SENT-{uuid.uuid4().hex[:8]}"
    for name in (serial, sentinel):
        await gateway.storage.devices.register(new_id("dev_"), name, None, None, None)
    base = now_ms() - 100_000
    for doc, pause in sequence:
        gateway.buffer.add(serial, Pending(to_heartbeat(doc, base), time.time()))
        if pause:
            await asyncio.sleep(0.004)  # longer than the batch wait: the writer takes a batch
    # One writer, batches in order: once a later heartbeat is committed, so is the rest.
    gateway.buffer.add(sentinel, Pending(Heartbeat(ts=base), time.time()))
    await applied(db, sentinel, base)
    row = await device_row(db, serial)
    assert row is not None
    expected = sequential_model([doc for doc, _ in sequence])
    if expected["last_ts"] is not None:
        expected["last_ts"] += base
    assert {name: row[name] for name in expected} == expected


# --- a burst ---------------------------------------------------------------------------


async def test_burst_of_10000_heartbeats_from_1000_devices_loses_nothing(
    gateway: Gateway, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """10,000 QoS 1 heartbeats (10 per device) are all applied: every last_ts is the last sent."""
    devices, rounds = 1000, 10
    serials = [f"BURST-{n:04d}" for n in range(devices)]
    await insert_devices(db, serials)
    base = now_ms() - 60_000
    received_before = metric("gateway_heartbeats_received_total")
    batches_before = metric("gateway_heartbeat_batch_size_count")
    messages = [
        (f"{topic_prefix}/devices/{serial}/heartbeat",
         msgspec.json.encode({"ts": base + r, "battery_percent": r, "storage_used_mb": n}))
        for r in range(rounds) for n, serial in enumerate(serials)
    ]
    start = time.perf_counter()
    await publish_burst(MQTT_HOST, MQTT_PORT, messages)
    published = time.perf_counter()

    async def all_applied() -> bool:
        done = await db.fetchval(
            "SELECT count(*) FROM device_health WHERE serial_number LIKE 'BURST-%'"
            " AND last_ts = $1 AND battery_percent = $2",
            base + rounds - 1, rounds - 1,
        )
        return bool(done == devices)

    await wait_for(all_applied, timeout=60, interval=0.05)
    finished = time.perf_counter()
    total = devices * rounds
    assert metric("gateway_heartbeats_received_total") - received_before == total
    mismatched = await db.fetchval(
        "SELECT count(*) FROM device_health WHERE serial_number LIKE 'BURST-%'"
        " AND (last_ts IS DISTINCT FROM $1"
        "      OR storage_used_mb IS DISTINCT FROM substr(serial_number, 7)::bigint)",
        base + rounds - 1,
    )
    assert mismatched == 0
    print(
        f"\nburst: {total} heartbeats from {devices} devices; published in "
        f"{published - start:.2f} s, all applied after {finished - start:.2f} s: "
        f"{total / (finished - start):,.0f} messages/s end to end, in "
        f"{metric('gateway_heartbeat_batch_size_count') - batches_before:.0f} database batches"
    )
