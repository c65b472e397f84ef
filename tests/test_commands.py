"""Commands: the routes (docs/protocol.md §6) and their delivery to devices over MQTT (§3).

A command is created pending, sent after every heartbeat (at most 16 per message, oldest
first) until the device acknowledges it, it expires or it is canceled; terminal states
never change again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import asyncpg
from conftest import Caller, Device, wait_for
from gateway_codecs import device as device_wire
from sync_support import command_row, handled, metric, now_ms, register, settled, sim_device

from gateway import heartbeat_writer
from gateway.app import Gateway
from gateway.heartbeat_buffer import Pending
from gateway.routes import new_id
from gateway.storage import Storage

DEFAULT_TTL = 7 * 24 * 3600


def parse(stamp: str) -> dt.datetime:
    assert stamp.endswith("Z"), stamp
    return dt.datetime.fromisoformat(stamp)


async def create(api: Caller, device_id: str, status: int = 201, **body: Any) -> dict[str, Any]:
    got, command = await api.call("POST", f"/v1/devices/{device_id}/commands",
                                  {"type": "reboot", **body})
    assert got == status, command
    return command  # type: ignore[no-any-return]


async def get(api: Caller, command_id: str) -> dict[str, Any]:
    status, command = await api.call("GET", f"/v1/commands/{command_id}")
    assert status == 200, command
    return command  # type: ignore[no-any-return]


async def listing(api: Caller, device_id: str, **query: str) -> dict[str, Any]:
    status, body = await api.call("GET", f"/v1/devices/{device_id}/commands", query=query)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def ids(batch: dict[str, Any]) -> list[str]:
    return [command["id"] for command in batch["commands"]]


class Clock:
    """Strictly increasing heartbeat ts values for one device."""

    def __init__(self) -> None:
        self.ts = now_ms() - 60_000

    def __call__(self) -> int:
        self.ts += 1
        return self.ts


async def beat(dev: Device, clock: Clock, **fields: Any) -> None:
    await dev.heartbeat({"ts": clock(), **fields})


async def handled_beat(dev: Device, clock: Clock, **fields: Any) -> None:
    """A heartbeat, and wait until the gateway is done with it (see `handled`)."""
    before = handled()
    await beat(dev, clock, **fields)
    await settled(before)


async def nothing_sent_before(api: Caller, dev: Device, clock: Clock, device_id: str) -> None:
    """Assert that the heartbeats handled so far got no commands since the device last
    read its queue: a command created now goes out with the next heartbeat on the same
    topic, behind anything they were answered with, so it must be the first to arrive."""
    barrier = await create(api, device_id, type="barrier")
    await beat(dev, clock)
    assert ids(await dev.next(dev.commands)) == [barrier["id"]]


# --- create --------------------------------------------------------------------------


async def test_create_returns_201_pending_with_defaults(api: Caller) -> None:
    """A new command is pending, never attempted, and expires after the default 7 days."""
    dev = await register(api, "SN-CMD-NEW")
    command = await create(api, dev["id"])
    assert command["id"].startswith("cmd_")
    assert command["object"] == "command"
    assert command["device_id"] == dev["id"]
    assert command["type"] == "reboot"
    assert command["params"] == {}
    assert command["status"] == "pending"
    assert command["attempts"] == 0
    assert command["delivered_at"] is None
    assert command["completed_at"] is None
    assert command["result"] is None
    created = parse(command["created_at"])
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 5
    assert parse(command["expires_at"]) - created == dt.timedelta(seconds=DEFAULT_TTL)


async def test_create_keeps_params_and_ttl(api: Caller) -> None:
    """params are stored as given and expires_at is created_at + ttl_seconds."""
    dev = await register(api, "SN-CMD-TTL")
    params = {"volume": 7, "tags": ["a", "b"], "nested": {"on": True, "ratio": 0.5}}
    command = await create(api, dev["id"], type="set_volume", params=params, ttl_seconds=90)
    assert command["params"] == params
    assert command["type"] == "set_volume"
    assert parse(command["expires_at"]) - parse(command["created_at"]) == dt.timedelta(
        seconds=90)
    assert await get(api, command["id"]) == command


async def test_same_idempotency_key_returns_the_same_command_with_200(api: Caller) -> None:
    """A retried create with the same key answers 200 and the original command."""
    dev = await register(api, "SN-CMD-IDEM")
    body = {"params": {"level": 3}, "idempotency_key": "retry-1"}
    first = await create(api, dev["id"], **body)
    again = await create(api, dev["id"], status=200, **body)
    assert again == first
    assert len((await listing(api, dev["id"]))["data"]) == 1


async def test_same_idempotency_key_for_a_different_command_is_409(api: Caller) -> None:
    """Reusing a key for another type or other params is a conflict and creates nothing;
    params compare as JSON (``true`` is not ``1``)."""
    dev = await register(api, "SN-CMD-IDEM2")
    body = {"type": "reboot", "params": {"level": 3, "on": True}, "idempotency_key": "k"}
    original = await create(api, dev["id"], **body)
    for change in (
        {"type": "shutdown"},
        {"params": {"level": 4, "on": True}},
        {"params": {}},
        {"params": {"level": 3, "on": True, "extra": 1}},
        {"params": {"level": "3", "on": True}},
        {"params": {"level": 3, "on": 1}},
        {"params": {"level": 3, "on": [True]}},
    ):
        status, error = await api.call("POST", f"/v1/devices/{dev['id']}/commands",
                                       {**body, **change})
        assert status == 409, (change, error)
        assert error["error"]["type"] == "conflict"
    # Key order does not make params different.
    again = await create(api, dev["id"], status=200, type="reboot",
                         params={"on": True, "level": 3}, idempotency_key="k")
    assert again == original
    assert len((await listing(api, dev["id"]))["data"]) == 1


async def test_idempotency_keys_are_per_device(api: Caller) -> None:
    """The same key on two devices makes two commands."""
    one = await register(api, "SN-CMD-K1")
    two = await register(api, "SN-CMD-K2")
    first = await create(api, one["id"], idempotency_key="same")
    second = await create(api, two["id"], idempotency_key="same")
    assert first["id"] != second["id"]


INVALID_CREATES: list[tuple[dict[str, Any], str]] = [
    ({"type": ""}, "type"),
    ({"type": "Reboot"}, "type"),
    ({"type": "1reboot"}, "type"),
    ({"type": "_reboot"}, "type"),
    ({"type": "re-boot"}, "type"),
    ({"type": "re boot"}, "type"),
    ({"type": "reboot\n"}, "type"),
    ({"type": "r" * 65}, "type"),
    ({"type": 5}, "type"),
    ({"type": None}, "type"),
    ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"ttl_seconds": -5}, "ttl_seconds"),
    ({"ttl_seconds": 2_592_001}, "ttl_seconds"),
    ({"ttl_seconds": "60"}, "ttl_seconds"),
    ({"ttl_seconds": 1.5}, "ttl_seconds"),
    ({"ttl_seconds": True}, "ttl_seconds"),
    ({"params": [1]}, "params"),
    ({"params": "x"}, "params"),
    ({"params": {"note": "a\x00b"}}, "params"),  # PostgreSQL cannot store U+0000
    ({"params": {"a\x00": 1}}, "params"),
    ({"idempotency_key": "k\x00"}, "idempotency_key"),
    ({"idempotency_key": "k" * 256}, "idempotency_key"),
    ({"idempotency_key": 7}, "idempotency_key"),
    ({"priority": 1}, "priority"),
]


async def test_invalid_create_is_400_naming_the_field(api: Caller) -> None:
    """Bad type pattern, ttl out of 1..2592000, non-object params, unknown fields: a 400
    validation_error naming the field, and no command."""
    dev = await register(api, "SN-CMD-BAD")
    for body, field in INVALID_CREATES:
        payload = {key: value for key, value in {"type": "reboot", **body}.items()
                   if value is not None}
        status, error = await api.call("POST", f"/v1/devices/{dev['id']}/commands", payload)
        assert status == 400, (body, error)
        assert error["error"]["type"] == "validation_error"
        assert field in [detail["field"] for detail in error["error"]["details"]], body
    assert (await listing(api, dev["id"]))["data"] == []


async def test_values_at_the_edges_are_accepted(api: Caller) -> None:
    """The shortest and longest types and both ttl bounds are valid."""
    dev = await register(api, "SN-CMD-EDGE")
    for body in ({"type": "a"}, {"type": "a" * 64}, {"type": "ota_update_2"},
                 {"ttl_seconds": 1}, {"ttl_seconds": 2_592_000}):
        command = await create(api, dev["id"], **body)
        ttl = body.get("ttl_seconds", DEFAULT_TTL)
        assert parse(command["expires_at"]) - parse(command["created_at"]) == dt.timedelta(
            seconds=ttl)


async def test_create_for_unknown_or_deleted_device_is_404(api: Caller) -> None:
    """Commands need a live device."""
    status, _ = await api.call("POST", "/v1/devices/dev_nope/commands", {"type": "reboot"})
    assert status == 404
    dev = await register(api, "SN-CMD-GONE")
    assert (await api.call("DELETE", f"/v1/devices/{dev['id']}"))[0] == 200
    status, body = await api.call("POST", f"/v1/devices/{dev['id']}/commands",
                                  {"type": "reboot"})
    assert status == 404 and body["error"]["type"] == "not_found"


async def test_fifty_open_commands_fill_the_quota(api: Caller, gateway: Gateway) -> None:
    """The 51st open command is a 429; closing one makes room again."""
    dev = await register(api, "SN-CMD-QUOTA")
    made = [await create(api, dev["id"], idempotency_key=f"q{n}") for n in range(2)]
    for n in range(2, 50):  # the rest straight into storage, to keep the test short
        await gateway.storage.commands.create(dev["id"], new_id("cmd_"), "reboot", {},
                                             dt.timedelta(days=1), f"q{n}")
    status, body = await api.call("POST", f"/v1/devices/{dev['id']}/commands",
                                  {"type": "reboot"})
    assert status == 429, body
    assert body["error"]["type"] == "rate_limit_error"
    assert len((await listing(api, dev["id"], limit="100"))["data"]) == 50
    # A retry of an existing command is still answered.
    assert await create(api, dev["id"], status=200, idempotency_key="q1") == made[1]
    assert (await api.call("POST", f"/v1/commands/{made[0]['id']}/cancel"))[0] == 200
    await create(api, dev["id"])
    assert (await api.call("POST", f"/v1/devices/{dev['id']}/commands",
                           {"type": "reboot"}))[0] == 429


# --- read ----------------------------------------------------------------------------


async def test_list_is_newest_first_with_status_filter_and_pagination(api: Caller) -> None:
    """The list pages newest first with starting_after and filters by status."""
    dev = await register(api, "SN-CMD-LIST")
    made = [await create(api, dev["id"], type=f"step_{n}") for n in range(5)]
    newest_first = [command["id"] for command in reversed(made)]
    assert (await api.call("POST", f"/v1/commands/{made[1]['id']}/cancel"))[0] == 200

    page = await listing(api, dev["id"], limit="2")
    assert page["object"] == "list" and page["has_more"] is True
    assert [c["id"] for c in page["data"]] == newest_first[:2]
    page = await listing(api, dev["id"], limit="2", starting_after=newest_first[1])
    assert [c["id"] for c in page["data"]] == newest_first[2:4] and page["has_more"] is True
    page = await listing(api, dev["id"], limit="2", starting_after=newest_first[3])
    assert [c["id"] for c in page["data"]] == newest_first[4:] and page["has_more"] is False

    canceled = await listing(api, dev["id"], status="canceled")
    assert [c["id"] for c in canceled["data"]] == [made[1]["id"]]
    pending = await listing(api, dev["id"], status="pending")
    assert [c["id"] for c in pending["data"]] == [i for i in newest_first if i != made[1]["id"]]
    assert (await listing(api, dev["id"], status="succeeded"))["data"] == []


async def test_list_rejects_unknown_status_and_foreign_cursor(api: Caller) -> None:
    """An unknown status filter is a 400; a cursor from another device is a 404."""
    dev = await register(api, "SN-CMD-LIST2")
    other = await register(api, "SN-CMD-LIST3")
    foreign = await create(api, other["id"])
    status, _ = await api.call("GET", f"/v1/devices/{dev['id']}/commands",
                               query={"status": "done"})
    assert status == 400
    status, _ = await api.call("GET", f"/v1/devices/{dev['id']}/commands",
                               query={"starting_after": foreign["id"]})
    assert status == 404


async def test_get_unknown_command_is_404(api: Caller) -> None:
    """GET of a command id that does not exist is a 404."""
    status, body = await api.call("GET", "/v1/commands/cmd_doesnotexist")
    assert status == 404 and body["error"]["type"] == "not_found"


# --- cancel --------------------------------------------------------------------------


async def test_cancel_makes_the_command_canceled_and_a_second_cancel_is_409(
    api: Caller,
) -> None:
    """Cancel answers the canceled command; canceling a terminal command is a conflict."""
    dev = await register(api, "SN-CMD-CANCEL")
    command = await create(api, dev["id"])
    status, canceled = await api.call("POST", f"/v1/commands/{command['id']}/cancel")
    assert status == 200
    assert canceled["status"] == "canceled"
    assert canceled["completed_at"] is not None
    assert await get(api, command["id"]) == canceled
    status, body = await api.call("POST", f"/v1/commands/{command['id']}/cancel")
    assert status == 409 and body["error"]["type"] == "conflict"
    assert await get(api, command["id"]) == canceled


async def test_cancel_unknown_command_is_404(api: Caller) -> None:
    """Canceling a command id that does not exist is a 404."""
    status, _ = await api.call("POST", "/v1/commands/cmd_doesnotexist/cancel")
    assert status == 404


# --- delivery over MQTT --------------------------------------------------------------


async def test_heartbeat_delivers_open_commands_oldest_first_16_per_message(
    api: Caller, topic_prefix: str
) -> None:
    """20 commands: 16 oldest in the first batch; acking some sends the rest next time."""
    dev = await register(api, "SN-CMD-BATCH")
    made = [await create(api, dev["id"], type=f"job_{n}", params={"n": n}) for n in range(20)]
    clock = Clock()
    delivered = metric("gateway_commands_delivered_total")
    async with sim_device(topic_prefix, "SN-CMD-BATCH") as sim:
        await beat(sim, clock)
        batch = await sim.next(sim.commands)
        assert ids(batch) == [c["id"] for c in made[:16]]
        assert batch["commands"][3] == {key: made[3][key] for key in
                                        ("id", "type", "params", "created_at", "expires_at")}
        assert metric("gateway_commands_delivered_total") == delivered + 16
        states = {c["id"]: c for c in (await listing(api, dev["id"], limit="100"))["data"]}
        for command in made[:16]:
            now = states[command["id"]]
            assert now["status"] == "delivered" and now["attempts"] == 1
            assert now["delivered_at"] is not None
        for command in made[16:]:
            now = states[command["id"]]
            assert now["status"] == "pending" and now["attempts"] == 0
            assert now["delivered_at"] is None

        acks = [{"id": c["id"], "status": "succeeded"} for c in made[:6]]
        await beat(sim, clock, acks=acks)
        batch = await sim.next(sim.commands)
        assert ids(batch) == [c["id"] for c in made[6:]]
        assert metric("gateway_commands_delivered_total") == delivered + 16 + 14
    assert (await get(api, made[6]["id"]))["attempts"] == 2
    assert (await get(api, made[19]["id"]))["attempts"] == 1


async def test_unacknowledged_command_is_resent_after_every_heartbeat_until_it_expires(
    api: Caller, topic_prefix: str
) -> None:
    """At-least-once: each heartbeat re-sends the command until expiry, then never, and a
    late ack leaves it expired."""
    dev = await register(api, "SN-CMD-RESEND")
    command = await create(api, dev["id"], ttl_seconds=2)
    expires = parse(command["expires_at"])
    clock = Clock()
    async with sim_device(topic_prefix, "SN-CMD-RESEND") as sim:
        for attempt in (1, 2, 3):
            await beat(sim, clock)
            assert ids(await sim.next(sim.commands)) == [command["id"]]
            state = await get(api, command["id"])
            assert state["status"] == "delivered" and state["attempts"] == attempt
        # The TTL passing is what is tested.
        await asyncio.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
        await handled_beat(sim, clock)
        # A late ack does not revive it either: expired is terminal.
        await handled_beat(sim, clock, acks=[{"id": command["id"], "status": "succeeded"}])
        await nothing_sent_before(api, sim, clock, dev["id"])
    state = await get(api, command["id"])
    assert state["status"] == "expired" and state["attempts"] == 3
    assert state["completed_at"] == command["expires_at"] and state["result"] is None


async def test_ack_makes_the_command_terminal_and_it_is_never_resent(
    api: Caller, topic_prefix: str
) -> None:
    """succeeded, failed or rejected with a detail: the status, result {"detail"} and
    completed_at are set, the command is not sent again, and a later ack changes nothing."""
    dev = await register(api, "SN-CMD-ACK")
    outcomes = ("succeeded", "failed", "rejected")
    made = {outcome: await create(api, dev["id"], type=f"do_{outcome}") for outcome in outcomes}
    clock = Clock()
    async with sim_device(topic_prefix, "SN-CMD-ACK") as sim:
        await beat(sim, clock)
        assert ids(await sim.next(sim.commands)) == [c["id"] for c in made.values()]
        await handled_beat(sim, clock, acks=[
            {"id": made[outcome]["id"], "status": outcome, "detail": f"device: {outcome}"}
            for outcome in outcomes
        ])
        final = {}
        for outcome, command in made.items():
            state = await get(api, command["id"])
            assert state["status"] == outcome
            assert state["result"] == {"detail": f"device: {outcome}"}
            assert state["completed_at"] is not None and state["attempts"] == 1
            final[outcome] = state
        await handled_beat(sim, clock)
        # Contradicting acks of the same ids change nothing: terminal states are final.
        await handled_beat(sim, clock, acks=[
            {"id": command["id"], "status": "succeeded" if outcome != "succeeded" else "failed",
             "detail": "again"}
            for outcome, command in made.items()
        ])
        # None of the three heartbeats since the acks was answered with a command.
        await nothing_sent_before(api, sim, clock, dev["id"])
    for outcome, command in made.items():
        assert await get(api, command["id"]) == final[outcome]
        status, _ = await api.call("POST", f"/v1/commands/{command['id']}/cancel")
        assert status == 409


async def test_ack_in_the_first_heartbeat_completes_a_pending_command(
    api: Caller, topic_prefix: str
) -> None:
    """A device may ack a command it learned of earlier; pending → terminal directly."""
    dev = await register(api, "SN-CMD-EARLY")
    command = await create(api, dev["id"])
    clock = Clock()
    async with sim_device(topic_prefix, "SN-CMD-EARLY") as sim:
        await handled_beat(sim, clock, acks=[{"id": command["id"], "status": "succeeded"}])
        await nothing_sent_before(api, sim, clock, dev["id"])
    state = await get(api, command["id"])
    assert state["status"] == "succeeded" and state["attempts"] == 0


async def test_ack_for_another_devices_command_changes_nothing(
    api: Caller, topic_prefix: str
) -> None:
    """Device B acking device A's command id neither completes nor hides it."""
    owner = await register(api, "SN-CMD-OWNER")
    intruder = await register(api, "SN-CMD-INTRUDER")
    command = await create(api, owner["id"])
    clock = Clock()
    async with sim_device(topic_prefix, "SN-CMD-INTRUDER") as sim:
        before = handled()
        await beat(sim, clock, battery_percent=9,
                   acks=[{"id": command["id"], "status": "succeeded", "detail": "ha"},
                         {"id": "cmd_doesnotexist", "status": "failed"}])

        async def applied() -> bool:
            _, body = await api.call("GET", f"/v1/devices/{intruder['id']}")
            return body["battery_percent"] == 9

        await wait_for(applied)
        await settled(before)
        await nothing_sent_before(api, sim, clock, intruder["id"])
    state = await get(api, command["id"])
    assert state["status"] == "pending" and state["result"] is None
    async with sim_device(topic_prefix, "SN-CMD-OWNER") as sim:
        await beat(sim, clock)
        assert ids(await sim.next(sim.commands)) == [command["id"]]


async def test_expiry_is_visible_on_read_before_the_sweep_persists_it(
    api: Caller, db: asyncpg.Connection
) -> None:
    """Right after expires_at a GET and the list say expired, though the row still says open."""
    dev = await register(api, "SN-CMD-EXPIRE")
    command = await create(api, dev["id"], ttl_seconds=1)
    expires = parse(command["expires_at"])
    # The TTL passing is what is tested.
    await asyncio.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    state = await get(api, command["id"])
    assert state["status"] == "expired"
    assert state["completed_at"] == command["expires_at"]
    assert [c["id"] for c in (await listing(api, dev["id"], status="expired"))["data"]] == [
        command["id"]]
    assert (await listing(api, dev["id"], status="pending"))["data"] == []
    stored = await command_row(db, command["id"])
    # Not stored yet: the tests' gateway config runs no sweep unless a test asks (conftest).
    assert stored["status"] == "pending"
    status, body = await api.call("POST", f"/v1/commands/{command['id']}/cancel")
    assert status == 409, body
    assert (await get(api, command["id"]))["status"] == "expired"


async def test_sweep_persists_expiry(gateway: Gateway, api: Caller,
                                     db: asyncpg.Connection) -> None:
    """expire_commands moves overdue open commands to expired, completed at expires_at."""
    dev = await register(api, "SN-CMD-SWEEP")
    command = await create(api, dev["id"], ttl_seconds=1)
    keep = await create(api, dev["id"])
    expires = parse(command["expires_at"])
    # The TTL passing is what is tested; no background sweep runs in the tests' config, so
    # this call is the one that finds it.
    await asyncio.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    expired = await gateway.storage.commands.expire()
    assert [row.id for row in expired] == [command["id"]]
    stored = await command_row(db, command["id"])
    assert stored["status"] == "expired"
    assert stored["completed_at"] == stored["expires_at"]
    assert (await command_row(db, keep["id"]))["status"] == "pending"
    assert await get(api, command["id"]) == {**command, "status": "expired",
                                             "completed_at": command["expires_at"]}


async def test_canceled_commands_are_not_sent(api: Caller, topic_prefix: str) -> None:
    """Only open commands go to the device: a canceled one is left out, even if delivered."""
    dev = await register(api, "SN-CMD-CANCELSEND")
    first = await create(api, dev["id"], type="first")
    second = await create(api, dev["id"], type="second")
    clock = Clock()
    async with sim_device(topic_prefix, "SN-CMD-CANCELSEND") as sim:
        await beat(sim, clock)
        assert ids(await sim.next(sim.commands)) == [first["id"], second["id"]]
        assert (await api.call("POST", f"/v1/commands/{first['id']}/cancel"))[0] == 200
        await beat(sim, clock)
        assert ids(await sim.next(sim.commands)) == [second["id"]]
        assert (await api.call("POST", f"/v1/commands/{second['id']}/cancel"))[0] == 200
        await handled_beat(sim, clock)
        await nothing_sent_before(api, sim, clock, dev["id"])
    assert (await get(api, first["id"]))["status"] == "canceled"


async def test_reset_twice_delivers_exactly_one_factory_reset(
    api: Caller, topic_prefix: str
) -> None:
    """Two resets queue one factory_reset; the device receives exactly one."""
    dev = await register(api, "SN-CMD-RESET")
    for _ in range(2):
        status, body = await api.call("POST", f"/v1/devices/{dev['id']}/reset")
        assert status == 200, body
    resets = (await listing(api, dev["id"]))["data"]
    assert [(c["type"], c["status"]) for c in resets] == [("factory_reset", "pending")]
    status, body = await api.call("POST", f"/v1/devices/{dev['id']}/commands",
                                  {"type": "factory_reset"})
    assert status == 409, body
    clock = Clock()
    async with sim_device(topic_prefix, "SN-CMD-RESET") as sim:
        await beat(sim, clock)
        batch = await sim.next(sim.commands)
        assert [(c["id"], c["type"]) for c in batch["commands"]] == [
            (resets[0]["id"], "factory_reset")]
        status, _ = await api.call("POST", f"/v1/devices/{dev['id']}/reset")
        assert status == 200
        await handled_beat(sim, clock, acks=[{"id": resets[0]["id"], "status": "succeeded"}])
        assert len((await listing(api, dev["id"]))["data"]) == 1
        # Once the open one is finished, a new reset queues a new command.
        status, _ = await api.call("POST", f"/v1/devices/{dev['id']}/reset")
        assert status == 200
        after = (await listing(api, dev["id"]))["data"]
        assert [c["status"] for c in after] == ["pending", "succeeded"]
        # It is also the barrier for the heartbeat with the ack, which got no command: it
        # goes out with the next heartbeat, on the same topic, behind anything that got.
        await beat(sim, clock)
        assert ids(await sim.next(sim.commands)) == [after[0]["id"]]


async def test_two_heartbeats_of_one_device_in_one_batch_deliver_its_commands_once(
    database_url: str, db: asyncpg.Connection
) -> None:
    """A device with two buffered heartbeats that cannot supersede each other is written
    in two rounds of one batch; its open command goes out with the later one only, so
    `attempts` counts the one delivery that was published."""
    async with Storage.open(database_url, min_size=1, max_size=2) as storage:
        await storage.devices.register("dev_twice", "SN-TWICE", None, None, None)
        await storage.commands.create("dev_twice", "cmd_twice", "locate", {},
                                     dt.timedelta(hours=1), None)
        ts = now_ms()
        # The later heartbeat lacks the battery the earlier one carries: two entries.
        batch = {"SN-TWICE": [
            Pending(device_wire.Heartbeat(ts=ts, battery_percent=40), time.time()),
            Pending(device_wire.Heartbeat(ts=ts + 1000, signal_strength_dbm=-60), time.time()),
        ]}
        rounds = heartbeat_writer.rounds(batch)
        assert len(rounds) == 2
        written = await storage.heartbeats.apply(rounds, None)
    # Both applied; only the later one (the second round) carries the command.
    assert written.applied == 2
    (outcome,) = written.outcomes
    assert outcome.applied and [c.id for c in outcome.commands] == ["cmd_twice"]
    command = await db.fetchrow("SELECT status, attempts FROM commands WHERE id = 'cmd_twice'")
    assert (command["status"], command["attempts"]) == ("delivered", 1)
    device = await db.fetchrow(
        "SELECT battery_percent, signal_strength_dbm, last_ts FROM device_health"
        " WHERE device_id = 'dev_twice'")
    assert tuple(device) == (40, -60, ts + 1000)
