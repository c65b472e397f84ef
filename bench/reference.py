"""Run a reference receiver (`bench.ceiling` or `bench.baseline`) as a child process
that streams its progress, so `bench.run` can drive it through the same load ladder as
the gateway and read its CPU from ``/proc`` like the gateway's.

Protocol on stdout, one line each:

* ``ready`` once subscribed;
* ``p COUNT APPLIED`` every ``--interval`` seconds (APPLIED: rows the baseline's
  UPDATE hit; equal to COUNT for the ceiling);
* ``result {json}`` after SIGTERM or SIGINT, then the process exits 0.

CLI::

    python -m bench.reference ceiling|ceiling-drain|baseline --port 1883 \\
        [--database-url URL] [--topic-prefix ''] [--interval 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from bench._common import Progress, run
from bench.baseline import BaselineResult, Counts, run_baseline
from bench.ceiling import ReceiveResult, run_ceiling

KINDS = ("ceiling", "ceiling-drain", "baseline")


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop, ready = asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    progress, counts = Progress(), Counts()
    receiver: Coroutine[Any, Any, BaselineResult | ReceiveResult]
    if args.kind == "baseline":
        receiver = run_baseline(
            args.database_url, args.host, args.port, topic_prefix=args.topic_prefix,
            idle_timeout=None, ready=ready, progress=progress, counts=counts, stop=stop,
        )
    else:
        receiver = run_ceiling(
            args.host, args.port, topic_prefix=args.topic_prefix,
            drain=args.kind == "ceiling-drain", idle_timeout=None, ready=ready,
            progress=progress, stop=stop,
        )
    task: asyncio.Future[Any] = asyncio.ensure_future(receiver)

    def report() -> None:
        applied = counts.applied if args.kind == "baseline" else progress.count
        _emit(f"p {progress.count} {applied}")

    waiter: asyncio.Future[Any] = asyncio.ensure_future(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if ready.is_set():
        _emit("ready")
    while not task.done():
        await asyncio.wait([task], timeout=args.interval)
        report()
    result: BaselineResult | ReceiveResult = task.result()  # raises what it raised
    report()
    return result.as_dict()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A reference receiver that streams progress.")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/gw_bench")
    p.add_argument("--interval", type=float, default=0.1, help="progress line period, s")
    args = p.parse_args(argv)
    result = run(_main(args))
    _emit("result " + json.dumps(result))


if __name__ == "__main__":
    main()
