"""A heartbeat batch PostgreSQL refuses does not stop the pipeline or lose the others."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from conftest import Caller, caller, running_gateway, wait_for
from gateway_codecs.device import Heartbeat
from sync_support import rejected

from gateway import metrics
from gateway.app import Gateway
from gateway.config import Config
from gateway.heartbeat_buffer import Pending


async def test_a_poison_heartbeat_is_isolated_and_the_rest_of_its_batch_applies(
    api: Caller, gateway: Gateway, db: asyncpg.Connection
) -> None:
    """A row the database rejects (battery past smallint, which the codec would never let
    through) is halved out of its batch, dropped and counted as write_error; the other
    devices in the same batch are applied and the writer keeps going."""
    serials = [f"SN-POISON-{n}" for n in range(9)]
    for serial in serials:
        status, _ = await api.call("POST", "/v1/devices", {"serial_number": serial})
        assert status == 201
    before = rejected("write_error")
    now = time.time()
    ts = int(now * 1000)
    for n, serial in enumerate(serials):
        battery = 40_000 if n == 4 else n  # 40,000 overflows the smallint column
        gateway.buffer.add(serial, Pending(Heartbeat(ts=ts, battery_percent=battery), now))

    async def applied() -> bool:
        rows = await db.fetch(
            "SELECT serial_number, battery_percent FROM device_health"
            " WHERE serial_number = ANY($1)",
            serials,
        )
        return sum(r["battery_percent"] is not None for r in rows) == 8

    await wait_for(applied)
    assert rejected("write_error") == before + 1
    stored = await db.fetchval(
        "SELECT battery_percent FROM device_health WHERE serial_number = $1", serials[4]
    )
    assert stored is None
    # The writer is still alive: a later heartbeat for the poisoned device applies.
    gateway.buffer.add(serials[4], Pending(Heartbeat(ts=ts + 1, battery_percent=55), now))

    async def recovered() -> bool:
        return await db.fetchval(
            "SELECT battery_percent FROM device_health WHERE serial_number = $1", serials[4]
        ) == 55

    await wait_for(recovered)


@pytest.mark.fault
async def test_a_dropped_database_is_unavailable_and_the_gateway_stays_up(
    config: Config, topic_prefix: str, api_key: str, database_url: str
) -> None:
    """PostgreSQL up but refusing the gateway's new connections for another reason than
    being down (here its database was dropped) reads as unavailable: requests are answered
    503, and the health check and the command sweep go on instead of ending the gateway."""
    config = dataclasses.replace(config, health_interval_seconds=0.1,
                                 health_recheck_seconds=0.1, command_sweep_seconds=0.1)
    async with running_gateway(config) as gateway, caller(topic_prefix, api_key) as api:
        # Count the health checks and sweep claims from here on (each still runs the real
        # thing against the real database).
        calls = {"ping": 0, "claim": 0}
        db = gateway.storage.db
        for method in calls:
            setattr(db, method, _counting(calls, method, getattr(db, method)))
        server, name = database_url.rsplit("/", 1)
        status, _ = await api.call("GET", "/v1/devices")
        assert status == 200
        admin = await asyncpg.connect(f"{server}/postgres")
        try:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        finally:
            await admin.close()
        status, body = await api.call("GET", "/v1/devices")
        assert (status, body["error"]["type"]) == (503, "unavailable")
        # Past a health check and a command sweep, both of which fail to connect.
        dropped = dict(calls)
        await wait_for(lambda: all(calls[m] >= dropped[m] + 2 for m in calls))
        (run,) = [t for t in asyncio.all_tasks() if t.get_name() == "gateway-under-test"]
        assert not run.done()
        assert metrics.DATABASE_CONNECTED._value.get() == 0
        status, body = await api.call("GET", "/v1/devices")
        assert (status, body["error"]["type"]) == (503, "unavailable")


def _counting(calls: dict[str, int], name: str,
              method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        finally:
            calls[name] += 1

    return counted
