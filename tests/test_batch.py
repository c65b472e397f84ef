"""Bulk registration: ``POST /v1/devices/batch`` (docs/protocol.md §10)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from conftest import Caller, caller, create_key, device, wait_for
from gateway_codecs.registry import MAX_BATCH

from gateway import auth
from gateway.routes import new_id
from gateway.storage import Storage
from gateway.storage.devices import NewDevice

BATCH = "/v1/devices/batch"


async def batch(api: Caller, items: list[Any]) -> list[dict[str, Any]]:
    status, body = await api.call("POST", BATCH, {"devices": items})
    assert status == 200, body
    assert body["object"] == "list" and len(body["data"]) == len(items)
    return list(body["data"])


async def test_each_item_is_answered_as_a_single_registration_would_be(api: Caller) -> None:
    """New is 201, registered is 200 and unchanged, a deleted device's serial is 409, an
    invalid item is 400 with the very error of POST /v1/devices; in input order."""
    status, existing = await api.call("POST", "/v1/devices",
                                      {"serial_number": "SN-OLD", "metadata": {"a": 1}})
    assert status == 201
    status, gone = await api.call("POST", "/v1/devices", {"serial_number": "SN-GONE"})
    assert (await api.call("DELETE", f"/v1/devices/{gone['id']}"))[0] == 200
    invalid = [{"serial_number": "not a serial", "extra": 1}, {}, {"serial_number": "SN-X",
               "metadata": "text", "device_type": ""}, {"serial_number": "SN-\x00"},
               {"serial_number": "SN-Y", "metadata": {"deep": [{"k\x00": 1}]}},
               {"serial_number": None, "firmware_version": 2.5}]
    items = [{"serial_number": "SN-NEW", "device_type": "bota_pin_v1",
              "firmware_version": "2.4.1", "metadata": {"site": "north"}},
             {"serial_number": "SN-OLD", "metadata": {"ignored": True}},
             {"serial_number": "SN-GONE"}, *invalid]

    data = await batch(api, items)

    assert [entry["status"] for entry in data] == [201, 200, 409] + [400] * 6
    new = data[0]["device"]
    assert new == (await api.call("GET", f"/v1/devices/{new['id']}"))[1]
    assert (new["serial_number"], new["model"], new["firmware_version"], new["metadata"]) == (
        "SN-NEW", "bota_pin", "2.4.1", {"site": "north"})
    assert new["settings"] == existing["settings"] and new["status"] == "unbound"
    assert data[1]["device"] == existing
    assert data[2] == {"status": 409, "error": (await api.call(
        "POST", "/v1/devices", {"serial_number": "SN-GONE"}))[1]["error"]}
    for item, entry in zip(invalid, data[3:], strict=True):
        single_status, single = await api.call("POST", "/v1/devices", item)
        assert (entry["status"], {"error": entry["error"]}) == (single_status, single)
    assert data[3]["error"]["details"] == [
        {"field": "serial_number",
         "error": "Must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"},
        {"field": "extra", "error": "Unknown field"}]


async def test_a_serial_twice_in_one_batch_is_201_then_200_for_the_same_device(
    api: Caller,
) -> None:
    """As sequential registrations: the first item registers it; later ones read it
    unchanged, whatever else they carry."""
    data = await batch(api, [{"serial_number": "SN-TWICE", "device_type": "first"},
                             {"serial_number": "SN-OTHER"},
                             {"serial_number": "SN-TWICE", "device_type": "second"},
                             {"serial_number": "SN-TWICE"}])
    assert [entry["status"] for entry in data] == [201, 201, 200, 200]
    assert data[0]["device"] == data[2]["device"] == data[3]["device"]
    assert data[0]["device"]["device_type"] == "first"


async def test_invalid_items_change_nothing_and_valid_ones_get_every_row(
    api: Caller, db: asyncpg.Connection
) -> None:
    """One item's failure changes nothing for the others; each new device has its health,
    settings and first settings-history rows, as a single registration gives it."""
    items: list[Any] = [{"serial_number": f"SN-ROWS-{i}"} for i in range(50)]
    items[10] = {"serial_number": "SN-ROWS-BAD", "metadata": []}
    items[20] = {"serial_number": "SN ROWS"}
    data = await batch(api, items)
    assert sum(entry["status"] == 201 for entry in data) == 48
    ids = [entry["device"]["id"] for entry in data if entry["status"] == 201]
    counts = await db.fetchrow(
        "SELECT (SELECT count(*) FROM devices) AS devices,"
        " (SELECT count(*) FROM device_health WHERE device_id = ANY($1)) AS health,"
        " (SELECT count(*) FROM device_settings WHERE device_id = ANY($1) AND version = 1)"
        "   AS settings,"
        " (SELECT count(*) FROM device_settings_history WHERE device_id = ANY($1)"
        "   AND version = 1) AS history", ids)
    assert dict(counts) == {"devices": 48, "health": 48, "settings": 48, "history": 48}


async def test_a_batch_lists_newest_first_as_its_items_one_by_one_would(api: Caller) -> None:
    serials = [f"SN-ORDER-{i}" for i in (5, 3, 9, 1, 7, 2)]
    await batch(api, [{"serial_number": serial} for serial in serials])
    _, listing = await api.call("GET", "/v1/devices")
    assert [d["serial_number"] for d in listing["data"]] == serials[::-1]


async def test_a_batch_registered_device_heartbeats_and_gets_its_settings(
    api: Caller, topic_prefix: str
) -> None:
    [entry] = await batch(api, [{"serial_number": "SN-BATCH-HB"}])
    async with device(topic_prefix, "SN-BATCH-HB") as dev:
        await dev.heartbeat({"ts": 1, "battery_percent": 55, "settings_version": 0})
        update = await dev.next(dev.settings)
    assert (update["version"], update["base_version"]) == (1, None)
    assert update["settings"] == entry["device"]["settings"]

    async def battery() -> Any:
        return (await api.call("GET", f"/v1/devices/{entry['device']['id']}"))[1][
            "battery_percent"]

    assert await wait_for(battery) == 55


@pytest.mark.parametrize("body", [
    {}, {"devices": []}, {"devices": "SN-1"}, {"devices": [1]},
    {"devices": [{"serial_number": "SN-1"}, ["SN-2"]]}, {"devices": None},
    {"devices": [{"serial_number": f"SN-{i}"} for i in range(MAX_BATCH + 1)]},
], ids=["absent", "empty", "string", "number", "one-not-an-object", "null", "1001"])
async def test_a_body_that_is_not_a_list_of_1_to_1000_objects_is_one_400(
    api: Caller, db: asyncpg.Connection, body: dict[str, Any]
) -> None:
    status, answer = await api.call("POST", BATCH, body)
    assert status == 400
    assert answer["error"]["type"] == "validation_error"
    assert answer["error"]["message"] == "Invalid batch"
    expected = "Required" if body.get("devices") is None else (
        "Must be a list of 1 to 1000 objects")
    assert answer["error"]["details"] == [{"field": "devices", "error": expected}]
    assert await db.fetchval("SELECT count(*) FROM devices") == 0


async def test_a_body_of_another_shape_is_refused_whole(api: Caller) -> None:
    status, answer = await api.call("POST", BATCH, [{"serial_number": "SN-1"}])
    assert (status, answer["error"]["type"]) == (400, "invalid_request")
    status, answer = await api.call("POST", BATCH, {"devices": [{"serial_number": "SN-1"}],
                                                    "atomic": True})
    assert (status, answer["error"]["details"]) == (
        400, [{"field": "atomic", "error": "Unknown field"}])


async def test_batch_needs_the_write_scope(
    api: Caller, database_url: str, topic_prefix: str
) -> None:
    _, read_only = await create_key(database_url, auth.READ)
    async with caller(topic_prefix, read_only) as reader:
        status, answer = await reader.call("POST", BATCH, {"devices": [{"serial_number": "A"}]})
    assert (status, answer["error"]["type"]) == (403, "permission_error")
    assert (await api.call("GET", "/v1/devices"))[1]["data"] == []


async def test_1000_items_register_in_one_statement(database_url: str) -> None:
    """The batch's items reach PostgreSQL together: one statement (in one transaction)
    for 1,000 devices, not one per device, and one for their events (made from the
    devices the first returned)."""
    statements: list[str] = []
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        # A first batch lets asyncpg look up the statement's types (once per connection).
        await storage.devices.register_batch([NewDevice(new_id("dev_"), "SN-FIRST")])
        async with storage.db.connection() as conn:
            conn.add_query_logger(lambda query: statements.append(query.query))
        outcomes = await storage.devices.register_batch(
            [NewDevice(new_id("dev_"), f"SN-ONE-{i}") for i in range(MAX_BATCH)])
    assert [outcome[1] for outcome in outcomes if isinstance(outcome, tuple)] == [True] * 1000
    assert [s.split()[0] for s in statements] == [
        "BEGIN;", "WITH", "WITH", "COMMIT;"], statements


async def test_concurrent_batches_with_the_same_serials_register_each_once(
    api: Caller, database_url: str, topic_prefix: str
) -> None:
    """Two batches that overlap, in flight together: each serial is created once (201 in
    one batch, 200 and the same device in the other)."""
    first = [{"serial_number": f"SN-RACE-{i}"} for i in range(0, 300)]
    second = [{"serial_number": f"SN-RACE-{i}"} for i in range(299, -1, -1)]
    async with caller(topic_prefix, api.key) as other:
        a, b = await asyncio.gather(batch(api, first), batch(other, second))
    by_serial: dict[str, list[dict[str, Any]]] = {}
    for entry in a + b:
        by_serial.setdefault(entry["device"]["serial_number"], []).append(entry)
    assert len(by_serial) == 300
    for entries in by_serial.values():
        assert sorted(entry["status"] for entry in entries) == [200, 201]
        assert entries[0]["device"]["id"] == entries[1]["device"]["id"]
