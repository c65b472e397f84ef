"""Smoke test of the throughput benchmark: ``python -m bench.run`` on a small fleet.

10,000 devices, one fixed rate for 20 s (no ladder, no references), a short request/reply
burst, on a broker and a gateway process of the benchmark's own and a database of this
test's own. It asserts zero loss (every device's stored health is the last heartbeat sent
to it, nothing rejected, every request answered) and nothing about timing: CI machines
are shared and the figures mean nothing there. Then the ``--overload`` mode, short and at
a rate a CI machine keeps up with, on ``--gateway-workers 2``: the same zero loss, the
heartbeat counts summed over both workers, every probe request answered, CPU per process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
DEVICES = 10_000
RATE = 1_000
SECONDS = 20

pytestmark = [
    pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(),
                       reason="the benchmark starts its own Mosquitto"),
    # Its own broker, gateway process and database, for 20 s and more.
    pytest.mark.fault,
    pytest.mark.slow,
]


async def _drop(name: str) -> None:
    conn = await asyncpg.connect(f"{PG_ADMIN}/postgres")
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def _bench(tmp_path: Path, *argv: str) -> dict[str, Any]:
    """Run ``python -m bench.run`` on DEVICES devices in a database of its own; its JSON."""
    database = f"gw_bench_smoke_{uuid.uuid4().hex[:10]}"
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    try:
        proc = subprocess.run(
            [
                sys.executable, "-m", "bench.run", "--devices", str(DEVICES), *argv,
                "--no-references", "--verify-sample", "0",
                "--database-url", f"{PG_ADMIN}/{database}", "--json", str(out),
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results: dict[str, Any] = json.loads(out.read_text())
    finally:
        asyncio.run(_drop(database))
    return results


def test_bench_small_fleet_loses_nothing(tmp_path: Path) -> None:
    results = _bench(tmp_path, "--duration", str(SECONDS), "--rates", "",
                     "--soak-rate", str(RATE), "--rpc-seconds", "2", "--rpc-warmup", "0.5")

    soak = results["soak"]
    sent = RATE * SECONDS
    assert soak["sent"] == sent
    # Every device got heartbeats; each one's stored ts and battery are the last sent.
    assert soak["checked"] == DEVICES
    assert soak["mismatches"] == 0, soak["mismatch_examples"]
    assert soak["rejected"] == 0
    assert soak["rejected_by"] == {} and soak["overflow"] == 0
    assert soak["applied"] + soak["stale"] + soak["superseded"] == sent
    assert soak["cpu_ms_per_1k"] is not None and soak["all_ms_per_1k"] is not None
    assert results["losses"] == []
    totals = results["gateway_totals"]
    assert totals["received"] == sent
    assert totals["rejected"] == {}
    rpc = results["rpc"]
    assert rpc["completed"] > 0
    assert rpc["timeouts"] == 0
    assert set(rpc["statuses"]) == {"200"}
    assert results["gateway_exit_code"] == 0
    assert "Targets" in results["report"]


def test_bench_overload_mode_with_workers(tmp_path: Path) -> None:
    rate, seconds = 2_000, 6
    results = _bench(tmp_path, "--duration", str(seconds), "--rates", "",
                     "--soak-rate", str(rate), "--overload", "--gateway-workers", "2",
                     "--rpc-seconds", "0")
    assert "soak" not in results or results["soak"] is None
    over = results["overload"]
    sent = rate * seconds
    assert over["sent"] == sent
    # Summed over both workers: every heartbeat accounted for, none lost or rejected.
    assert over["accounted_for"] and over["processed"] == sent
    assert over["applied"] + over["stale"] + over["superseded"] == sent
    assert over["overflow"] == 0 and over["rejected_by"] == {}
    assert over["checked"] == DEVICES
    assert over["mismatches"] == 0, over["mismatch_examples"]
    assert over["zero_loss"]
    assert results["gateway_totals"]["received"] == sent
    assert set(results["gateway_processes"]) == {"supervisor", "worker 1", "worker 2"}
    assert set(over["cpu_by_process"]) == {"supervisor", "worker 1", "worker 2"}
    probe = over["probe"]
    assert probe["sent"] > 0 and probe["answered"] == probe["sent"]
    assert probe["timeouts"] == 0 and set(probe["statuses"]) == {"200"}
    assert results["losses"] == []
    assert results["gateway_exit_code"] == 0
    assert "overload: every probe answered" in results["report"]
