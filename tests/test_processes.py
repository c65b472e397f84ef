"""Several gateway processes on one broker and one database (docs/protocol.md §9;
docs/operations.md, Running several processes).

Each test runs real `gateway run` processes on the shared broker under a topic prefix of
its own, against its own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest
from conftest import MQTT_HOST, MQTT_PORT, MQTT_URL, NODELAY, create_key, wait_for
from fleet import Fleet, seed, serials_for, wait_converged
from processes import GatewayProcess, RequestClient, free_port, healthz, http_get, scrape

from gateway import auth

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SHARE_GROUP = "g"


def report(name: str, **figures: Any) -> None:
    print(f"\nFIGURES {name}: {json.dumps(figures)}")


@contextlib.contextmanager
def processes(database_url: str, prefix: str, count: int, *,
              share_group: str | None = SHARE_GROUP) -> Iterator[list[GatewayProcess]]:
    tag = uuid.uuid4().hex[:6]
    env = {"GATEWAY_SHARE_GROUP": share_group} if share_group else {}
    started = [GatewayProcess(mqtt_url=MQTT_URL, database_url=database_url,
                              topic_prefix=prefix, client_id=f"gw-{tag}-{n}", env=env)
               for n in range(1, count + 1)]
    try:
        yield started
    finally:
        for process in started:
            process.close()


async def start_all(started: list[GatewayProcess]) -> None:
    for process in started:
        process.start()
    await asyncio.gather(*(process.wait_healthy() for process in started))


class V311Caller:
    """A backend on MQTT 3.1.1: the reply topic and correlation id in the envelope. Counts
    every reply per correlation id, so a request answered twice shows."""

    def __init__(self, prefix: str, key: str) -> None:
        self.prefix = prefix
        self.key = key
        self.reply_topic = f"{prefix}/api/v1/replies/v311-{uuid.uuid4().hex[:6]}"
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self._ids = 0
        self.client = aiomqtt.Client(MQTT_HOST, MQTT_PORT, socket_options=NODELAY,
                                     protocol=aiomqtt.ProtocolVersion.V311,
                                     max_queued_outgoing_messages=10_000)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> V311Caller:
        await self.client.__aenter__()
        await self.client.subscribe(self.reply_topic, qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            reply = msgspec.json.decode(message.payload)
            self.replies.setdefault(str(reply.get("correlation_id")), []).append(reply)

    async def send(self, method: str, path: str, body: Any = None) -> str:
        self._ids += 1
        correlation = f"v311-{self._ids}"
        envelope = {"method": method, "path": path, "reply_to": self.reply_topic,
                    "correlation_id": correlation,
                    "headers": {"authorization": f"Bearer {self.key}"}}
        if body is not None:
            envelope["body"] = body
        await self.client.publish(f"{self.prefix}/api/v1/requests",
                                  msgspec.json.encode(envelope), qos=1)
        return correlation


class CountingV5(RequestClient):
    """`RequestClient` (MQTT 5) that also records how many replies each request got."""

    def __init__(self, port: int, prefix: str, key: str) -> None:
        super().__init__(port, prefix, key)
        self.count: dict[str, int] = {}

    def send(self, method: str, path: str, body: Any = None, **kwargs: Any
             ) -> asyncio.Future[dict[str, Any]]:
        future = super().send(method, path, body, **kwargs)
        correlation = f"c{self._ids}"
        self.count[correlation] = 0

        def counted(done: asyncio.Future[dict[str, Any]]) -> None:
            self.count[correlation] += 1

        future.add_done_callback(counted)
        return future


async def registered(database_url: str, serials: list[str]) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        await seed(conn, serials)
        rows = await conn.fetch("SELECT serial_number, id FROM devices")
    finally:
        await conn.close()
    return {row["serial_number"]: row["id"] for row in rows}


def drained_totals(started: list[GatewayProcess]) -> dict[str, int]:
    """Every run's heartbeat counts, from their `gateway.drained` log lines."""
    totals: dict[str, int] = {}
    for process in started:
        for run in range(1, process.runs + 1):
            for event in process.events(run):
                if event.get("event") == "gateway.drained":
                    for name, value in event.items():
                        if name.startswith("heartbeats_") and isinstance(value, int):
                            totals[name] = totals.get(name, 0) + value
    return totals


# ---- requests -------------------------------------------------------------------------------


async def test_three_processes_answer_every_request_once_and_apply_it_once(
    database_url: str, topic_prefix: str
) -> None:
    """Three processes on one share group, callers on MQTT 5 and 3.1.1: every request is
    answered exactly once, each command is created exactly once (no idempotency key, so a
    second execution would show as a second command), and the load is shared."""
    devices = await registered(database_url, serials_for(20, "REQ-"))
    key = (await create_key(database_url, auth.READ, auth.WRITE))[1]
    with processes(database_url, topic_prefix, 3) as started:
        await start_all(started)
        async with CountingV5(MQTT_PORT, topic_prefix, key) as v5, \
                V311Caller(topic_prefix, key) as v311:
            futures = []
            sent311 = []
            for n, device_id in enumerate(list(devices.values()) * 10):
                path = f"/v1/devices/{device_id}/commands"
                body = {"type": "locate", "params": {"n": n}}
                if n % 2:
                    futures.append(v5.send("POST", path, body))
                    futures.append(v5.send("GET", f"/v1/devices/{device_id}"))
                else:
                    sent311.append(await v311.send("POST", path, body))
                    sent311.append(await v311.send("GET", f"/v1/devices/{device_id}"))
            replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
            await wait_for(lambda: all(c in v311.replies for c in sent311), timeout=30)
            # Barrier: one more request on each connection, answered after the others.
            assert (await v5.call("GET", "/v1/devices"))[0] == 200  # type: ignore[index]
            last = await v311.send("GET", "/v1/devices")
            await wait_for(lambda: last in v311.replies, timeout=10)
        answered_by = [
            sum(value for name, value in (await scrape(p.metrics_port)).items()
                if name.startswith("gateway_requests_total")) for p in started]
    assert all(reply["status"] in (200, 201) for reply in replies)
    assert all(count == 1 for count in v5.count.values()), v5.count
    assert all(len(v311.replies[c]) == 1 for c in sent311)
    assert all(v311.replies[c][0]["body"] is not None for c in sent311)
    conn = await asyncpg.connect(database_url)
    try:
        commands = await conn.fetchval("SELECT count(*) FROM commands")
    finally:
        await conn.close()
    assert commands == 200  # one per POST: none applied twice
    report("three_processes_requests", requests=len(futures) + len(sent311) + 2,
           answered_per_process=answered_by)
    assert all(count > 0 for count in answered_by), answered_by


# ---- heartbeats -----------------------------------------------------------------------------


async def test_an_older_heartbeat_never_wins_whichever_process_handles_it(
    database_url: str, topic_prefix: str
) -> None:
    """One device's heartbeats in shuffled order, spread over three processes: the stored
    state is the newest one's, never an older one's (the ts guard is in PostgreSQL)."""
    await registered(database_url, ["SN-GUARD"])
    base = int(time.time() * 1000) - 60_000
    order = list(range(300))
    random.shuffle(order)
    with processes(database_url, topic_prefix, 3) as started:
        await start_all(started)
        async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, socket_options=NODELAY) as device:
            for n in order:
                await device.publish(f"{topic_prefix}/devices/SN-GUARD/heartbeat",
                                     msgspec.json.encode({"ts": base + n,
                                                          "battery_percent": n % 101}),
                                     qos=1)

        async def all_handled() -> bool:
            seen = 0.0
            for process in started:
                values = await scrape(process.metrics_port)
                seen += values.get("gateway_heartbeats_received_total", 0)
            return seen == len(order)

        await wait_for(all_handled, timeout=20)
        conn = await asyncpg.connect(database_url)
        try:
            # Barrier: every received heartbeat is also written (applied or stale).
            await wait_for(lambda: conn.fetchval(
                "SELECT last_ts = $1 FROM device_health WHERE serial_number = 'SN-GUARD'",
                base + 299), timeout=10)
            row = await conn.fetchrow("SELECT last_ts, battery_percent FROM device_health"
                                      " WHERE serial_number = 'SN-GUARD'")
        finally:
            await conn.close()
        handled_by = [(await scrape(p.metrics_port)).get(
            "gateway_heartbeats_received_total", 0) for p in started]
    assert (row["last_ts"], row["battery_percent"]) == (base + 299, 299 % 101)
    assert sum(1 for count in handled_by if count > 0) >= 2, handled_by


async def test_each_heartbeat_gets_one_commands_message(
    database_url: str, topic_prefix: str
) -> None:
    """With three processes, a device with an open command gets exactly one commands
    message per heartbeat applied, not one per process."""
    devices = await registered(database_url, ["SN-ONCE"])
    key = (await create_key(database_url, auth.WRITE))[1]
    with processes(database_url, topic_prefix, 3) as started:
        await start_all(started)
        async with RequestClient(MQTT_PORT, topic_prefix, key) as api:
            result = await api.call("POST", f"/v1/devices/{devices['SN-ONCE']}/commands",
                                    {"type": "locate"})
            assert result is not None and result[0] == 201
        received: list[bytes] = []
        async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, socket_options=NODELAY) as device:
            await device.subscribe(f"{topic_prefix}/devices/SN-ONCE/commands", qos=1)

            async def collect() -> None:
                async for message in device.messages:
                    assert isinstance(message.payload, bytes)
                    received.append(message.payload)

            reader = asyncio.create_task(collect())
            base = int(time.time() * 1000)
            for n in range(12):
                await device.publish(f"{topic_prefix}/devices/SN-ONCE/heartbeat",
                                     msgspec.json.encode({"ts": base + n}), qos=1)
                await wait_for(lambda n=n: len(received) >= n + 1, timeout=10)
            # Barrier: the 13th heartbeat's message is the 13th message.
            await device.publish(f"{topic_prefix}/devices/SN-ONCE/heartbeat",
                                 msgspec.json.encode({"ts": base + 12}), qos=1)
            await wait_for(lambda: len(received) >= 13, timeout=10)
            reader.cancel()
    assert len(received) == 13


# ---- a process dies -------------------------------------------------------------------------


async def test_a_killed_process_is_replaced_at_once_and_loses_at_most_its_window(
    database_url: str, topic_prefix: str
) -> None:
    """Under load (1,000 devices a second, and requests), one of three processes is
    SIGKILLed: every request published after the kill is answered by the others, every
    device converges, and what was lost is within the dead process's in-flight window."""
    serials = serials_for(1000, "KILL-")
    devices = await registered(database_url, serials)
    key = (await create_key(database_url, auth.READ))[1]
    with processes(database_url, topic_prefix, 3) as started:
        await start_all(started)
        fleet = Fleet(MQTT_PORT, topic_prefix, serials)
        fleet.start()
        conn = await asyncpg.connect(database_url)
        try:
            await fleet.running(conn)
            async with RequestClient(MQTT_PORT, topic_prefix, key) as api:
                victim = started[1]
                before = await scrape(victim.metrics_port)
                victim.send(signal.SIGKILL)
                killed_at = time.monotonic()
                await victim.wait_exit()
                ids = list(devices.values())
                futures = []
                latencies: list[float] = []
                for n in range(60):
                    sent = time.monotonic()
                    future = api.send("GET", f"/v1/devices/{ids[n]}")
                    future.add_done_callback(
                        lambda _, sent=sent: latencies.append(time.monotonic() - sent))
                    futures.append(future)
                    await asyncio.sleep(0.05)  # a steady caller, 20 requests a second
                replies = await asyncio.gather(*(asyncio.wait_for(f, 10) for f in futures))
                first_answer = time.monotonic() - killed_at
            after_kill = time.monotonic()
            converged_in, late = await wait_converged(conn, fleet.acked_after(after_kill), 15)
            await fleet.stop()
            _, still_late = await wait_converged(conn, fleet.latest, 15)
        finally:
            await conn.close()
        survivors = [p for p in started if p is not victim]
        for process in survivors:
            process.send(signal.SIGTERM)
        codes = [await process.wait_exit() for process in survivors]
        received = drained_totals(survivors)["heartbeats_received"]
    acked = len(fleet.acked)
    killed_received = int(before.get("gateway_heartbeats_received_total", 0))
    lost_at_most = acked - received - killed_received
    figures = {
        "requests_after_kill": len(futures),
        "answered": sum(1 for reply in replies if reply["status"] == 200),
        "fastest_reply_after_kill_s": round(min(latencies), 3),
        "slowest_reply_after_kill_s": round(max(latencies), 3),
        "all_answered_after_kill_s": round(first_answer, 2),
        "heartbeats_acked_by_broker": acked,
        "heartbeats_lost_at_most": lost_at_most,
        "in_flight_window": 20_000,
        "devices_converged_after_kill_s": converged_in and round(converged_in, 2),
    }
    report("process_sigkill", **figures)
    assert all(reply["status"] == 200 for reply in replies)
    assert not late and not still_late, figures
    assert codes == [0, 0]
    assert lost_at_most <= 20_000, figures


# ---- rolling restart ------------------------------------------------------------------------


async def test_a_rolling_restart_under_load_loses_nothing(
    database_url: str, topic_prefix: str
) -> None:
    """Three processes, 1,000 devices a second and a steady stream of requests; each
    process in turn gets SIGTERM, exits 0, and is started again. No heartbeat the broker
    acknowledged is lost (every one is received by some process and handled), and no
    request goes unanswered."""
    serials = serials_for(1000, "ROLL-")
    devices = await registered(database_url, serials)
    key = (await create_key(database_url, auth.READ, auth.WRITE))[1]
    ids = list(devices.values())
    with processes(database_url, topic_prefix, 3) as started:
        await start_all(started)
        fleet = Fleet(MQTT_PORT, topic_prefix, serials)
        fleet.start()
        conn = await asyncpg.connect(database_url)
        futures: list[asyncio.Future[dict[str, Any]]] = []
        stopping = False
        try:
            await fleet.running(conn)
            async with RequestClient(MQTT_PORT, topic_prefix, key) as api:

                async def requests() -> None:
                    n = 0
                    while not stopping:
                        futures.append(api.send("PATCH", f"/v1/devices/{ids[n % len(ids)]}",
                                                {"metadata": {"n": n}}))
                        n += 1
                        await asyncio.sleep(0.02)  # 50 requests a second

                caller = asyncio.create_task(requests())
                exits = []
                for process in started:
                    process.send(signal.SIGTERM)
                    exits.append(await process.wait_exit())
                    process.start()
                    await process.wait_healthy()
                stopping = True
                await caller
                replies = await asyncio.gather(*(asyncio.wait_for(f, 15) for f in futures))
            await fleet.stop()
            _, late = await wait_converged(conn, fleet.latest, 15)
        finally:
            await conn.close()
        for process in started:
            process.send(signal.SIGTERM)
        exits += [await process.wait_exit() for process in started]
        totals = drained_totals(started)
    acked = len(fleet.acked)
    handled = (totals["heartbeats_applied"] + totals["heartbeats_stale"]
               + totals["heartbeats_superseded"])
    figures = {"heartbeats_acked_by_broker": acked, **totals, "requests": len(futures),
               "answered": len(replies), "exit_codes": exits}
    report("rolling_restart", **figures)
    assert exits == [0] * 6
    assert totals["heartbeats_received"] == acked, figures
    assert handled == acked and totals["heartbeats_rejected"] == 0, figures
    assert all(reply["status"] == 200 for reply in replies)
    assert not late


# ---- misconfiguration -----------------------------------------------------------------------


def gateway_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "run", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={**clean, **env})


@pytest.mark.parametrize(("first", "second", "says"), [
    ({"GATEWAY_CLIENT_ID": "same"}, {"GATEWAY_CLIENT_ID": "same"}, "is in use by same"),
    ({"GATEWAY_SHARE_GROUP": "g"}, {}, "with share group 'g'"),
    ({}, {"GATEWAY_SHARE_GROUP": "g"}, "with no share group"),
    ({}, {}, "with no share group"),
    ({"GATEWAY_SHARE_GROUP": "g"}, {"GATEWAY_SHARE_GROUP": "h"}, "with share group 'g'"),
])
async def test_a_process_that_would_clash_is_refused_and_knocks_nobody_off(
    database_url: str, topic_prefix: str, first: dict[str, str], second: dict[str, str],
    says: str,
) -> None:
    """A second process with a client id in use, or with another share group (or none)
    on the same topic prefix, exits 1 with one line naming the conflict and the fix,
    before it connects to the broker: the first keeps running undisturbed."""
    running = GatewayProcess(mqtt_url=MQTT_URL, database_url=database_url,
                             topic_prefix=topic_prefix,
                             client_id=first.get("GATEWAY_CLIENT_ID", "first"), env=first)
    try:
        running.start()
        await running.wait_healthy()
        reconnects = (await scrape(running.metrics_port)).get(
            "gateway_mqtt_reconnects_total", 0)
        env = {"GATEWAY_DATABASE_URL": database_url, "GATEWAY_MQTT_URL": MQTT_URL,
               "GATEWAY_TOPIC_PREFIX": topic_prefix, "GATEWAY_CLIENT_ID": "second",
               "GATEWAY_METRICS_ADDR": f"127.0.0.1:{free_port()}", **second}
        result = await asyncio.to_thread(gateway_cli, env=env)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert "refused to start" in line and says in line, line
        assert "GATEWAY_CLIENT_ID" in line or "GATEWAY_SHARE_GROUP" in line
        assert await healthz(running.metrics_port) == 200
        assert (await scrape(running.metrics_port)).get(
            "gateway_mqtt_reconnects_total", 0) == reconnects
    finally:
        running.close()


# ---- gateway run --workers N ----------------------------------------------------------------


async def test_workers_share_the_load_behind_one_metrics_and_health_endpoint(
    database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """`gateway run --workers 3`: one /metrics with every worker's series labelled, one
    /healthz; requests are answered; a killed worker is restarted and health comes back;
    SIGTERM stops them all and the supervisor exits 0."""
    port = free_port()
    client_id = f"w-{uuid.uuid4().hex[:6]}"
    key = (await create_key(database_url, auth.READ))[1]

    async def healthy() -> bool:
        return await healthz(port) == 200

    log = (tmp_path / "supervisor.log").open("wb")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "--workers", "3",
        "--database-url", database_url, "--mqtt-url", MQTT_URL,
        "--topic-prefix", topic_prefix, "--client-id", client_id,
        "--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json",
        cwd=ROOT, env=clean, stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_for(healthy, timeout=30)
        text = (await http_get(port, "/metrics"))[1].decode()
        for worker in ("1", "2", "3"):
            assert re.search(rf'^gateway_mqtt_connected\{{worker="{worker}"\}} 1\.0$', text,
                             re.M), text[:2000]
            assert f'process_resident_memory_bytes{{worker="{worker}"}}' in text
        async with RequestClient(MQTT_PORT, topic_prefix, key) as api:
            for _ in range(9):
                assert (await api.call("GET", "/v1/devices"))[0] == 200  # type: ignore[index]
        pids = worker_pids(tmp_path / "supervisor.log")
        os.kill(pids[2], signal.SIGKILL)
        await wait_for(lambda: len(worker_pids(tmp_path / "supervisor.log")) == 4, timeout=20)
        await wait_for(healthy, timeout=30)
        text = (await http_get(port, "/metrics"))[1].decode()
        assert re.search(r"^gateway_worker_restarts_total 1\.0$", text, re.M)
        supervisor.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(supervisor.wait(), 30)
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
            await supervisor.wait()
        log.close()
    events = [json.loads(line) for line in (tmp_path / "supervisor.log").read_text().splitlines()
              if line.startswith("{")]
    assert code == 0
    assert sum(1 for e in events if e.get("event") == "supervisor.worker_stopped") == 3
    ready = {e["client_id"] for e in events if e.get("event") == "gateway.ready"}
    assert ready == {f"{client_id}-1", f"{client_id}-2", f"{client_id}-3"}
    assert {e["share_group"] for e in events if e.get("event") == "gateway.ready"} == {
        "gateway"}


def worker_pids(log: Path) -> list[int]:
    pids = []
    for line in log.read_text().splitlines():
        if '"supervisor.worker_started"' in line:
            pids.append(json.loads(line)["pid"])
    return pids

