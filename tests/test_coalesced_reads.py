"""GET /v1/devices/{id} reads coalesced: devices asked for at the same time are read by
one statement, each caller gets its own device (or its own 404), and a failure reaches
every caller of the statement that failed (gateway/storage/coalesce.py)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Caller

from gateway.errors import NotFound, StorageUnavailable
from gateway.routes import new_id
from gateway.storage import Storage
from gateway.storage.coalesce import Coalesced
from gateway.storage.devices import READ_BATCH, NewDevice


async def registered(storage: Storage, count: int) -> list[str]:
    ids = [new_id("dev_") for _ in range(count)]
    await storage.devices.register_batch(
        [NewDevice(device_id, f"SN-READ-{n}") for n, device_id in enumerate(ids)])
    return ids


async def test_devices_asked_for_together_are_read_by_one_statement(database_url: str) -> None:
    """40 GETs at once (37 devices, one of them twice, a deleted one, an unknown id): one
    SELECT; each caller gets the device it asked for, the deleted and unknown ones 404."""
    statements: list[str] = []
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        ids = await registered(storage, 38)
        deleted = ids.pop()
        await storage.devices.delete(deleted)
        await storage.devices.get(ids[0])  # asyncpg learns the statement's types first
        async with storage.db.connection() as conn:
            conn.add_query_logger(lambda query: statements.append(query.query))
        asked = [*ids, ids[5], deleted, "dev_unknown"]
        answers = await asyncio.gather(*(storage.devices.get(device_id) for device_id in asked),
                                       return_exceptions=True)
    assert len(statements) == 1 and "ANY($1" in statements[0], statements
    for device_id, answer in zip(asked[:-2], answers[:-2], strict=True):
        assert not isinstance(answer, BaseException), answer
        assert answer.id == device_id
        assert answer.serial_number == f"SN-READ-{ids.index(device_id)}"
    assert [type(answer) for answer in answers[-2:]] == [NotFound, NotFound]


async def test_a_lone_read_is_sent_at_once_and_later_reads_see_later_writes(
    database_url: str,
) -> None:
    """Coalescing never waits for company, and a read asked after a write committed sees
    it (a caller's own PATCH, then its GET)."""
    async with Storage.open(database_url, min_size=1, max_size=2) as storage:
        [device_id] = await registered(storage, 1)
        assert (await storage.devices.get(device_id)).firmware_version is None
        await storage.devices.update(device_id, lambda device: ("9.9.9", device.metadata))
        async with asyncio.timeout(1):
            assert (await storage.devices.get(device_id)).firmware_version == "9.9.9"


async def test_more_devices_than_a_batch_go_in_several_statements(database_url: str) -> None:
    statements: list[str] = []
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        ids = await registered(storage, READ_BATCH * 2 + 10)
        await storage.devices.get(ids[0])
        async with storage.db.connection() as conn:
            conn.add_query_logger(lambda query: statements.append(query.query))
        answers = await asyncio.gather(*(storage.devices.get(device_id) for device_id in ids))
    assert [answer.id for answer in answers] == ids
    assert len([s for s in statements if "ANY($1" in s]) == 3


async def test_a_database_failure_reaches_every_caller_of_the_statement(
    database_url: str,
) -> None:
    """While the health check finds the database down, the shared statement fails at once
    and each of its callers gets the 503 error; once it answers again, reads are served."""
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        ids = await registered(storage, 5)
        storage.db._down = True  # what a failed health check (`Database.ping`) leaves
        answers = await asyncio.gather(*(storage.devices.get(device_id) for device_id in ids),
                                       return_exceptions=True)
        assert [type(answer) for answer in answers] == [StorageUnavailable] * 5, answers
        assert await storage.db.ping()
        assert [d.id for d in await asyncio.gather(*map(storage.devices.get, ids))] == ids


async def test_statements_at_once_stay_within_the_concurrency() -> None:
    """Keys asked for while `concurrency` statements run wait, and go together in the
    next one; the order of rows returned does not matter."""
    running = 0
    most_running = 0
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def fetch(keys: list[int]) -> dict[int, str]:
        nonlocal running, most_running
        calls.append(keys)
        running += 1
        most_running = max(most_running, running)
        await release.wait()
        running -= 1
        return {key: f"row {key}" for key in reversed(keys) if key != 7}

    reads = Coalesced(fetch, most=3, concurrency=2)
    first = [asyncio.ensure_future(reads.get(key)) for key in range(5)]
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(reads.get(key)) for key in range(5, 10)]
    await asyncio.sleep(0.01)
    assert calls == [[0, 1, 2], [3, 4]]  # two statements running; 5..9 wait
    release.set()
    results = await asyncio.gather(*first, *later)
    assert calls == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    assert most_running == 2
    assert results == [f"row {key}" if key != 7 else None for key in range(10)]


async def test_a_cancelled_caller_leaves_the_others_their_rows() -> None:
    async def fetch(keys: list[str]) -> dict[str, str]:
        await asyncio.sleep(0.01)
        return {key: key.upper() for key in keys}

    reads: Coalesced[str, str] = Coalesced(fetch, most=10, concurrency=1)
    gone = asyncio.ensure_future(reads.get("a"))
    kept = asyncio.ensure_future(reads.get("b"))
    await asyncio.sleep(0)
    gone.cancel()
    assert await kept == "B"
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_get_device_answers_over_mqtt_while_many_are_in_flight(api: Caller) -> None:
    """End to end: 30 GETs in flight at once, each answered with its own device."""
    ids = []
    for n in range(30):
        status, body = await api.call("POST", "/v1/devices", {"serial_number": f"SN-MANY-{n}"})
        assert status == 201
        ids.append(body["id"])
    answers = await asyncio.gather(*(api.call("GET", f"/v1/devices/{i}") for i in ids))
    assert [(status, body["id"]) for status, body in answers] == [(200, i) for i in ids]
