"""Faults while 1,000 devices heartbeat: broker restarts, a killed gateway, a database
outage, a graceful shutdown. Each test measures what happens and prints the figures.

Every test runs its own Mosquitto (and, for the outage, its own PostgreSQL cluster) from
``processes.py``, never the shared ones. Longer runs, as documented in
docs/operations.md (Reliability):

    GATEWAY_FAULT_DB_OUTAGE=30 pytest tests/test_faults.py -k database_outage -s
    GATEWAY_FAULT_DEVICES=10000 pytest tests/test_faults.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import os
import signal
import time
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest
from conftest import create_key, running_gateway, wait_for
from fleet import (
    INTERVAL,
    Fleet,
    behind,
    seed,
    serials_for,
    start_own_services,
    wait_converged,
)
from processes import (
    GatewayProcess,
    HealthLog,
    Mosquitto,
    Postgres,
    RequestClient,
    connect_packet,
    publish_packet,
    rss_mib,
    scrape,
    wait_reply,
)

from gateway import auth, metrics
from gateway.app import Gateway
from gateway.config import Config
from gateway.storage import Storage
from gateway.storage.heartbeats import HeartbeatColumns

# Every test here starts a broker (and a database or gateway process) of its own and breaks it.
pytestmark = pytest.mark.fault

DEVICES = int(os.environ.get("GATEWAY_FAULT_DEVICES", "1000"))
DB_OUTAGE = float(os.environ.get("GATEWAY_FAULT_DB_OUTAGE", "8"))  # the long run: 30
BROKER_OUTAGE = 2.0


def report(fault: str, **figures: Any) -> None:
    """Print a test's measured figures (docs/operations.md, Reliability, quotes them)."""
    print(f"\nFIGURES {fault}: {json.dumps(figures)}")


def record_heartbeats(gateway: Any) -> set[tuple[str, int]]:
    """Every (serial, ts) the in-process gateway's heartbeat link hands to the pipeline."""
    received: set[tuple[str, int]] = set()
    inner = gateway.intake.accept

    def record(topic: str, payload: bytes, content_type: str | None, receipt: int,
               at: float) -> None:
        serial = topic.rsplit("/", 2)[-2]
        with contextlib.suppress(msgspec.DecodeError, KeyError, TypeError):
            received.add((serial, msgspec.json.decode(payload)["ts"]))
        inner(topic, payload, content_type, receipt, at)

    gateway.intake.accept = record
    return received


# ---- 1. broker restarts -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_broker_restart_reconnects_resubscribes_and_converges(
    config: Config, db: asyncpg.Connection, topic_prefix: str, sig: signal.Signals
) -> None:
    """The broker is stopped (SIGTERM, persistence on) or killed (SIGKILL) and restarted
    while 1,000 devices heartbeat. The gateway reconnects with backoff and re-subscribes;
    /healthz and gateway_mqtt_connected go down and up again. After SIGTERM no heartbeat
    the broker acknowledged is lost (the persistent session kept them); after SIGKILL every
    device is up to date within one heartbeat interval of reconnecting. Requests made
    around the outage are answered once the broker is back (SIGTERM) or time out cleanly."""
    serials = serials_for(DEVICES)
    await seed(db, serials)
    key = (await create_key(config.database_url, auth.READ, auth.WRITE))[1]
    broker = Mosquitto()
    await asyncio.to_thread(broker.start)
    cfg = dataclasses.replace(config, mqtt_url=broker.url, session_expiry_seconds=600)
    try:
        async with running_gateway(cfg) as gw, \
                RequestClient(broker.port, topic_prefix, key, persistent=True) as caller:
            received = record_heartbeats(gw)
            health = HealthLog(cfg.metrics_endpoint[1])
            health.start()
            fleet = Fleet(broker.port, topic_prefix, serials)
            fleet.start()
            await fleet.running(db)
            reconnects_before = metrics.MQTT_RECONNECTS._value.get()

            # Requests right before the fault, and while the broker is down (the caller's
            # client queues those and sends them when it is back).
            requests = [caller.send("GET", "/v1/devices", query={"limit": "1"})
                        for _ in range(20)]
            fault_at = time.monotonic()
            await asyncio.to_thread(broker.stop, sig)
            await wait_for(lambda: not caller.connected.is_set(), 5)  # it knows it is down
            requests += [caller.send("GET", "/v1/devices", query={"limit": "1"})
                         for _ in range(10)]
            await asyncio.sleep(BROKER_OUTAGE)  # the outage lasting this long is the fault
            restart_at = time.monotonic()
            await asyncio.to_thread(broker.start)
            await wait_for(gw.edge.connected.is_set, 20)
            reconnected_at = time.monotonic()
            await wait_for(lambda: health.first(reconnected_at, status=200, mqtt=1.0), 5)

            # Devices heartbeat on; after SIGKILL each must be current within an interval
            # of both sides being connected again.
            first_after = {}
            converged_in = None
            while converged_in is None and time.monotonic() - restart_at < 15:
                first_after = fleet.acked_after(restart_at)
                if len(first_after) == len(serials) and not await behind(db, first_after):
                    fleet_back_at = max(fleet.connected_at[-len(fleet.groups):])
                    converged_in = time.monotonic() - max(reconnected_at, fleet_back_at)
                await asyncio.sleep(0.1)
            await fleet.running(db)  # devices heartbeat on, once more each
            await fleet.stop()
            answers = await asyncio.gather(*(wait_reply(r, 3) for r in requests))

            # After SIGTERM every acknowledged heartbeat must arrive (the session kept them).
            # After SIGKILL some are gone with the broker's memory; the barrier then is each
            # fleet connection's last one: the gateway gets a connection's heartbeats in
            # order, so once it has that one it has every one of them it will ever get.
            expected = fleet.acked if sig == signal.SIGTERM else fleet.last_acked()
            with contextlib.suppress(AssertionError):  # the loss is counted below
                await wait_for(lambda: all((s, t) in received for s, t, _ in expected), 10)
            lost = [(s, t, at) for s, t, at in fleet.acked if (s, t) not in received]
            caught_up_in, late = await wait_converged(db, fleet.latest, 10)
            await health.stop()
    finally:
        await asyncio.to_thread(broker.close)

    went_down = health.first(fault_at, status=503)
    gauge_down = health.first(fault_at, mqtt=0.0)
    back_up = health.first(restart_at, status=200)
    answered = sum(1 for a in answers if a is not None and a["status"] == 200)
    figures = {
        "devices": len(serials),
        "heartbeats_acked_by_broker": len(fleet.acked),
        "heartbeats_lost": len(lost),
        # After SIGKILL: acknowledged before the kill and still in the broker's memory, or
        # published after the restart before the gateway had re-subscribed.
        "lost_acked_before_fault": sum(1 for *_, at in lost if at < fault_at),
        "lost_published_before_resubscribe": sum(1 for *_, at in lost if at > restart_at),
        "gateway_reconnect_after_broker_start_s": round(reconnected_at - restart_at, 2),
        "healthz_503_after_fault_s": went_down and round(went_down - fault_at, 2),
        "healthz_200_after_broker_start_s": back_up and round(back_up - restart_at, 2),
        "failed_connect_attempts": metrics.MQTT_RECONNECTS._value.get() - reconnects_before,
        "all_devices_current_after_reconnect_s": converged_in and round(converged_in, 2),
        "requests": len(requests),
        "requests_answered": answered,
        "requests_timed_out": sum(1 for a in answers if a is None),
        "final_devices_behind": len(late),
        "final_catch_up_s": caught_up_in and round(caught_up_in, 2),
    }
    report(f"broker_{sig.name}", **figures)

    assert went_down is not None and gauge_down is not None, "/healthz never went 503"
    assert back_up is not None, "/healthz never came back"
    assert reconnected_at - restart_at < 5, "reconnect took longer than the backoff allows"
    assert not late, f"{len(late)} devices never converged, e.g. {late[:3]}"
    assert converged_in is not None and converged_in <= INTERVAL + 1.0, figures
    # Every request gets its answer or a clean time-out on the caller's side (None).
    assert all(a is None or a["status"] == 200 for a in answers), answers
    if sig == signal.SIGTERM:
        assert not lost, f"{len(lost)} acknowledged heartbeats lost, e.g. {lost[:3]}"
        assert answered == len(requests), figures


# ---- 2. the gateway is killed -------------------------------------------------------------


class SmartDevice:
    """A device that runs commands and applies settings, as docs/protocol.md §3 and §4
    ask of one.

    Every heartbeat reports the settings version it has applied and acknowledges the
    commands it was sent since the last one; a command sent again (at-least-once) is
    acknowledged again but run once.
    """

    def __init__(self, port: int, prefix: str, serial: str, period: float = 0.4) -> None:
        self.port = port
        self.prefix = prefix
        self.serial = serial
        self.period = period
        self.deliveries: dict[str, int] = {}  # command id -> times received
        self.to_ack: list[str] = []
        self.settings_version = 0
        self.versions: list[int] = []  # every settings version received, in order
        self._task: asyncio.Task[None] | None = None
        self._running = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"device-{self.serial}")

    async def stop(self) -> None:
        """Stop after the heartbeat in hand (cancelling aiomqtt mid-publish can hang)."""
        self._running = False
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError, TimeoutError):
                await asyncio.wait_for(self._task, 5)

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port,
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            base = f"{self.prefix}/devices/{self.serial}"
            await client.subscribe([(f"{base}/commands", 1), (f"{base}/settings", 1)])
            reader = asyncio.create_task(self._read(client))
            try:
                while self._running:
                    acks, self.to_ack = self.to_ack, []
                    body: dict[str, Any] = {
                        "ts": time.time_ns() // 1_000_000, "battery_percent": 50,
                        "settings_version": self.settings_version,
                    }
                    if acks:
                        body["acks"] = [{"id": a, "status": "succeeded"} for a in acks]
                    await client.publish(f"{base}/heartbeat", msgspec.json.encode(body), qos=1)
                    await asyncio.sleep(self.period)  # the device's own pace
            finally:
                reader.cancel()

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            document = msgspec.json.decode(message.payload)
            if message.topic.value.endswith("/commands"):
                for command in document["commands"]:
                    self.deliveries[command["id"]] = self.deliveries.get(command["id"], 0) + 1
                    if command["id"] not in self.to_ack:
                        self.to_ack.append(command["id"])
            else:
                self.versions.append(document["version"])
                self.settings_version = max(self.settings_version, document["version"])


@pytest.mark.slow
async def test_gateway_killed_mid_load_converges_and_keeps_commands(
    config: Config, db: asyncpg.Connection, topic_prefix: str
) -> None:
    """The gateway is SIGKILLed while 1,000 devices heartbeat and commands and settings
    writes flow, then started again. Every device converges to its latest heartbeat, every
    command reaches its device and a terminal state, no command is delivered after its
    terminal state, and settings versions never go backwards."""
    serials = serials_for(DEVICES)
    smart_serials = [f"SMART-{n}" for n in range(8)]
    await seed(db, serials + smart_serials)
    ids = {r["serial_number"]: r["id"] for r in await db.fetch(
        "SELECT id, serial_number FROM devices WHERE serial_number = ANY($1)", smart_serials)}
    key = (await create_key(config.database_url, auth.READ, auth.WRITE))[1]
    broker = Mosquitto()
    await asyncio.to_thread(broker.start)
    gateway = GatewayProcess(mqtt_url=broker.url, database_url=config.database_url,
                             topic_prefix=topic_prefix, client_id=config.client_id)
    created: list[dict[str, Any]] = []
    canceled: set[str] = set()
    settings_written: dict[str, int] = {}
    version_samples: list[dict[str, int]] = []

    async def create_commands(caller: RequestClient, phase: str) -> list[Any]:
        return [caller.send("POST", f"/v1/devices/{ids[s]}/commands",
                            {"type": "locate", "params": {"phase": phase},
                             "idempotency_key": f"{phase}-{s}-{n}"})
                for s in smart_serials for n in range(2)]

    async def write_settings(caller: RequestClient, minutes: int) -> list[Any]:
        return [caller.send("PATCH", f"/v1/devices/{ids[s]}/settings",
                            {"power": {"auto_sleep_minutes": minutes}}) for s in smart_serials]

    async def collect(futures: list[Any], within: float = 15) -> None:
        for reply in await asyncio.gather(*(wait_reply(f, within) for f in futures)):
            assert reply is not None, "a request was never answered"
            status, body = reply["status"], reply["body"]
            assert status in (200, 201), reply
            if body.get("object") == "command":
                created.append(body)
            else:
                settings_written[body["device_id"]] = body["version"]

    async def sample_versions() -> None:
        conn = await asyncpg.connect(config.database_url)
        try:
            while True:
                rows = await conn.fetch("SELECT device_id, version FROM device_settings"
                                        " WHERE device_id = ANY($1)", list(ids.values()))
                version_samples.append({r["device_id"]: r["version"] for r in rows})
                await asyncio.sleep(0.1)  # the sampling period
        finally:
            await conn.close()

    devices = [SmartDevice(broker.port, topic_prefix, s) for s in smart_serials]
    sampler = asyncio.create_task(sample_versions())
    try:
        gateway.start()
        started_in = await gateway.wait_healthy()
        async with RequestClient(broker.port, topic_prefix, key) as caller:
            fleet = Fleet(broker.port, topic_prefix, serials)
            fleet.start()
            for device in devices:
                device.start()
            await collect(await create_commands(caller, "before"))
            await collect(await write_settings(caller, 31))
            for command in created[::4]:  # cancel a quarter of them at once
                result = await caller.call("POST", f"/v1/commands/{command['id']}/cancel")
                assert result is not None and result[0] in (200, 409), result
                if result[0] == 200:
                    canceled.add(command["id"])
            # Killed mid-load: every device's heartbeats are flowing, and every smart device
            # has been sent commands.
            await fleet.running(db)
            await wait_for(lambda: all(d.deliveries for d in devices), 10)

            killed_at = time.monotonic()
            gateway.send(signal.SIGKILL)
            assert await gateway.wait_exit(5) == -signal.SIGKILL
            # Requests while the gateway is down wait in its broker session.
            during = await create_commands(caller, "during")
            during += await write_settings(caller, 32)
            await asyncio.sleep(1.0)  # the gateway staying down a while is the fault
            gateway.start()
            restarted_in = await gateway.wait_healthy()
            healthy_at = time.monotonic()
            await collect(during)
            await collect(await create_commands(caller, "after"))
            await collect(await write_settings(caller, 33))

            first_after = {}
            current_in = None
            while current_in is None and time.monotonic() - healthy_at < 10:
                first_after = fleet.acked_after(healthy_at)
                if len(first_after) == len(serials) and not await behind(db, first_after):
                    current_in = time.monotonic() - healthy_at
                await asyncio.sleep(0.1)
            await fleet.stop()
            caught_up_in, late = await wait_converged(db, fleet.latest, 10)

            async def all_terminal() -> bool:
                return not await db.fetchval(
                    "SELECT count(*) FROM commands WHERE status IN ('pending', 'delivered')")

            await wait_for(all_terminal, 15)

            async def settings_applied() -> bool:
                return not await db.fetchval(
                    "SELECT count(*) FROM device_settings s JOIN device_health h"
                    " ON h.device_id = s.device_id WHERE s.device_id = ANY($1)"
                    " AND h.applied_version <> s.version", list(ids.values()))

            await wait_for(settings_applied, 10)
        gateway.send(signal.SIGTERM)
        exit_code = await gateway.wait_exit(15)
    finally:
        sampler.cancel()
        for device in devices:
            await device.stop()
        gateway.close()
        await asyncio.to_thread(broker.close)

    commands = await db.fetch(
        "SELECT c.id, c.status, c.attempts, c.delivered_at, c.completed_at, d.serial_number"
        " FROM commands c JOIN devices d ON d.id = c.device_id")
    by_serial = {d.serial: d for d in devices}
    never_reached = [c["id"] for c in commands
                     if c["id"] not in canceled and c["id"] not in by_serial[
                         c["serial_number"]].deliveries]
    after_terminal = [c["id"] for c in commands if c["delivered_at"] is not None
                      and c["delivered_at"] > c["completed_at"]]
    wrong_status = [(c["id"], c["status"]) for c in commands
                    if c["status"] != ("canceled" if c["id"] in canceled else "succeeded")]
    stored_backwards = sum(
        1 for older, newer in itertools.pairwise(version_samples)
        for device_id, version in newer.items() if version < older.get(device_id, 0))
    device_backwards = sum(
        1 for d in devices for a, b in itertools.pairwise(d.versions) if b < a)
    final = {r["device_id"]: (r["version"], r["applied_version"]) for r in await db.fetch(
        "SELECT s.device_id, s.version, h.applied_version FROM device_settings s"
        " JOIN device_health h ON h.device_id = s.device_id"
        " WHERE s.device_id = ANY($1)", list(ids.values()))}
    figures = {
        "devices": len(serials),
        "gateway_start_s": round(started_in, 2),
        "restart_to_healthy_s": round(restarted_in, 2),
        "down_s": round(healthy_at - killed_at, 2),
        "all_devices_current_after_restart_s": current_in and round(current_in, 2),
        "final_devices_behind": len(late),
        "final_catch_up_s": caught_up_in and round(caught_up_in, 2),
        "commands": len(commands),
        "commands_canceled": len(canceled),
        "commands_never_reached_device": len(never_reached),
        "commands_delivered_after_terminal": len(after_terminal),
        "commands_in_wrong_final_state": len(wrong_status),
        "deliveries_per_command_max": max(max(d.deliveries.values()) for d in devices),
        "settings_version_regressions_stored": stored_backwards,
        "settings_version_regressions_on_devices": device_backwards,
        "exit_code_after_restart_sigterm": exit_code,
    }
    report("gateway_sigkill", **figures)
    assert not late, f"{len(late)} devices behind, e.g. {late[:3]}"
    assert current_in is not None, figures
    assert len(commands) == len(created) == 3 * 2 * len(smart_serials)
    assert not never_reached and not after_terminal and not wrong_status, figures
    assert stored_backwards == 0 and device_backwards == 0, figures
    assert all(final[ids[s]] == (settings_written[ids[s]], settings_written[ids[s]])
               for s in smart_serials), (final, settings_written)
    assert exit_code == 0


async def test_cancel_racing_a_heartbeat_never_redelivers(database_url: str,
                                                          db: asyncpg.Connection) -> None:
    """A cancel commits while a heartbeat batch waits for the command's row lock: the
    batch must neither overwrite ``canceled`` with ``delivered`` nor send the command
    (terminal states never change; nothing is delivered after its terminal state)."""
    async with Storage.open(database_url, min_size=1, max_size=2) as storage:
        await storage.devices.register("dev_race", "SN-RACE", None, None, None)
        await storage.commands.create("dev_race", "cmd_race", "locate", {},
                                     dt.timedelta(hours=1), None)
        canceller = await asyncpg.connect(database_url)
        try:
            cancel = canceller.transaction()
            await cancel.start()
            await canceller.execute("UPDATE commands SET status = 'canceled',"
                                    " completed_at = now() WHERE id = 'cmd_race'")
            values: dict[str, list[Any]] = {
                f.name: [None] for f in dataclasses.fields(HeartbeatColumns)}
            values |= {"serials": ["SN-RACE"], "ts": [time.time_ns() // 1_000_000],
                       "deliver": [True]}
            if "received" in values:
                values["received"] = [time.time()]
            batch = asyncio.create_task(
                storage.heartbeats.apply([HeartbeatColumns(**values)], None))
            # Barrier: the batch's connection is seen waiting for a lock.
            await wait_for(lambda: db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"), 10)
            assert not batch.done(), "the batch did not wait for the row lock"
            await cancel.commit()
            written = await asyncio.wait_for(batch, 5)
        finally:
            await canceller.close()
    command = await db.fetchrow("SELECT status, attempts FROM commands WHERE id = 'cmd_race'")
    assert (command["status"], command["attempts"]) == ("canceled", 0)
    # Applied, and nothing to send: no command went out.
    assert written.applied == 1 and written.outcomes == []


# ---- 4. graceful shutdown -----------------------------------------------------------------


async def test_sigterm_drains_accepted_work_and_exits_0(
    config: Config, db: asyncpg.Connection, topic_prefix: str
) -> None:
    """SIGTERM while 1,000 devices heartbeat and writes arrive: intake stops, accepted
    requests and buffered heartbeats finish within the drain deadline, the process exits
    0, and nothing accepted is lost. What the broker delivers after intake stopped is not
    acknowledged, so it waits in the session and the next start handles it."""
    serials = serials_for(DEVICES)
    await seed(db, serials)
    key = (await create_key(config.database_url, auth.READ, auth.WRITE))[1]
    broker = Mosquitto()
    await asyncio.to_thread(broker.start)
    gateway = GatewayProcess(mqtt_url=broker.url, database_url=config.database_url,
                             topic_prefix=topic_prefix, client_id=config.client_id)
    writes: list[asyncio.Future[dict[str, Any]]] = []
    sending = True

    async def register_devices(caller: RequestClient) -> None:
        while sending:  # ~200 registrations a second, answered or not
            for _ in range(5):
                writes.append(caller.send("POST", "/v1/devices",
                                          {"serial_number": f"DRAIN-{len(writes)}"}))
            await asyncio.sleep(0.025)  # that pace

    try:
        gateway.start()
        await gateway.wait_healthy()
        async with RequestClient(broker.port, topic_prefix, key) as caller:
            fleet = Fleet(broker.port, topic_prefix, serials)
            fleet.start()
            writer = asyncio.create_task(register_devices(caller))
            # SIGTERM under load: heartbeats flowing from every device, writes answered.
            await fleet.running(db)
            await wait_for(lambda: any(w.done() for w in writes), 10)
            before = await scrape(gateway.metrics_port)
            term_at = time.monotonic()
            gateway.send(signal.SIGTERM)
            exit_code = await gateway.wait_exit(30)
            drained_in = time.monotonic() - term_at
            sending = False
            await writer
            await fleet.stop()
            answered_by_first = sum(1 for w in writes if w.done())
            drained = [e for e in gateway.events() if e["event"] == "gateway.drained"]

            gateway.start()  # the same session: it gets what the first run left unacked
            await gateway.wait_healthy()
            answers = await asyncio.gather(*(wait_reply(w, 30) for w in writes))
            caught_up_in, late = await wait_converged(db, fleet.latest, 10)
            registered = await db.fetchval(
                "SELECT count(*) FROM devices WHERE serial_number LIKE 'DRAIN-%'")
            gateway.send(signal.SIGTERM)
            second_exit = await gateway.wait_exit(30)
    finally:
        gateway.close()
        await asyncio.to_thread(broker.close)

    statuses = [a["status"] if a else None for a in answers]
    figures = {
        "devices": len(serials),
        "inbox_depth_at_sigterm": before.get("gateway_inbox_depth"),
        "drain_to_exit_s": round(drained_in, 2),
        "exit_code": exit_code,
        "left_at_exit": drained[0] if drained else None,
        "writes_sent": len(writes),
        "writes_answered_before_exit": answered_by_first,
        "writes_answered_after_restart": len(writes) - answered_by_first,
        "writes_unanswered": statuses.count(None),
        "writes_registered": registered,
        "devices_behind_after_restart": len(late),
        "catch_up_after_restart_s": caught_up_in and round(caught_up_in, 2),
    }
    report("gateway_sigterm", **{k: v for k, v in figures.items() if k != "left_at_exit"},
           left_at_exit={k: drained[0].get(k) for k in (
               "requests_left", "heartbeats_left", "publishes_unacknowledged")}
           if drained else None)
    assert exit_code == 0 and second_exit == 0
    assert drained_in < config.drain_seconds + 5, figures
    assert drained and drained[0]["requests_left"] == drained[0]["heartbeats_left"] == 0
    assert drained[0]["publishes_unacknowledged"] == 0
    assert set(statuses) <= {200, 201} and None not in statuses, figures
    assert registered == len(writes), figures
    assert not late, f"{len(late)} devices lost their last heartbeat, e.g. {late[:3]}"


async def test_shutdown_ends_while_the_broker_hangs(config: Config) -> None:
    """Stopping while the broker is hung (SIGSTOP) with megabytes of replies unsent: the
    drain gives up at its deadline, the DISCONNECT can never be written, so aiomqtt's exit
    raises after its timeout. The gateway still stops; it must not take that error for a
    lost connection and reconnect (a hung broker still completes TCP handshakes) forever."""
    broker = Mosquitto()
    await asyncio.to_thread(broker.start)
    cfg = dataclasses.replace(config, mqtt_url=broker.url, drain_seconds=1)
    assert broker.proc is not None
    try:
        async with Storage.open(cfg.database_url) as storage:
            gateway = Gateway(cfg, storage)
            stop = asyncio.Event()
            run = asyncio.create_task(gateway.run(stop))
            # Both connections up: the heartbeat link connects after the edge.
            await wait_for(lambda: gateway.edge.connected.is_set()
                           and gateway.link.connected.is_set(), 10)
            broker.proc.send_signal(signal.SIGSTOP)
            # 64 MiB: more than the socket buffers between the two can take.
            for _ in range(64):
                gateway.edge.publisher.publish(cfg.topic("api/v1/replies/hung"), b"x" * 2**20)
            # Part of the scenario: paho writes what the socket buffers take meanwhile.
            await asyncio.sleep(1)
            stopped_at = time.monotonic()
            stop.set()
            done, _ = await asyncio.wait({run}, timeout=40)
            took = time.monotonic() - stopped_at
            if run not in done:
                run.cancel()
            report("shutdown_hung_broker", stopped=run in done, stop_s=round(took, 2),
                   publishes_unacknowledged=gateway.edge.publisher.unacknowledged())
            assert run in done, "the gateway kept reconnecting to the hung broker"
            run.result()
            # The client is usable again (aiomqtt left its lock held after that error).
            assert not gateway.edge._client._lock.locked()
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(broker.close)

# ---- 3. database outage -------------------------------------------------------------------


@pytest.mark.slow
async def test_a_hung_database_is_answered_503_at_once_after_one_timeout(
    config: Config, topic_prefix: str
) -> None:
    """PostgreSQL (our own cluster) stops answering without closing anything (every one of
    its processes SIGSTOPped). Requests in flight wait out the database timeout and get
    503; the health check fails the same way, and from then on every request is answered
    503 at once instead of waiting. Once the cluster runs again, requests are served
    within a health check or so."""
    timeout = 2.0
    pg = Postgres()
    broker = Mosquitto()
    try:
        url, device_id = await start_own_services(pg, broker, ["HUNG-1"])
        key = (await create_key(url, auth.READ))[1]
        cfg = dataclasses.replace(config, mqtt_url=broker.url, database_url=url,
                                  db_timeout_seconds=timeout)
        async with running_gateway(cfg), \
                RequestClient(broker.port, topic_prefix, key) as caller:
            assert (await caller.call("GET", f"/v1/devices/{device_id}"))[0] == 200
            cluster = pg.pids()
            for pid in cluster:
                os.kill(pid, signal.SIGSTOP)
            hung_at = time.monotonic()
            answers: list[tuple[float, float, Any]] = []  # (sent after hang, took, answer)

            async def request() -> None:
                sent = time.monotonic()
                answer = await caller.call("GET", f"/v1/devices/{device_id}", within=15)
                answers.append((sent - hung_at, time.monotonic() - sent, answer))

            requests = []
            while time.monotonic() - hung_at < 3 * timeout + 2:
                requests.append(asyncio.create_task(request()))
                await asyncio.sleep(0.2)  # a request every 0.2 s through the hang
            await asyncio.gather(*requests)
            for pid in cluster:
                os.kill(pid, signal.SIGCONT)
            resumed_at = time.monotonic()

            async def served() -> bool:
                answer = await caller.call("GET", f"/v1/devices/{device_id}", within=5)
                return answer is not None and answer[0] == 200

            await wait_for(served, 15, interval=0.05)
            served_after = time.monotonic() - resumed_at
    finally:
        for pid in pg.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await asyncio.to_thread(broker.close)
        await asyncio.to_thread(pg.close)

    answers.sort()
    fast = [(at, took) for at, took, _ in answers if at > 2 * timeout + 1]
    report("database_hung", database_timeout_s=timeout, requests=len(answers),
           slowest_s=round(max(took for _, took, _ in answers), 2),
           fast_from_s=next((round(at, 2) for at, took, _ in answers if took < 0.5), None),
           slowest_after_detection_s=round(max(took for _, took in fast), 3),
           served_after_resume_s=round(served_after, 2))
    assert all(a is not None and a[0] == 503 and a[1]["error"]["type"] == "unavailable"
               for _, _, a in answers), answers
    # Nothing waits longer than one timeout (and a health check that was already waiting).
    assert max(took for _, took, _ in answers) < 2 * timeout + 1, answers
    # After the first timeout and a health check, nobody waits for the database.
    assert fast and max(took for _, took in fast) < 0.5, answers



@pytest.mark.slow
async def test_database_outage_answers_503_at_once_bounds_memory_and_catches_up(
    config: Config, topic_prefix: str
) -> None:
    """PostgreSQL (our own cluster) is stopped for DB_OUTAGE seconds while 1,000 devices
    heartbeat and requests arrive, then started. The gateway stays up; /healthz and
    gateway_database_connected go down and up; every request is answered 503 `unavailable`
    at once, never 500; buffered heartbeats coalesce to one per device (a device replaying
    a stale heartbeat too); devices that come online during the outage fill the buffer up
    to its cap, and what does not fit waits in the broker (docs/operations.md, Delivery
    semantics): nothing is dropped as `overflow`; the pool reconnects without a restart
    and every device catches up, also those that waited in the broker."""
    serials = serials_for(DEVICES)
    late_serials = serials_for(400, "LATE-")
    cap = DEVICES + len(late_serials) // 2
    pg = Postgres()
    broker = Mosquitto()
    try:
        url, device_id = await start_own_services(
            pg, broker, [*serials, *late_serials, "REPLAYER"])
        key = (await create_key(url, auth.READ, auth.WRITE))[1]
        cfg = dataclasses.replace(config, mqtt_url=broker.url, database_url=url,
                                  inbox_max=cap)
        overflow_before = metrics.HEARTBEATS_REJECTED.labels("overflow")._value.get()
        async with running_gateway(cfg) as gw, \
                RequestClient(broker.port, topic_prefix, key) as caller:
            health = HealthLog(cfg.metrics_endpoint[1], interval=0.1)
            health.start()
            fleet = Fleet(broker.port, topic_prefix, serials)
            fleet.start()
            conn = await asyncpg.connect(url)
            try:
                await fleet.running(conn)
            finally:
                await conn.close()
            normal = []
            for _ in range(5):
                sent = time.monotonic()
                assert (await caller.call("GET", f"/v1/devices/{device_id}"))[0] == 200
                normal.append(time.monotonic() - sent)
            rss_before = rss_mib(os.getpid())

            stop_at = time.monotonic()
            await asyncio.to_thread(pg.stop, "fast")
            stopped_at = time.monotonic()
            answers: list[tuple[float, int | None, Any]] = []
            depths: list[int] = []
            late_fleet = Fleet(broker.port, topic_prefix, late_serials, connections=1)
            depth_coalesced = None

            replaying = True

            async def replay() -> None:  # one stale heartbeat, ~500 times a second
                reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
                writer.write(connect_packet(f"replayer-{os.getpid()}"))
                acks = asyncio.create_task(reader.read(-1))  # CONNACK, PUBACKs: ignored
                topic = f"{topic_prefix}/devices/REPLAYER/heartbeat".encode()
                stale = b'{"ts":1,"battery_percent":1}'
                packet_id = 0
                while replaying:
                    packet_id = packet_id % 65535 + 1
                    writer.write(publish_packet(topic, packet_id, stale))
                    await writer.drain()
                    await asyncio.sleep(0.002)  # its pace
                writer.close()
                await writer.wait_closed()
                await acks

            replayer = asyncio.create_task(replay())
            while time.monotonic() - stopped_at < DB_OUTAGE:
                if depth_coalesced is None and time.monotonic() - stopped_at > 1.5 * INTERVAL:
                    # Every device has heartbeated a few times by now, the replayer hundreds.
                    depth_coalesced = gw.buffer.depth
                    late_fleet.start()
                for method, path, body in (
                    ("GET", f"/v1/devices/{device_id}", None),
                    ("PATCH", f"/v1/devices/{device_id}", {"metadata": {"during": "outage"}}),
                ):
                    sent = time.monotonic()
                    result = await caller.call(method, path, body, within=10)
                    answers.append((time.monotonic() - sent, *(result or (None, None))))
                depths.append(gw.buffer.depth)
                await asyncio.sleep(0.25)  # requests' pace through the outage
            replaying = False
            await asyncio.wait_for(replayer, 5)
            rss_outage = rss_mib(os.getpid())
            buffered_latest = dict(fleet.latest)
            buffered_latest.update(late_fleet.latest)

            await asyncio.to_thread(pg.start)
            started_at = time.monotonic()
            first_ok = None
            while first_ok is None and time.monotonic() - started_at < 15:
                result = await caller.call("GET", f"/v1/devices/{device_id}", within=5)
                if result is not None and result[0] == 200:
                    first_ok = time.monotonic() - started_at
                else:
                    await asyncio.sleep(0.05)
            await wait_for(lambda: health.first(started_at, status=200, database=1.0), 10)
            caught_up_in, behind_buffered = await wait_converged_url(url, buffered_latest, 15)
            conn = await asyncpg.connect(url)
            try:
                await fleet.running(conn)  # devices heartbeat on, once more each
            finally:
                await conn.close()
            await fleet.stop()
            await late_fleet.stop()
            _, late = await wait_converged_url(url, {**fleet.latest, **late_fleet.latest}, 10)
            await health.stop()
            statuses_500 = sum(
                value for name, value in (await scrape(cfg.metrics_endpoint[1])).items()
                if name.startswith("gateway_requests_total") and 'status="500"' in name)
    finally:
        await asyncio.to_thread(pg.close)
        await asyncio.to_thread(broker.close)

    overflow = metrics.HEARTBEATS_REJECTED.labels("overflow")._value.get() - overflow_before
    during = answers
    latencies = sorted(a[0] for a in during)
    figures = {
        "devices": len(serials),
        "outage_s": DB_OUTAGE,
        "pg_stop_s": round(stopped_at - stop_at, 2),
        "healthz_503_after_stop_s": _since(health.first(stop_at, status=503, database=0.0),
                                           stop_at),
        "requests_during_outage": len(during),
        "answered_503_unavailable": sum(1 for a in during if a[1] == 503
                                        and a[2]["error"]["type"] == "unavailable"),
        "reply_latency_before_outage_median_s": round(sorted(normal)[2], 3),
        "reply_latency_max_s": round(latencies[-1], 3),
        "reply_latency_median_s": round(latencies[len(latencies) // 2], 3),
        "inbox_depth_coalesced": depth_coalesced,
        "inbox_depth_max": max(depths),
        "inbox_cap": cap,
        "devices_joining_during_outage": len(late_serials),
        "heartbeats_sent_during_outage": sum(
            1 for _, _, at in fleet.acked if stopped_at < at < started_at),
        "overflow_rejections": overflow,
        "rss_growth_during_outage_mib": round(rss_outage - rss_before, 1),
        "first_200_after_pg_start_s": first_ok and round(first_ok, 2),
        "healthz_200_after_pg_start_s": _since(health.first(started_at, status=200),
                                               started_at),
        "buffered_heartbeats_written_after_pg_start_s": caught_up_in and round(caught_up_in, 2),
        "final_devices_behind": len(late),
        "requests_answered_500": statuses_500,
    }
    report("database_outage", **figures)
    assert all(a[1] == 503 and a[2]["error"]["type"] == "unavailable" for a in during), during
    assert latencies[-1] < 1.0, "a request waited for the database instead of failing fast"
    assert statuses_500 == 0
    assert figures["healthz_503_after_stop_s"] is not None
    # One entry per device while they coalesce; devices joining later wait in the broker.
    assert depth_coalesced is not None and depth_coalesced <= DEVICES + 1, figures
    assert max(depths) <= cap and overflow == 0, figures
    assert rss_outage - rss_before < 32, figures
    assert first_ok is not None and first_ok < 5, figures
    assert not behind_buffered and not late, figures


def _since(moment: float | None, start: float) -> float | None:
    return None if moment is None else round(moment - start, 2)


async def wait_converged_url(url: str, want: dict[str, int],
                             within: float) -> tuple[float | None, list[str]]:
    conn = await asyncpg.connect(url)
    try:
        return await wait_converged(conn, want, within)
    finally:
        await conn.close()
