"""Small helpers shared by the benchmark receivers (ceiling, baseline)."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def cpu_seconds() -> float:
    """User + system CPU of this whole process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """asyncio.run, on uvloop unless told otherwise."""
    if not use_uvloop:
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)


@dataclass(slots=True)
class Progress:
    """Counters a receive loop updates and a watcher reads (same thread, no locking)."""

    count: int = 0
    first: float = 0.0  # perf_counter() at the first message (0: none yet)
    last: float = 0.0  # perf_counter() at the latest message

    @property
    def span(self) -> float:
        return self.last - self.first if self.first else 0.0


async def run_until(
    receive: Awaitable[None],
    progress: Progress,
    *,
    count: int | None,
    duration: float | None,
    idle_timeout: float | None,
    stop: asyncio.Event | None = None,
    poll: float = 0.05,
) -> None:
    """Run ``receive`` until it returns, or until ``count`` messages were counted,
    ``duration`` seconds passed, ``idle_timeout`` seconds passed without a message
    after the first one, or ``stop`` is set; then cancel it."""
    task = asyncio.ensure_future(receive)
    start = time.perf_counter()
    try:
        while not task.done():
            await asyncio.wait([task], timeout=poll)
            now = time.perf_counter()
            if count is not None and progress.count >= count:
                break
            if duration is not None and now - start >= duration:
                break
            if idle_timeout is not None and progress.first and now - progress.last > idle_timeout:
                break
            if stop is not None and stop.is_set():
                break
    finally:
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Swallow only our own cancellation of the receive task, not the caller's.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
