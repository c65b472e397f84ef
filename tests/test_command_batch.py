"""The command batch devices receive (docs/protocol.md §3): one definition,
gateway_codecs.device.CommandBatch, whatever builds it."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid

import aiomqtt
import msgspec
from conftest import MQTT_HOST, MQTT_PORT, NODELAY, Caller
from gateway_codecs.device import Command, CommandBatch, Heartbeat
from sync_support import now_ms, register

from gateway import heartbeat_writer
from gateway.app import Gateway
from gateway.heartbeat_buffer import Pending
from gateway.storage import Storage

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_the_batch_statement_builds_commands_that_decode_into_the_struct(
    database_url: str,
) -> None:
    """The SQL that marks commands delivered also builds their JSON: it decodes strictly
    into ``Command`` (every field, the right types), timestamps to the millisecond."""
    async with Storage.open(database_url, min_size=1, max_size=2) as storage:
        await storage.devices.register("dev_batch", "SN-BATCH", None, None, None)
        for n, params in enumerate(({}, {"volume": 3, "tags": ["a"], "deep": {"x": None}})):
            await storage.commands.create("dev_batch", f"cmd_batch{n}", "locate", params,
                                          dt.timedelta(hours=1), None)
        batch = {"SN-BATCH": [Pending(Heartbeat(ts=now_ms()), time.time())]}
        written = await storage.heartbeats.apply(heartbeat_writer.rounds(batch), None)
    (outcome,) = written.outcomes
    assert [command.id for command in outcome.commands] == ["cmd_batch0", "cmd_batch1"]
    encoded = msgspec.json.encode(CommandBatch(outcome.commands))
    strict = msgspec.json.decode(encoded, type=CommandBatch, strict=True)
    assert strict.commands[1].params == {"volume": 3, "tags": ["a"], "deep": {"x": None}}
    for command in strict.commands:
        assert command.type == "locate"
        assert TIMESTAMP.match(command.created_at) and TIMESTAMP.match(command.expires_at)


async def test_devices_receive_compact_json_with_exactly_the_structs_fields(
    gateway: Gateway, api: Caller, topic_prefix: str,
) -> None:
    """What a device receives on its commands topic is compact JSON (no spaces) whose
    every command has exactly the fields of ``Command``."""
    dev = await register(api, f"SN-COMPACT-{uuid.uuid4().hex[:6]}")
    status, _ = await api.call("POST", f"/v1/devices/{dev['id']}/commands",
                               {"type": "locate", "params": {"a": [1, 2]}})
    assert status == 201
    topic = f"{topic_prefix}/devices/{dev['serial_number']}/commands"
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, socket_options=NODELAY,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic, qos=1)
        await client.publish(f"{topic_prefix}/devices/{dev['serial_number']}/heartbeat",
                             msgspec.json.encode({"ts": now_ms()}), qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(client.messages))
    payload = message.payload
    assert isinstance(payload, bytes)
    assert b" " not in payload, payload
    document = msgspec.json.decode(payload)
    assert set(document) == {"commands"}
    (command,) = document["commands"]
    assert set(command) == set(Command.__struct_fields__)
    assert command["params"] == {"a": [1, 2]}
