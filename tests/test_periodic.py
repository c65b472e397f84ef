"""Periodic work runs once per period whatever the number of processes, and a background
loop that fails unexpectedly runs again instead of ending the gateway."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
from conftest import wait_for

from gateway import app
from gateway.storage import Storage


async def test_one_claimer_per_period_among_several_processes(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Three pools (three processes, as far as PostgreSQL can tell) claim the same sweep at
    once: exactly one wins; in the same period nobody else does; the next period has
    exactly one winner again."""
    async with contextlib.AsyncExitStack() as stack:
        pools = [await stack.enter_async_context(Storage.open(database_url, min_size=1,
                                                              max_size=1))
                 for _ in range(3)]

        async def round_() -> list[bool]:
            return list(await asyncio.gather(*(s.db.claim("probe", 0.5) for s in pools)))

        assert sorted(await round_()) == [False, False, True]
        assert await round_() == [False, False, False]
        next_run = await db.fetchval("SELECT next_run FROM sweeps WHERE name = 'probe'")
        await wait_for(lambda: db.fetchval("SELECT now() >= $1::timestamptz", next_run))
        assert sorted(await round_()) == [False, False, True]


async def test_a_background_loop_that_fails_unexpectedly_runs_again() -> None:
    """An exception no loop expects is logged and the loop starts over; only a
    cancellation stops it."""
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("a bug")

    task = asyncio.create_task(app.supervised("flaky", flaky, restart_seconds=0.01))
    await wait_for(lambda: runs >= 3, timeout=5)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
