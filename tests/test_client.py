"""The Python client, ``gateway.client.GatewayClient`` (docs/client.md), against the real
broker and database: typed calls, errors, concurrency, time-outs, retries, events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest
from conftest import MQTT_HOST, MQTT_PORT, MQTT_URL, create_key, running_gateway, wait_for
from gateway_codecs import registry as wire
from processes import Mosquitto

from gateway import auth, metrics
from gateway.app import Gateway
from gateway.client import (
    ApiError,
    AuthenticationFailed,
    Conflict,
    ConnectionLost,
    GatewayClient,
    NotFound,
    PermissionDenied,
    RequestTimeout,
    Unavailable,
    ValidationFailed,
    _chunks,
)
from gateway.config import Config

PROTOCOLS = pytest.mark.parametrize("protocol", [5, "3.1.1"])


@contextlib.asynccontextmanager
async def client(topic_prefix: str, key: str | None, **options: Any) -> AsyncIterator[
        GatewayClient]:
    async with GatewayClient(MQTT_URL, api_key=key, topic_prefix=topic_prefix,
                             **options) as gw:
        yield gw


@PROTOCOLS
async def test_a_device_life_through_the_typed_methods(
    gateway: Gateway, topic_prefix: str, api_key: str, protocol: int | str
) -> None:
    """Every device, settings and command method, over MQTT 5 and MQTT 3.1.1, returns the
    codecs Struct of its route's answer."""
    async with client(topic_prefix, api_key, protocol=protocol) as gw:
        device = await gw.devices.register("SN-CLIENT", device_type="bota_pin_v1",
                                           metadata={"site": "north"})
        assert isinstance(device, wire.Device) and device.model == "bota_pin"
        assert await gw.devices.register("SN-CLIENT") == device  # idempotent by serial
        assert await gw.devices.get(device.id) == device
        updated = await gw.devices.update(device.id, firmware_version="2.5.0",
                                          metadata={"site": None, "row": 4})
        assert (updated.firmware_version, updated.metadata) == ("2.5.0", {"row": 4})
        bound = await gw.devices.bind(device.id, "eu_1")
        assert (bound.status, bound.end_user_id) == ("bound", "eu_1")
        assert (await gw.devices.unbind(device.id)).status == "unbound"
        await gw.devices.bind(device.id, "eu_2")
        assert (await gw.devices.reset(device.id)).end_user_id is None

        settings = await gw.settings.get(device.id)
        assert (settings.version, settings.applied_version) == (1, 0)
        patched = await gw.settings.patch(device.id, {"audio": {"codec": "aac"}}, if_match=1)
        assert (patched.version, patched.settings.audio.codec) == (2, "aac")
        replaced = await gw.settings.put(device.id, {"power": {"auto_sleep_minutes": 5}},
                                         if_match=2)
        assert (replaced.version, replaced.settings.audio.codec) == (3, "opus")
        assert replaced.settings.power.auto_sleep_minutes == 5

        command = await gw.commands.send(device.id, "set_led", params={"color": "red"},
                                         idempotency_key="led-1")
        assert await gw.commands.send(device.id, "set_led", params={"color": "red"},
                                      idempotency_key="led-1") == command
        assert await gw.commands.get(command.id) == command
        listed = [c.type async for c in gw.commands.list(device.id)]
        assert listed == ["set_led", "factory_reset"]  # newest first
        assert (await gw.commands.cancel(command.id)).status == "canceled"

        deleted = await gw.devices.delete(device.id)
        assert (deleted.id, deleted.deleted) == (device.id, True)
        with pytest.raises(NotFound):
            await gw.devices.get(device.id)
        assert (await gw.devices.restore(device.id)).id == device.id


async def test_list_iterates_every_page_with_starting_after(
    gateway: Gateway, topic_prefix: str, api_key: str
) -> None:
    async with client(topic_prefix, api_key) as gw:
        serials = [f"SN-PAGE-{i}" for i in range(7)]
        await gw.devices.register_many(serials)
        await gw.devices.bind((await gw.devices.register("SN-PAGE-3")).id, "eu_page")
        listed = [d.serial_number async for d in gw.devices.list(page_size=3)]
        assert listed == serials[::-1]
        assert [d.serial_number async for d in gw.devices.list(status="bound")] == [
            "SN-PAGE-3"]
        assert [d.serial_number async for d in gw.devices.list(serial_number="none")] == []


async def test_register_many_batches_and_answers_in_input_order(
    gateway: Gateway, topic_prefix: str, api_key: str
) -> None:
    """Items as serials, Structs or mappings; batches of at most ``batch_size``, several
    in flight; one outcome per item in input order, failures among them."""
    items: list[Any] = [f"SN-MANY-{i}" for i in range(20)]
    items[3] = wire.RegisterDevice(serial_number="SN-MANY-3", device_type="t")
    items[4] = "SN-MANY-0"  # again, in the same batch
    items[5] = {"serial_number": "bad serial"}
    async with client(topic_prefix, api_key) as gw:
        starts = sorted([batch.start async for batch in gw.devices.register_batches(
            [f"SN-MANY-{i}" for i in range(100, 120)], batch_size=7, concurrency=2)])
        assert starts == [0, 7, 14]
        results = await gw.devices.register_many(items, batch_size=7, concurrency=3)
    assert [r.status for r in results] == [201] * 4 + [200, 400] + [201] * 14
    assert results[3].device and results[3].device.device_type == "t"
    assert results[4].device == results[0].device
    assert results[5].error and results[5].error.details == [{
        "field": "serial_number",
        "error": "Must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"}]


def test_batches_stay_within_the_item_request_and_reply_limits() -> None:
    def sizes(items: list[Any], **limits: Any) -> list[int]:
        return [len(chunk) for _, chunk, _ in _chunks(items, **{
            "batch_size": wire.MAX_BATCH, "max_reply_bytes": None} | limits)]

    assert sizes([f"S{i}" for i in range(2500)]) == [1000, 1000, 500]
    assert sizes([f"S{i}" for i in range(2500)], batch_size=300)[:3] == [300, 300, 300]
    # About 1.1 KiB of reply per device: 1 MB holds fewer than 1,000.
    first, second = sizes([f"S{i}" for i in range(1000)], max_reply_bytes=1_000_000)
    assert 850 < first < 900 and first + second == 1000
    # A request stays under 256 KiB: big metadata makes small batches.
    big = [{"serial_number": f"S{i}", "metadata": {"blob": "x" * 10_000}} for i in range(60)]
    assert max(sizes(big)) < 26 and sum(sizes(big)) == 60


async def test_error_answers_raise_their_own_class_and_call_returns_them(
    gateway: Gateway, topic_prefix: str, api_key: str, database_url: str
) -> None:
    """Each error type is its own exception with status, type, message and details;
    `call` hands any answer back as (status, body)."""
    async with client(topic_prefix, api_key) as gw:
        with pytest.raises(NotFound) as missing:
            await gw.devices.get("dev_nope")
        assert (missing.value.status, missing.value.type, missing.value.message) == (
            404, "not_found", "No such object")
        with pytest.raises(ValidationFailed) as invalid:
            await gw.devices.register("no spaces allowed")
        assert invalid.value.status == 400 and invalid.value.details == [{
            "field": "serial_number",
            "error": "Must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"}]
        device = await gw.devices.register("SN-ERR")
        await gw.devices.bind(device.id, "eu_a")
        with pytest.raises(Conflict, match="bound to another end user"):
            await gw.devices.bind(device.id, "eu_b")
        with pytest.raises(ValidationFailed) as settings_error:
            await gw.settings.patch(device.id, {"upload": {"mode": "carrier_pigeon"}})
        assert settings_error.value.details and (
            settings_error.value.details[0]["field"] == "upload.mode")

        assert await gw.call("GET", "/v1/devices/dev_nope") == (
            404, {"error": {"type": "not_found", "message": "No such object"}})
        status, body = await gw.call("GET", "/v1/devices", query={"limit": "1"})
        assert (status, [d["id"] for d in body["data"]]) == (200, [device.id])
        status, body = await gw.call("PUT", "/v1/devices")
        assert (status, body["error"]["type"]) == (405, "method_not_allowed")

    async with client(topic_prefix, "sk_live_nobody_secret") as stranger:
        with pytest.raises(AuthenticationFailed) as unknown:
            await stranger.devices.get(device.id)
        assert isinstance(unknown.value, ApiError) and unknown.value.status == 401
    _, read_only = await create_key(database_url, auth.READ)
    async with client(topic_prefix, read_only) as reader:
        assert (await reader.devices.get(device.id)).id == device.id
        with pytest.raises(PermissionDenied):
            await reader.devices.unbind(device.id)


async def test_hundreds_of_calls_in_flight_on_one_connection_each_get_their_answer(
    gateway: Gateway, topic_prefix: str, api_key: str
) -> None:
    async with client(topic_prefix, api_key) as gw:
        results = await gw.devices.register_many([f"SN-FLIGHT-{i}" for i in range(300)])
        ids = [r.device.id for r in results if r.device]
        got = await asyncio.gather(*(gw.devices.get(device_id) for device_id in ids))
    assert [d.id for d in got] == ids


@contextlib.asynccontextmanager
async def requests_seen(topic_prefix: str) -> AsyncIterator[list[bytes]]:
    """The request envelopes published under ``topic_prefix`` while the context lasts."""
    seen: list[bytes] = []
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT) as sniffer:
        await sniffer.subscribe(f"{topic_prefix}/api/v1/requests", qos=1)

        async def read() -> None:
            async for message in sniffer.messages:
                assert isinstance(message.payload, bytes)
                seen.append(message.payload)

        reader = asyncio.create_task(read())
        try:
            yield seen
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_no_answer_is_a_request_timeout_after_retries_of_idempotent_calls_only(
    topic_prefix: str,
) -> None:
    """Nobody serves this prefix: a read is sent 1 + retries times, then raises
    RequestTimeout (a TimeoutError, not an ApiError); a bind is sent once."""
    async with requests_seen(topic_prefix) as seen, client(
            topic_prefix, "sk_live_x_y", timeout=0.2, retries=2) as gw:
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as timed_out:
            await gw.devices.get("dev_1")
        assert isinstance(timed_out.value, TimeoutError)
        assert not isinstance(timed_out.value, ApiError)
        assert time.monotonic() - started >= 0.6
        await wait_for(lambda: len(seen) == 3, 5)
        with pytest.raises(RequestTimeout):
            await gw.devices.bind("dev_1", "eu_1")
        await wait_for(lambda: len(seen) == 4, 5)
        with pytest.raises(RequestTimeout):
            await gw.call("POST", "/v1/devices/dev_1/unbind", timeout=0.1)
        await wait_for(lambda: len(seen) == 5, 5)
    assert [msgspec.json.decode(p)["method"] for p in seen] == ["GET"] * 3 + ["POST"] * 2


@contextlib.asynccontextmanager
async def devices_locked(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The devices table locked by a transaction of its own until the context exits: the
    gateway's queries of it wait out their timeout and are answered 503."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
            yield conn
    finally:
        await conn.close()


def answered_503() -> float:
    """Requests the gateway (in this process) has answered 503 so far."""
    return sum(sample.value for family in metrics.REQUESTS.collect()
               for sample in family.samples
               if sample.name.endswith("_total") and sample.labels.get("status") == "503")


async def test_503_is_retried_for_idempotent_calls_and_raised_as_unavailable_otherwise(
    config: Config, api_key: str, topic_prefix: str
) -> None:
    config = dataclasses.replace(config, db_timeout_seconds=0.3)
    async with running_gateway(config), client(topic_prefix, api_key, retries=5) as gw:
        device = await gw.devices.register("SN-503")
        before = answered_503()
        async with devices_locked(config.database_url):
            with pytest.raises(Unavailable) as unavailable:
                await gw.devices.bind(device.id, "eu_1")  # not idempotent: not retried
            assert (unavailable.value.status, unavailable.value.type) == (503, "unavailable")
            assert answered_503() == before + 1
            read = asyncio.create_task(gw.devices.get(device.id))
            await wait_for(lambda: answered_503() >= before + 2, 5)
        assert await read == device  # a later attempt, once the database answers again


@pytest.mark.fault
async def test_a_lost_connection_fails_the_calls_in_flight_at_once(
    topic_prefix: str,
) -> None:
    with Mosquitto() as broker:
        async with GatewayClient(broker.url, api_key="sk_live_x_y", timeout=30,
                                 topic_prefix=topic_prefix) as gw:
            call = asyncio.create_task(gw.devices.get("dev_1"))
            await asyncio.sleep(0.1)
            broker.stop()
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(call, 5)
            with pytest.raises(ConnectionLost):
                await gw.devices.get("dev_1")
    with pytest.raises(ConnectionLost, match="cannot connect"):
        async with GatewayClient(broker.url):
            pass


async def test_events_follow_catches_up_then_yields_live_events_once(
    gateway: Gateway, topic_prefix: str, api_key: str
) -> None:
    async with client(topic_prefix, api_key) as gw:
        first = await gw.devices.register("SN-EVT-1")

        async def listed() -> list[str]:
            # Listed once the relay has given it its id, just after the commit.
            page = await gw.events.list(type="device.registered", device_id=first.id)
            return [event.device_id for event in page.data]

        assert await wait_for(listed, 10) == [first.id]
        registered: list[str] = []
        ids: list[str] = []

        async def follow() -> None:
            async for event in gw.events.follow(type="device.registered"):
                ids.append(event.id)
                registered.append(event.device_id)

        follower = asyncio.create_task(follow())
        try:
            await wait_for(lambda: first.id in registered, 10)
            later = [await gw.devices.register(f"SN-EVT-{i}") for i in range(2, 6)]
            await wait_for(lambda: all(d.id in registered for d in later), 10)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    assert len(ids) == len(set(ids))
    assert registered == [first.id, *(d.id for d in later)]
