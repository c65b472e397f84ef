"""The request/reply envelope (docs/protocol.md §5): both MQTT versions, malformed input, reply
topic confinement, and concurrent handling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import asyncpg
import msgspec
from conftest import MQTT_HOST, MQTT_PORT, Caller, caller, reading, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import REGISTRY

from gateway.app import Gateway


def v5_properties(response_topic: str | None, correlation: bytes | None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def envelope(method: str, path: str, key: str | None, body: Any = None,
             **extra: Any) -> bytes:
    document: dict[str, Any] = {"method": method, "path": path, **extra}
    if key is not None:
        document["headers"] = {"authorization": f"Bearer {key}"}
    if body is not None:
        document["body"] = body
    return msgspec.json.encode(document)


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("gateway_requests_dropped_total", {"reason": reason}) or 0.0


class Sniffer:
    """Everything published under some topic filters, as (topic, payload)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload in self.seen if t == topic]


@contextlib.asynccontextmanager
async def sniffing(*filters: str) -> AsyncIterator[Sniffer]:
    sniffer = Sniffer()
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)

        async def read() -> None:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                sniffer.seen.append((message.topic.value, payload))

        async with reading(read()):
            yield sniffer


# ---- both MQTT versions --------------------------------------------------------------


async def test_mqtt5_response_topic_and_correlation_data_are_honoured(api: Caller) -> None:
    """MQTT 5: the reply goes to the Response Topic property, echoes Correlation Data as a
    property, and carries it as correlation_id; on a write and on a read route."""
    props = v5_properties(api.reply_topic, b"corr-register")
    reply = await api.send(envelope("POST", "/v1/devices", api.key,
                                    {"serial_number": "SN-V5"}), "corr-register", props)
    assert reply["status"] == 201 and reply["body"]["serial_number"] == "SN-V5"
    assert reply["correlation_id"] == "corr-register"
    assert reply["_properties"].CorrelationData == b"corr-register"

    device_id = reply["body"]["id"]
    props = v5_properties(api.reply_topic, b"corr-get")
    reply = await api.send(envelope("GET", f"/v1/devices/{device_id}", api.key), "corr-get",
                           props)
    assert reply["status"] == 200 and reply["body"]["id"] == device_id
    assert reply["_properties"].CorrelationData == b"corr-get"


async def test_mqtt5_binary_correlation_data_is_echoed_byte_for_byte(api: Caller) -> None:
    """Correlation Data that is not UTF-8 comes back unchanged as a property."""
    data = b"\xff\x00\xfe" + uuid.uuid4().bytes
    props = v5_properties(api.reply_topic, data)
    await api.client.publish(f"{api.prefix}/api/v1/requests",
                             envelope("GET", "/v1/devices", api.key), qos=1, properties=props)
    await wait_for(lambda: api.unmatched)
    reply = api.unmatched[0]
    assert reply["status"] == 200
    assert reply["_properties"].CorrelationData == data


async def test_mqtt311_envelope_reply_to_and_correlation_id_are_honoured(
    api: Caller, topic_prefix: str
) -> None:
    """MQTT 3.1.1: reply_to and correlation_id in the envelope; the reply echoes the id."""
    assert api.key is not None
    async with caller(topic_prefix, api.key, v5=False) as old:
        assert old.client._client.protocol == 4  # MQTT 3.1.1 on the wire
        status, body = await old.call("POST", "/v1/devices", {"serial_number": "SN-V3"})
        assert status == 201
        status, body = await old.call("GET", f"/v1/devices/{body['id']}")
        assert status == 200 and body["serial_number"] == "SN-V3"
        # A numeric correlation_id comes back as the same number.
        reply = await old.send(envelope("GET", "/v1/devices", api.key,
                                        reply_to=old.reply_topic, correlation_id=42), "42")
        assert reply["correlation_id"] == 42 and reply["status"] == 200


async def test_reply_without_correlation_has_no_correlation_id(api: Caller) -> None:
    """A request with no correlation id is answered without one."""
    await api.client.publish(f"{api.prefix}/api/v1/requests",
                             envelope("GET", "/v1/devices", api.key, reply_to=api.reply_topic),
                             qos=1)
    await wait_for(lambda: api.unmatched)
    assert api.unmatched[0]["status"] == 200 and "correlation_id" not in api.unmatched[0]


# ---- malformed requests --------------------------------------------------------------


async def test_malformed_envelope_with_mqtt5_response_topic_is_400(api: Caller) -> None:
    """Not JSON, or JSON but not an object: 400 invalid_request to the Response Topic."""
    payloads = (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"GET"', b"null",
                b'{"method": "GET", "path": "/v1/devices"')
    replies = await asyncio.gather(*(
        api.send(payload, f"bad-{n}", v5_properties(api.reply_topic, f"bad-{n}".encode()))
        for n, payload in enumerate(payloads)
    ))
    for payload, reply in zip(payloads, replies, strict=True):
        assert reply["status"] == 400, payload
        assert reply["body"]["error"]["type"] == "invalid_request", payload


async def test_envelope_without_method_or_path_is_400_before_auth(api: Caller) -> None:
    """Missing or mistyped method/path: 400 invalid_request even with no key at all."""
    bad = [
        {"path": "/v1/devices"},
        {"method": "GET"},
        {},
        {"method": 5, "path": "/v1/devices"},
        {"method": "GET", "path": ["/v1/devices"]},
        {"method": "GET", "path": "/v1/devices", "headers": "authorization"},
        {"method": "GET", "path": "/v1/devices", "query": {"limit": 10}},
    ]
    for n, document in enumerate(bad):
        correlation = f"nokey-{n}"
        payload = msgspec.json.encode(document | {"reply_to": api.reply_topic,
                                                  "correlation_id": correlation})
        reply = await api.send(payload, correlation)
        assert reply["status"] == 400, document
        assert reply["body"]["error"]["type"] == "invalid_request", document


async def test_non_object_body_on_write_routes_is_400(
    api: Caller, db: asyncpg.Connection
) -> None:
    """A JSON body that is not an object (list, string, number, true) is 400
    invalid_request on every route that takes a body; nothing changes."""
    status, created = await api.call("POST", "/v1/devices", {"serial_number": "SN-BODY"})
    device_id = created["id"]
    routes = [("POST", "/v1/devices"), ("PATCH", f"/v1/devices/{device_id}"),
              ("POST", f"/v1/devices/{device_id}/bind"),
              ("POST", f"/v1/devices/{device_id}/reset"),
              ("PUT", f"/v1/devices/{device_id}/settings"),
              ("PATCH", f"/v1/devices/{device_id}/settings")]
    requests = [(method, path, body) for method, path in routes
                for body in ([{"serial_number": "SN-X"}], "SN-X", 5, True)]
    replies = await asyncio.gather(*(api.call(*request) for request in requests))
    for request, (status, reply) in zip(requests, replies, strict=True):
        assert status == 400, (request, reply)
        assert reply["error"]["type"] == "invalid_request", request
    assert await db.fetchval("SELECT count(*) FROM devices") == 1
    assert await db.fetchval("SELECT version FROM device_settings") == 1
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


async def test_request_over_256_kib_is_400_and_the_gateway_keeps_answering(
    api: Caller, db: asyncpg.Connection
) -> None:
    """A request over 256 KiB is answered 400 invalid_request (reply topic in the envelope
    or as a property), nothing is stored, and the next request is answered normally."""
    big = {"serial_number": "SN-BIG", "metadata": {"blob": "x" * (300 * 1024)}}
    status, body = await api.call("POST", "/v1/devices", big)
    assert status == 400 and body["error"]["type"] == "invalid_request"
    reply = await api.send(envelope("POST", "/v1/devices", api.key, big), "big-v5",
                           v5_properties(api.reply_topic, b"big-v5"))
    assert reply["status"] == 400 and reply["body"]["error"]["type"] == "invalid_request"
    assert await db.fetchval("SELECT count(*) FROM devices") == 0
    status, body = await api.call("POST", "/v1/devices", {"serial_number": "SN-SMALL"})
    assert status == 201


async def test_request_just_under_256_kib_is_handled(api: Caller) -> None:
    """The limit is on the envelope: a 250 KiB request is handled like any other."""
    status, body = await api.call("POST", "/v1/devices", {
        "serial_number": "SN-NEARLY", "metadata": {"blob": "y" * (250 * 1024)}})
    assert status == 201 and len(body["metadata"]["blob"]) == 250 * 1024


async def test_query_string_in_the_path_is_read_as_query(api: Caller) -> None:
    """As in HTTP, a path may carry its query string; an explicit query wins on a clash."""
    for n in range(3):
        await api.call("POST", "/v1/devices", {"serial_number": f"SN-QS{n}"})
    status, page = await api.call("GET", "/v1/devices?limit=1")
    assert status == 200 and len(page["data"]) == 1 and page["has_more"] is True
    status, page = await api.call("GET", "/v1/devices?serial_number=SN-QS1&limit=5")
    assert [d["serial_number"] for d in page["data"]] == ["SN-QS1"]
    status, page = await api.call("GET", "/v1/devices?limit=1", query={"limit": "2"})
    assert len(page["data"]) == 2
    status, body = await api.call("GET", "/v1/devices?limit=0")
    assert status == 400 and body["error"]["type"] == "validation_error"


# ---- reply topic confinement ---------------------------------------------------------


async def test_reply_topic_outside_the_replies_prefix_gets_no_reply(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """reply_to (or a Response Topic) outside {prefix}/api/v1/replies/, or with a wildcard:
    nothing is published anywhere, the request is not executed, and the drop is counted."""
    bad_topics = [
        f"{topic_prefix}/devices/SN-VICTIM/commands",
        f"{topic_prefix}/devices/SN-VICTIM/settings",
        f"{topic_prefix}/api/v1/requests",
        f"{topic_prefix}/api/v1/replies/",
        f"{topic_prefix}/api/v1/replies",
        f"{topic_prefix}/api/v1/repliesX/a",
        f"{topic_prefix}/api/v1/replies/+",
        f"{topic_prefix}/api/v1/replies/a/#",
        f"{topic_prefix}/api/v1/replies/+/x",
        f"elsewhere/{topic_prefix}/api/v1/replies/a",
        "api/v1/replies/no-prefix",
        f"{topic_prefix}/API/v1/replies/a",
    ]
    async with sniffing(f"{topic_prefix}/#", f"elsewhere/{topic_prefix}/#",
                        "api/v1/replies/no-prefix") as sniffer:
        before = dropped("bad_reply_topic")
        for n, topic in enumerate(bad_topics):
            body = {"serial_number": f"SN-INJECT-{n}"}
            await api.client.publish(
                f"{topic_prefix}/api/v1/requests",
                envelope("POST", "/v1/devices", api.key, body, reply_to=topic,
                         correlation_id=str(n)), qos=1)
            await api.client.publish(
                f"{topic_prefix}/api/v1/requests",
                envelope("POST", "/v1/devices", api.key, body),
                qos=1, properties=v5_properties(topic, str(n).encode()))
        await wait_for(lambda: dropped("bad_reply_topic") >= before + 2 * len(bad_topics))
        # A well-formed request afterwards is answered; by then the bad ones are done. Its
        # reply is the barrier: the sniffer sees it behind anything the gateway published
        # before it (one connection each way, in order).
        assert (await api.call("GET", "/v1/devices"))[0] == 200
        await wait_for(lambda: any(t == api.reply_topic for t, _ in sniffer.seen))
    requests_topic = f"{topic_prefix}/api/v1/requests"
    stray = [(t, p[:80]) for t, p in sniffer.seen
             if t != requests_topic and t != api.reply_topic]
    assert stray == []
    assert dropped("bad_reply_topic") == before + 2 * len(bad_topics)
    assert await db.fetchval("SELECT count(*) FROM devices") == 0


async def test_request_without_a_reply_topic_is_dropped_and_counted(
    api: Caller, db: asyncpg.Connection
) -> None:
    """A request naming no reply topic is not executed and is counted as dropped."""
    before = dropped("no_reply_topic")
    await api.client.publish(f"{api.prefix}/api/v1/requests",
                             envelope("POST", "/v1/devices", api.key,
                                      {"serial_number": "SN-NOREPLY"}), qos=1)
    await api.client.publish(f"{api.prefix}/api/v1/requests", b"not json", qos=1)
    await wait_for(lambda: dropped("no_reply_topic") >= before + 2)
    assert await db.fetchval("SELECT count(*) FROM devices") == 0


# ---- concurrency and third-party clients ---------------------------------------------


async def test_a_slow_request_does_not_block_other_requests(
    api: Caller, db: asyncpg.Connection, gateway: Gateway
) -> None:
    """While a settings write waits on a row lock held elsewhere, other requests are
    answered; the write completes once the lock is released."""
    assert gateway.config.request_workers > 1
    status, created = await api.call("POST", "/v1/devices", {"serial_number": "SN-SLOW"})
    device_id = created["id"]
    lock = db.transaction()
    await lock.start()
    try:
        await db.execute("SELECT 1 FROM device_settings WHERE device_id = $1 FOR UPDATE",
                         device_id)
        slow = asyncio.create_task(api.call("PUT", f"/v1/devices/{device_id}/settings",
                                            {"audio": {"codec": "aac"}}))
        await wait_for(lambda: db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"))
        for _ in range(3):
            status, page = await api.call("GET", "/v1/devices")
            assert status == 200 and page["data"][0]["id"] == device_id
        status, _ = await api.call("POST", "/v1/devices", {"serial_number": "SN-FAST"})
        assert status == 201
        assert not slow.done()
    finally:
        await lock.rollback()
    status, body = await asyncio.wait_for(slow, 5)
    assert status == 200 and body["version"] == 2
    assert body["settings"]["audio"]["codec"] == "aac"


async def test_gateway_socket_sends_replies_without_nagle_delay(gateway: Gateway) -> None:
    """The gateway's broker socket has TCP_NODELAY: a reply written right after the PUBACK
    of its request is not held back ~40 ms waiting for the broker's delayed ACK."""
    sock = gateway.edge._client._client.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_mosquitto_rr_as_a_third_party_client(api: Caller, topic_prefix: str) -> None:
    """mosquitto_rr (libmosquitto, MQTT 5 Response Topic) gets the gateway's reply."""
    assert api.key is not None
    request = json.dumps({"method": "POST", "path": "/v1/devices",
                          "headers": {"Authorization": f"Bearer {api.key}"},
                          "body": {"serial_number": "SN-RR", "device_type": "bota_pin_v1"}})
    process = await asyncio.create_subprocess_exec(
        "mosquitto_rr", "-V", "5", "-h", MQTT_HOST, "-p", str(MQTT_PORT), "-q", "1",
        "-t", f"{topic_prefix}/api/v1/requests", "-e", f"{topic_prefix}/api/v1/replies/rr1",
        "-W", "5", "-m", request,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr
    reply = json.loads(stdout)
    assert reply["status"] == 201
    assert reply["body"]["serial_number"] == "SN-RR" and reply["body"]["model"] == "bota_pin"
    status, body = await api.call("GET", f"/v1/devices/{reply['body']['id']}")
    assert status == 200 and body == reply["body"]
