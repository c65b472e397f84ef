"""Answers larger than the broker's maximum packet size (docs/protocol.md §5, Size limits).

The broker states its limit in the MQTT 5 CONNACK (Maximum Packet Size). An answer whose
PUBLISH would exceed it is not published (the broker would close the gateway's connection,
and the redelivered request would do it again): the caller gets a small 500
``internal_error`` instead, the write it asked for stays applied, and the gateway stays
connected. Without a limit the same answer comes in full.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from conftest import Caller, create_key, running_gateway
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from processes import Mosquitto
from prometheus_client import REGISTRY

from gateway import auth, mqtt_packets
from gateway.client import GatewayClient
from gateway.config import Config
from gateway.mqtt_client import publish_packet_size

BATCH = "/v1/devices/batch"
ROUTE = "/v1/devices/batch"
LIMIT = 20_000  # bytes: a batch of 100 devices answers about 110 KB
DEVICES = 100


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def items(tag: str) -> list[dict[str, Any]]:
    return [{"serial_number": f"SN-{tag}-{i:04d}", "device_type": "bota_pin_v1"}
            for i in range(DEVICES)]


@contextlib.asynccontextmanager
async def caller_on(url: str, prefix: str, key: str, *, v5: bool) -> AsyncIterator[Caller]:
    async with GatewayClient(url, topic_prefix=prefix, protocol=5 if v5 else "3.1.1",
                             retries=0) as gateway:
        yield Caller(gateway.mqtt, prefix, gateway.reply_topic, key, v5, gateway)


def test_the_packet_size_is_what_goes_on_the_wire() -> None:
    """Counted as the bytes of the PUBLISH, across the remaining length's 1 to 3 bytes."""
    topic = "api/v1/replies/client-ä"
    for size in (0, 1, 100, 127 - 30, 128, 16_383 - 30, 16_384, 20_000, 2_097_152):
        payload = b"x" * size
        assert publish_packet_size(topic, payload) == len(
            mqtt_packets.publish(topic, 1, payload)), size
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.CorrelationData = b"c" * 300
    packed = properties.pack()  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode()) + 2 + len(packed) + 2
    assert publish_packet_size(topic, b"{}", properties) == (
        1 + len(mqtt_packets.varint(remaining)) + remaining)
    # MQTT 3.1.1 has no properties at all.
    assert publish_packet_size(topic, b"{}", v5=False) == publish_packet_size(topic, b"{}") - 1


@pytest.mark.fault
@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
async def test_an_answer_over_the_broker_limit_is_a_small_error(
    config: Config, topic_prefix: str, db: asyncpg.Connection, v5: bool,
) -> None:
    _, key = await create_key(config.database_url, auth.READ, auth.WRITE)
    with Mosquitto(max_packet_size=LIMIT) as broker:
        config = dataclasses.replace(config, mqtt_url=broker.url)
        async with running_gateway(config) as gateway, \
                caller_on(broker.url, topic_prefix, key, v5=v5) as api:
            assert gateway.edge.publisher.max_packet_size == LIMIT  # from the CONNACK
            reconnects = sample("gateway_mqtt_reconnects_total")
            errors = sample("gateway_requests_total", route=ROUTE, status="500")

            status, body = await api.call("POST", BATCH, {"devices": items("BIG")})

            assert status == 500, body
            error = body["error"]
            assert error["type"] == "internal_error"
            message = error["message"]
            assert f"larger than the broker accepts ({LIMIT} bytes)" in message
            assert "the request was applied" in message and "fewer items" in message
            size = int(message.split("(")[1].split(" bytes")[0])
            assert size > LIMIT
            assert sample("gateway_requests_total", route=ROUTE, status="500") == errors + 1

            # The write happened: the error is about the answer.
            stored = await db.fetchval(
                "SELECT count(*) FROM devices WHERE serial_number LIKE 'SN-BIG-%'")
            assert stored == DEVICES
            # Sent again, the batch reads the devices it created: still too large.
            status, body = await api.call("POST", BATCH, {"devices": items("BIG")})
            assert status == 500 and "the request was applied" in body["error"]["message"]

            # Still connected: a small request is answered as ever.
            status, listed = await api.call("GET", "/v1/devices", query={"limit": "1"})
            assert status == 200 and len(listed["data"]) == 1
            assert listed["data"][0]["serial_number"].startswith("SN-BIG-")
            # A batch whose answer fits is answered in full.
            status, small = await api.call("POST", BATCH, {"devices": items("BIG")[:5]})
            assert status == 200 and [e["status"] for e in small["data"]] == [200] * 5
            assert gateway.edge.connected.is_set()
            assert sample("gateway_mqtt_reconnects_total") == reconnects
            assert api.unmatched == []


async def test_without_a_limit_the_same_batch_is_answered_in_full(api: Caller) -> None:
    status, body = await api.call("POST", BATCH, {"devices": items("FULL")})

    assert status == 200, body
    assert [entry["status"] for entry in body["data"]] == [201] * DEVICES
    assert [entry["device"]["serial_number"] for entry in body["data"]] == [
        item["serial_number"] for item in items("FULL")]
