"""Hostile input over MQTT into a running gateway (a subprocess, so its memory can be read).

Each payload gets the error docs/protocol.md gives it (§5 Errors, §6) or a counted
rejection (§2 Rejections), stored state stays as it was, the gateway stays up, and its
resident memory does not grow by more than a few MiB over repeated rounds.

The test broker has Mosquitto's default maximum packet size (the MQTT maximum, 256 MiB),
so it accepts 1 MiB and 10 MiB payloads from devices. The gateway tells the broker in its
CONNECT (MQTT 5 Maximum Packet Size) that it takes packets up to about 4 MiB, so the broker
forwards the 1 MiB one (rejected and counted as too_large) and discards the 10 MiB one for
the gateway: it never enters the gateway's memory. ``deploy/mosquitto/mosquitto.conf`` sets
``max_packet_size 1048576``: there the broker refuses both from the sender already.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest
from conftest import create_key
from processes import (
    GatewayProcess,
    Mosquitto,
    RequestClient,
    raw_publish,
    rss_mib,
    scrape,
    wait_reply,
)

from gateway import auth
from gateway.config import Config

# Each test starts a broker and a gateway process of its own, and stops them.
pytestmark = pytest.mark.fault

SERIAL = "SN-HOSTILE-1"
MIB = 1024 * 1024
ROUNDS = 3  # the first warms the process up; memory is compared across the next two
RSS_GROWTH_LIMIT_MIB = 4.0


def report(name: str, **figures: Any) -> None:
    print(f"\nFIGURES {name}: {json.dumps(figures)}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def hostile_heartbeats() -> list[tuple[str, bytes, str | None]]:
    """(case, payload, the rejection reason it must be counted under; None: the broker
    discards it for the gateway, which never sees it)."""
    nest = 20_000
    return [
        ("1 MiB", b'{"firmware_version":"' + b"a" * MIB + b'"}', "too_large"),
        ("10 MiB", b'{"firmware_version":"' + b"a" * (10 * MIB) + b'"}', None),
        ("deep nesting, JSON", b'{"x":' + b"[" * nest + b"]" * nest + b"}", "malformed"),
        ("deep nesting, MessagePack", b"\x81\xa1x" + b"\x91" * nest + b"\xc0", "malformed"),
        ("deep nesting in a field", b'{"recording_state":' + b"[" * nest + b"]" * nest + b"}",
         "malformed"),
        ("invalid UTF-8", b'{"firmware_version":"\xff\xfe"}', "malformed"),
        ("lone surrogate", b'{"firmware_version":"\\ud800"}', "malformed"),
        ("NaN", b'{"battery_percent":NaN}', "malformed"),
        ("Infinity", b'{"ts":Infinity}', "malformed"),
        ("1e999", b'{"battery_percent":1e999}', "invalid"),
        ("2**63", b'{"storage_used_mb":9223372036854775808}', "invalid"),
        ("10**40", b'{"storage_total_mb":1' + b"0" * 40 + b"}", "invalid"),
        ("-10**30", b'{"signal_strength_dbm":-1' + b"0" * 30 + b"}", "invalid"),
        ("huge flags", b'{"recording_state":{"flags":99999999999999999999}}', "invalid"),
        ("ts as float", b'{"ts":1.5}', "invalid"),
        ("NUL in a string", b'{"firmware_version":"a\\u0000b"}', "invalid"),
        ("NUL in an ack", b'{"acks":[{"id":"cmd_\\u0000","status":"succeeded"}]}', "invalid"),
        ("65 acks", msgspec.json.encode(
            {"acks": [{"id": f"cmd_{n}", "status": "succeeded"} for n in range(65)]}), "invalid"),
        ("empty", b"", "malformed"),
        ("not an object", b"[1,2,3]", "invalid"),
        ("MessagePack ext", msgspec.msgpack.encode(
            {"battery_percent": msgspec.msgpack.Ext(1, b"x")}), "invalid"),
        ("ts 6 minutes ahead", b'{"ts":%d,"battery_percent":1}' % (now_ms() + 360_000),
         "future_ts"),
        ("ts in the year 2262", b'{"ts":9223372036854775807,"battery_percent":1}',
         "future_ts"),
        ("SQL in a string, stale", b'{"ts":1,"firmware_version":"\'; DROP TABLE devices;--"}',
         "stale"),
    ]


# Topics: raw bytes, so the MQTT client library's own checks are not in the way.
def hostile_topics(prefix: str) -> list[tuple[str, bytes, str, str | None]]:
    """(case, topic, what the broker does, the rejection reason at the gateway)."""
    base = prefix.encode() + b"/devices/"
    return [
        ("+ in a serial", base + b"a+b/heartbeat", "closed", None),
        ("# in a serial", base + b"a#b/heartbeat", "closed", None),
        ("NUL in a serial", base + SERIAL.encode() + b"\x00/heartbeat", "closed", None),
        ("invalid UTF-8 serial", base + b"\xff\xfe/heartbeat", "closed", None),
        ("/ in a serial", base + b"a/b/heartbeat", "acked", None),  # matches no subscription
        ("$ serial", base + b"$SYS/heartbeat", "acked", "unknown_device"),
        ("SQL serial", base + b"x'; DROP TABLE devices;--/heartbeat", "acked", "unknown_device"),
        ("empty serial", base + b"/heartbeat", "acked", "bad_topic"),
    ]


@dataclass
class Running:
    broker: Mosquitto
    gateway: GatewayProcess
    caller: RequestClient
    prefix: str

    async def metrics(self) -> dict[str, float]:
        return await scrape(self.gateway.metrics_port)

    async def rejected(self) -> dict[str, float]:
        samples = await self.metrics()
        counts = {
            name.split('reason="')[1].split('"')[0]: value for name, value in samples.items()
            if name.startswith("gateway_heartbeats_rejected_total{")}
        counts["stale"] = samples.get("gateway_heartbeats_stale_total", 0.0)
        return counts

    async def requests_handled(self) -> float:
        """Requests the gateway answered or dropped."""
        return sum(value for name, value in (await self.metrics()).items()
                   if name.startswith(("gateway_requests_total{",
                                       "gateway_requests_dropped_total{")))

    async def rss(self) -> float:
        """The gateway's RSS once it has settled (the lowest of a few readings)."""
        readings = []
        for _ in range(5):
            readings.append(rss_mib(self.gateway.pid))
            await asyncio.sleep(0.1)  # readings spread over half a second
        return min(readings)


@contextlib.asynccontextmanager
async def hostile_setup(config: Config, topic_prefix: str) -> AsyncIterator[Running]:
    key = (await create_key(config.database_url, auth.READ, auth.WRITE))[1]
    broker = Mosquitto()
    await asyncio.to_thread(broker.start)
    gateway = GatewayProcess(mqtt_url=broker.url, database_url=config.database_url,
                             topic_prefix=topic_prefix, client_id=config.client_id)
    try:
        gateway.start()
        await gateway.wait_healthy()
        async with RequestClient(broker.port, topic_prefix, key) as caller:
            yield Running(broker, gateway, caller, topic_prefix)
        assert gateway.proc is not None and gateway.proc.poll() is None, "the gateway died"
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(20) == 0
    finally:
        gateway.close()
        await asyncio.to_thread(broker.close)


async def device_row(db: asyncpg.Connection) -> dict[str, Any]:
    row = await db.fetchrow("SELECT d.*, h.* FROM devices d"
                            " JOIN device_health h ON h.device_id = d.id"
                            " WHERE d.serial_number = $1", SERIAL)
    return dict(row)


async def test_hostile_heartbeats_are_counted_and_change_nothing(
    config: Config, db: asyncpg.Connection, topic_prefix: str
) -> None:
    """Oversized (1 and 10 MiB), deeply nested, invalid UTF-8, NaN, huge integers, NUL,
    far-future timestamps, and serials with + # / $ NUL or SQL in the topic: each is
    rejected under its reason (or refused by the broker), the device's stored state is
    untouched, and the gateway's RSS stays within a few MiB over repeated rounds."""
    async with hostile_setup(config, topic_prefix) as run:
        status, device = await run.caller.call(
            "POST", "/v1/devices", {"serial_number": SERIAL, "device_type": "pin_v1"})
        assert status == 201
        topic = f"{topic_prefix}/devices/{SERIAL}/heartbeat"
        async with aiomqtt.Client("127.0.0.1", run.broker.port,
                                  protocol=aiomqtt.ProtocolVersion.V5) as dev:
            good = {"ts": now_ms(), "battery_percent": 55, "firmware_version": "1.0",
                    "storage_used_mb": 10, "recording_state": {"device_state": "idle"}}
            await dev.publish(topic, msgspec.json.encode(good), qos=1)

            async def applied() -> bool:
                return (await device_row(db))["battery_percent"] == 55

            await _until(applied)
            before = await device_row(db)
            devices_before = await db.fetchval("SELECT count(*) FROM devices")
            cases = hostile_heartbeats()
            topics = hostile_topics(topic_prefix)
            expected: dict[str, int] = {}
            for *_, reason in [*cases, *topics]:
                if reason is not None:
                    expected[reason] = expected.get(reason, 0) + 1

            counts0 = await run.rejected()
            received0 = (await run.metrics())["gateway_heartbeats_received_total"]
            rss_start = await run.rss()
            rss: list[float] = []
            broker_said: dict[str, str] = {}
            started = time.monotonic()
            for round_no in range(ROUNDS):
                for _, payload, _ in cases:
                    await dev.publish(topic, payload, qos=1)
                for name, raw_topic, _, _ in topics:
                    broker_said[name] = await raw_publish(run.broker.port, raw_topic,
                                                          b'{"battery_percent":1}')
                per_round = sum(expected.values())

                async def processed(n: int = round_no + 1, per: int = per_round) -> bool:
                    received = (await run.metrics())["gateway_heartbeats_received_total"]
                    return received - received0 >= n * per

                await _until(processed, 30)

                async def counted(n: int = round_no + 1) -> bool:
                    counts = await run.rejected()  # stale and unknown_device: after a write
                    return all(counts.get(reason, 0) - counts0.get(reason, 0) >= n * k
                               for reason, k in expected.items())

                await _until(counted)
                rss.append(await run.rss())
            elapsed = time.monotonic() - started
            counts = await run.rejected()
            after = await device_row(db)
            devices_after = await db.fetchval("SELECT count(*) FROM devices")
            healthy = (await run.metrics()).get("gateway_mqtt_connected")

            # Duplicate keys are not an error: the last one wins, as in most JSON parsers.
            await dev.publish(topic, b'{"ts":%d,"battery_percent":10,"battery_percent":90}'
                              % now_ms(), qos=1)

            async def last_key_won() -> bool:
                return (await device_row(db))["battery_percent"] == 90

            await _until(last_key_won)

    deltas = {reason: counts.get(reason, 0) - counts0.get(reason, 0) for reason in expected}
    figures = {
        "cases_per_round": len(cases) + len(topics),
        "rounds": ROUNDS,
        "seconds": round(elapsed, 1),
        "rejected_per_reason": deltas,
        "rss_mib_before": round(rss_start, 1),
        "rss_mib_per_round": [round(r, 1) for r in rss],
        "rss_growth_after_warmup_mib": round(rss[-1] - rss[0], 1),
        "rss_growth_total_mib": round(rss[-1] - rss_start, 1),
        "broker": broker_said,
    }
    report("hostile_heartbeats", **figures)
    assert deltas == {reason: ROUNDS * n for reason, n in expected.items()}, figures
    assert {name: broker_said[name] for name, *_ in topics} == {
        name: outcome for name, _, outcome, _ in topics}
    # Nothing about the device changed (the stale one is older than what is stored).
    assert after == before
    assert devices_after == devices_before and healthy == 1.0
    assert rss[-1] - rss[0] <= RSS_GROWTH_LIMIT_MIB, figures
    assert rss[-1] - rss_start <= 2 * RSS_GROWTH_LIMIT_MIB, figures
    assert device["serial_number"] == SERIAL


async def _at_least(value: Awaitable[float], least: float) -> bool:
    return await value >= least


async def _until(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {within} s"
        await asyncio.sleep(0.05)


def hostile_requests(device_id: str) -> list[tuple[str, tuple[Any, ...], int, str | None]]:
    """(case, (method, path, body, query), expected status, expected error type)."""
    bad_serials = ["a+b", "a#b", "a/b", "$SYS", "a\x00b", "x'; DROP TABLE devices;--",
                   "a" * 129, "", "\ud7ff\u00e9"]
    cases: list[tuple[str, tuple[Any, ...], int, str | None]] = [
        (f"serial {s[:12]!r}", ("POST", "/v1/devices", {"serial_number": s}, None),
         400, "validation_error") for s in bad_serials]
    path = f"/v1/devices/{device_id}"
    cases += [
        ("NUL in a query", ("GET", "/v1/devices", None, {"serial_number": "a\x00b"}),
         400, "validation_error"),
        ("NUL in end_user_id", ("GET", "/v1/devices", None, {"end_user_id": "eu\x00"}),
         400, "validation_error"),
        ("SQL in a query", ("GET", "/v1/devices", None, {"end_user_id": "' OR '1'='1"}),
         200, None),
        ("SQL in a cursor", ("GET", "/v1/devices", None,
                             {"starting_after": "x' OR 1=1 --"}), 404, "not_found"),
        ("SQL in an id", ("GET", "/v1/devices/dev_x' OR '1'='1", None, None),
         404, "not_found"),
        ("NUL in an id", ("GET", "/v1/devices/dev_\x00", None, None), 404, "not_found"),
        ("huge limit", ("GET", "/v1/devices", None, {"limit": "1" + "0" * 40}),
         400, "validation_error"),
        ("NUL in metadata", ("PATCH", path, {"metadata": {"note": "a\x00b"}}, None),
         400, "validation_error"),
        ("NUL in a metadata key", ("PATCH", path, {"metadata": {"k\x00": 1}}, None),
         400, "validation_error"),
        ("NUL in command params", ("POST", f"{path}/commands",
                                   {"type": "locate", "params": {"x": "\x00"}}, None),
         400, "validation_error"),
        ("NUL in an idempotency key", ("POST", f"{path}/commands",
                                       {"type": "locate", "idempotency_key": "k\x00"}, None),
         400, "validation_error"),
        ("huge int in settings", ("PUT", f"{path}/settings",
                                  {"power": {"auto_sleep_minutes": 10**30}}, None),
         400, "validation_error"),
        ("NUL in a time zone", ("PATCH", f"{path}/settings", {"upload": {
            "off_peak_hours": {"timezone": "UTC\x00"}}}, None), 400, "validation_error"),
        ("NUL in end_user_id body", ("POST", f"{path}/bind", {"end_user_id": "eu\x00"}, None),
         400, "validation_error"),
        ("Telemetron wildcard", ("POST", "/api/ext-v1/device",
                                 {"identifier": "a+b", "type": "sensor"}, None), 400, None),
        ("Telemetron NUL type", ("POST", "/api/ext-v1/device",
                                 {"identifier": "ok-1", "type": "x\x00"}, None), 400, None),
        ("Telemetron NUL property", ("POST", "/api/ext-v1/device", {
            "identifier": "ok-2", "type": "sensor", "properties": {"a": "\x00"}}, None),
         400, None),
    ]
    return cases


def hostile_envelopes() -> list[tuple[str, bytes, int | None]]:
    """(case, raw envelope, expected status; None: the broker discards it for the gateway
    and the caller times out): reply topic and correlation data are MQTT 5 properties."""
    nest = 20_000
    return [
        ("1 MiB envelope", b'{"method":"GET","path":"/v1/devices","body":"'
         + b"a" * MIB + b'"}', 400),
        ("10 MiB envelope", b'{"method":"GET","path":"/v1/devices","body":"'
         + b"a" * (10 * MIB) + b'"}', None),
        ("deep nesting", b'{"method":"GET","path":"/v1/devices","body":'
         + b"[" * nest + b"]" * nest + b"}", 400),
        ("invalid UTF-8", b'{"method":"GET","path":"/v1/devices\xff"}', 400),
        ("NaN", b'{"method":"GET","path":"/v1/devices","body":NaN}', 400),
        ("not an object", b'[1]', 400),
        ("empty", b"", 400),
    ]


@pytest.mark.slow
async def test_hostile_requests_get_contract_errors_and_change_nothing(
    config: Config, db: asyncpg.Connection, topic_prefix: str
) -> None:
    """Serials with + # / $ NUL or SQL, NUL in ids, queries and bodies, huge integers,
    oversized, deeply nested, invalid UTF-8 and NaN envelopes, reply topics outside
    api/v1/replies/: each gets its docs/protocol.md §5/§6 error (never a 500) or is dropped and
    counted; nothing is written; the gateway stays up with its memory bounded."""
    async with hostile_setup(config, topic_prefix) as run:
        status, device = await run.caller.call(
            "POST", "/v1/devices", {"serial_number": SERIAL, "metadata": {"a": 1}})
        assert status == 201
        cases = hostile_requests(device["id"])
        envelopes = hostile_envelopes()
        tables = ("devices", "commands", "device_settings_history")

        async def counts() -> dict[str, int]:
            return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}

        before, row_before = await counts(), await device_row(db)
        rss_start = await run.rss()
        rss: list[float] = []
        outcomes: dict[str, Any] = {}
        discarded: dict[str, asyncio.Future[dict[str, Any]]] = {}
        handled_before = await run.requests_handled()
        async with aiomqtt.Client("127.0.0.1", run.broker.port) as spy:
            await spy.subscribe(f"{topic_prefix}/devices/#", qos=1)
            await spy.subscribe("api/v1/replies/#", qos=1)
            await spy.subscribe(run.caller.reply_topic, qos=1)  # for the barrier below
            for _ in range(ROUNDS):
                for name, (method, path, body, query), _, _ in cases:
                    outcomes[name] = await run.caller.call(method, path, body, query=query)
                for name, payload, status in envelopes:
                    if status is None:  # never answered: see the barrier below
                        discarded[name] = run.caller.send_raw(payload)
                        continue
                    reply = await wait_reply(run.caller.send_raw(payload), 10)
                    outcomes[name] = reply and (reply["status"], reply.get("body"))
                for reply_to in ("api/v1/replies/#", f"{topic_prefix}/api/v1/replies/+",
                                 f"{topic_prefix}/devices/{SERIAL}/commands", "elsewhere"):
                    run.caller._publish(msgspec.json.encode(
                        {"method": "GET", "path": "/v1/devices", "reply_to": reply_to}))
                rss.append(await run.rss())
            # Duplicate keys: the last one wins, as in most JSON parsers.
            duplicate = await asyncio.wait_for(run.caller.send_raw(
                b'{"method":"GET","path":"/nowhere","path":"/v1/devices/%s",'
                b'"headers":{"authorization":"Bearer %s"}}'
                % (device["id"].encode(), run.caller.key.encode())), 10)
            # Barrier, by the gateway's counters: every request it got is answered or
            # dropped (the bad reply topics included), and the ones the broker discarded
            # would come on top.
            sent = ROUNDS * (len(cases) + len(envelopes) - len(discarded) + 4) + 1
            await _until(lambda: _at_least(run.requests_handled(), handled_before + sent))
            # Then one more request: its reply comes to the caller (and the spy) behind
            # every reply and every leak the gateway published before it.
            barrier = run.caller.send("GET", "/v1/devices")
            await asyncio.wait_for(barrier, 10)
            for name, future in discarded.items():
                reply = future.result() if future.done() else None
                outcomes[name] = reply and (reply["status"], reply.get("body"))
            leaked = []
            async with asyncio.timeout(10):
                async for message in spy.messages:
                    if message.topic.value != run.caller.reply_topic:
                        leaked.append(message.topic.value)
                    elif msgspec.json.decode(message.payload).get("correlation_id") == \
                            barrier.result()["correlation_id"]:
                        break
        samples = await run.metrics()
        after, row_after = await counts(), await device_row(db)

    errors_500 = sum(v for k, v in samples.items()
                     if k.startswith("gateway_requests_total") and 'status="500"' in k)
    dropped = samples.get('gateway_requests_dropped_total{reason="bad_reply_topic"}', 0)
    wrong = {}
    for name, _, status, error_type in cases:
        got_status, body = outcomes[name] or (None, None)
        got_type = body.get("error", {}).get("type") if isinstance(body, dict) else None
        if got_status != status or (error_type and got_type != error_type) or (
                name.startswith("Telemetron") and body.get("success") is not False):
            wrong[name] = outcomes[name]
    for name, _, status in envelopes:
        got_status, body = outcomes[name] or (None, {"error": {"type": "invalid_request"}})
        if got_status != status or body["error"].get("type") != "invalid_request":
            wrong[name] = outcomes[name]
    figures = {
        "cases_per_round": len(cases) + len(envelopes) + 4,
        "rounds": ROUNDS,
        "wrong_answers": len(wrong),
        "answered_500": errors_500,
        "bad_reply_topics_dropped": dropped,
        "messages_leaked_outside_replies": len(leaked),
        "rss_mib_before": round(rss_start, 1),
        "rss_mib_per_round": [round(r, 1) for r in rss],
        "rss_growth_after_warmup_mib": round(rss[-1] - rss[0], 1),
        "rss_growth_total_mib": round(rss[-1] - rss_start, 1),
    }
    report("hostile_requests", **figures)
    assert not wrong, wrong
    assert errors_500 == 0
    assert dropped == 4 * ROUNDS and not leaked, (dropped, leaked)
    assert duplicate["status"] == 200 and duplicate["body"]["id"] == device["id"]
    assert after == before and row_after == row_before
    assert rss[-1] - rss[0] <= RSS_GROWTH_LIMIT_MIB, figures
    assert rss[-1] - rss_start <= 2 * RSS_GROWTH_LIMIT_MIB, figures
