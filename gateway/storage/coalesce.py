"""Reads of one row by key, coalesced: callers waiting at the same time share a statement.

Reading one device costs a round trip and a statement's fixed price in PostgreSQL (the
cached plan's bind, executor start-up, three index lookups) and in the gateway's asyncpg
call; the rows themselves are cheap. Under load many reads wait at once, so `Coalesced`
takes every key asked for in one pass of the event loop and reads them with one
``= ANY($1)`` statement. At most ``concurrency`` statements run at a time; keys asked for
meanwhile wait and go together in the next. A lone read is sent in the same pass of the
event loop as it is asked, so coalescing adds no wait when the gateway is idle.

Each statement is a snapshot of its own: a read never sees less than what was committed
before it was asked (a caller's own write, answered before its next request, is seen).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class Coalesced(Generic[K, R]):
    """``await get(key)``: the row for ``key`` (None when there is none), read together
    with the other keys asked for at the same time by ``fetch(keys)``, which returns the
    rows it found by key."""

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Mapping[K, R]]],
        *,
        most: int,
        concurrency: int,
    ) -> None:
        self._fetch = fetch
        self._most = most
        self._concurrency = concurrency
        self._waiting: dict[K, list[asyncio.Future[R | None]]] = {}
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> R | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R | None] = loop.create_future()
        self._waiting.setdefault(key, []).append(future)
        if not self._scheduled:
            # After the other callers already scheduled in this pass have asked too.
            self._scheduled = True
            loop.call_soon(self._start)
        return await future

    def _start(self) -> None:
        self._scheduled = False
        while self._waiting and len(self._running) < self._concurrency:
            keys = list(self._waiting)[: self._most]
            batch = {key: self._waiting.pop(key) for key in keys}
            task = asyncio.create_task(self._read(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._waiting and not self._scheduled:
            self._start()

    async def _read(self, batch: dict[K, list[asyncio.Future[R | None]]]) -> None:
        try:
            rows = await self._fetch(list(batch))
        except BaseException as exc:
            for futures in batch.values():
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for key, futures in batch.items():
            row = rows.get(key)
            for future in futures:
                if not future.done():
                    future.set_result(row)
