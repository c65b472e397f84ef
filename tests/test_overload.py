"""Overload delays, it never drops (docs/operations.md, Delivery semantics).

A burst far beyond what the gateway can write fills its heartbeat buffer: the heartbeat
connection stops reading, the broker holds the rest, nothing is counted as `overflow`,
requests still get their answers, and every device ends at its last heartbeat.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import pytest
from conftest import create_key, running_gateway, wait_for
from fleet import behind, seed, serials_for
from processes import Mosquitto, RequestClient, connect_packet, publish_packet
from sync_support import metric

from gateway.config import Config

pytestmark = pytest.mark.slow


def payload(ts: int, battery: int) -> bytes:
    return b'{"ts":%d,"battery_percent":%d}' % (ts, battery)


async def test_a_burst_beyond_the_buffer_is_delayed_never_dropped(
    config: Config, database_url: str, topic_prefix: str
) -> None:
    """20,000 heartbeats for 2,000 devices published as fast as one connection can, into
    a gateway whose buffer holds 300: the intake pauses, the overflow counter stays 0,
    a GET during the burst is answered within 5 s, and every device ends at its last
    heartbeat."""
    serials = serials_for(2000, "BURST-")
    conn = await asyncpg.connect(database_url)
    try:
        await seed(conn, serials)
        device_id = await conn.fetchval("SELECT id FROM devices LIMIT 1")
    finally:
        await conn.close()
    key = (await create_key(database_url, "devices:read"))[1]
    broker = Mosquitto()
    await asyncio.to_thread(broker.start)
    overflow_before = metric("gateway_heartbeats_rejected_total", reason="overflow")
    received_before = metric("gateway_heartbeats_received_total")
    cfg = dataclasses.replace(config, mqtt_url=broker.url, inbox_max=300, batch_max=100)
    try:
        async with running_gateway(cfg), \
                RequestClient(broker.port, topic_prefix, key) as api:
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            writer.write(connect_packet("burst-publisher", 0))
            await reader.readexactly(4)
            acks = asyncio.create_task(reader.read(-1))
            base = int(time.time() * 1000) - 100_000
            last: dict[str, int] = {}
            packet_id = 0
            for round_ in range(10):
                chunk = []
                for n, serial in enumerate(serials):
                    ts = base + round_ * 10_000 + n
                    last[serial] = ts
                    packet_id = packet_id % 65535 + 1
                    chunk.append(publish_packet(
                        f"{topic_prefix}/devices/{serial}/heartbeat".encode(), packet_id,
                        payload(ts, ts % 101)))
                writer.write(b"".join(chunk))
                await writer.drain()
            paused = False
            while not paused:  # the buffer filled up and reading stopped
                paused = metric("gateway_heartbeat_intake_paused") == 1.0
                if metric("gateway_heartbeats_received_total") - received_before >= 20_000:
                    break
                await asyncio.sleep(0.01)
            started = time.monotonic()
            answer = await api.call("GET", f"/v1/devices/{device_id}", within=5)
            answered_in = time.monotonic() - started
            await wait_for(lambda: metric("gateway_heartbeats_received_total")
                           - received_before >= 20_000, timeout=60)
            check = await asyncpg.connect(database_url)
            try:
                await wait_for(lambda: _converged(check, last), timeout=30)
            finally:
                await check.close()
            writer.close()
            acks.cancel()
    finally:
        await asyncio.to_thread(broker.close)
    print(f"\nFIGURES burst: paused={paused} get_answered_in_s={answered_in:.3f}")
    assert paused, "the intake never paused: the burst did not exceed the buffer"
    assert answer is not None and answer[0] == 200
    assert metric("gateway_heartbeats_rejected_total", reason="overflow") == overflow_before


async def _converged(conn: asyncpg.Connection, last: dict[str, int]) -> bool:
    return not await behind(conn, last)
