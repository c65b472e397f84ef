"""A heartbeat batch PostgreSQL refuses does not stop the pipeline or lose the others."""

from __future__ import annotations

import time

import asyncpg
from conftest import Caller, wait_for
from gateway_codecs.device import Heartbeat
from sync_support import rejected

from gateway.app import Gateway
from gateway.ingest import Pending


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
        gateway.ingest.add(serial, Pending(Heartbeat(ts=ts, battery_percent=battery), now))

    async def applied() -> bool:
        rows = await db.fetch(
            "SELECT serial_number, battery_percent FROM devices WHERE serial_number = ANY($1)",
            serials,
        )
        return sum(r["battery_percent"] is not None for r in rows) == 8

    await wait_for(applied)
    assert rejected("write_error") == before + 1
    stored = await db.fetchval(
        "SELECT battery_percent FROM devices WHERE serial_number = $1", serials[4]
    )
    assert stored is None
    # The writer is still alive: a later heartbeat for the poisoned device applies.
    gateway.ingest.add(serials[4], Pending(Heartbeat(ts=ts + 1, battery_percent=55), now))

    async def recovered() -> bool:
        return await db.fetchval(
            "SELECT battery_percent FROM devices WHERE serial_number = $1", serials[4]
        ) == 55

    await wait_for(recovered)
