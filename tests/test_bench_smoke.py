"""Smoke test of the throughput benchmark: ``python -m bench.run`` on a small fleet.

10,000 devices, one fixed rate for 20 s (no ladder, no references), a short request/reply
burst, on a broker and a gateway process of the benchmark's own and a database of this
test's own. It asserts zero loss (every device's stored health is the last heartbeat sent
to it, nothing rejected, every request answered) and nothing about timing: CI machines
are shared and the figures mean nothing there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

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


def test_bench_small_fleet_loses_nothing(tmp_path: Path) -> None:
    database = f"gw_bench_smoke_{uuid.uuid4().hex[:10]}"
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    try:
        proc = subprocess.run(
            [
                sys.executable, "-m", "bench.run",
                "--devices", str(DEVICES), "--duration", str(SECONDS),
                "--rates", "", "--soak-rate", str(RATE),
                "--rpc-seconds", "2", "--rpc-warmup", "0.5",
                "--no-references", "--verify-sample", "0",
                "--database-url", f"{PG_ADMIN}/{database}", "--json", str(out),
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results = json.loads(out.read_text())
    finally:
        asyncio.run(_drop(database))

    soak = results["soak"]
    sent = RATE * SECONDS
    assert soak["sent"] == sent
    # Every device got heartbeats; each one's stored ts and battery are the last sent.
    assert soak["checked"] == DEVICES
    assert soak["mismatches"] == 0, soak["mismatch_examples"]
    assert soak["rejected"] == 0
    totals = results["gateway_totals"]
    assert totals["received"] == sent
    assert totals["rejected"] == {}
    rpc = results["rpc"]
    assert rpc["completed"] > 0
    assert rpc["timeouts"] == 0
    assert set(rpc["statuses"]) == {"200"}
    assert results["gateway_exit_code"] == 0
    assert "Targets" in results["report"]
