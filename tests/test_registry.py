"""The device registry over MQTT request/reply: every route of docs/protocol.md §6 but
commands.

Real PostgreSQL and Mosquitto; each test has its own database and topic prefix.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import asyncpg
from conftest import Caller, caller, create_key, device, wait_for
from test_settings_schema import EXPECTED_DEFAULTS

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

# The defaults of docs/protocol.md §7, written out once in the settings schema tests, so
# that a change to the defaults fails here.
DEFAULT_SETTINGS: dict[str, Any] = EXPECTED_DEFAULTS

# Strings that break naively built SQL, JSON or shell text.
NASTY = [
    "'; DROP TABLE devices; --",
    '" OR 1=1 --',
    "back\\slash \\\\ \\' \\\"",
    "ünïcødé ✓ 设备 🚀 \u200b",
    "100% _wild_ LIKE $1 ::text",
]
TABLES = ("devices", "device_settings", "device_settings_history", "commands", "api_keys")


def with_settings(**namespaces: dict[str, Any]) -> dict[str, Any]:
    """The default settings with some fields of some namespaces changed (one level deep)."""
    document = {name: dict(space) for name, space in DEFAULT_SETTINGS.items()}
    for name, fields in namespaces.items():
        document[name].update(fields)
    return document


async def register(api: Caller, serial: str, **fields: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "/v1/devices", {"serial_number": serial, **fields})
    assert status == 201, body
    return body


def error_of(status: int, body: Any, expected_status: int, error_type: str) -> dict[str, Any]:
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["type"] == error_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def bad_fields(status: int, body: Any) -> set[str]:
    """The fields named by a validation error."""
    error = error_of(status, body, 400, "validation_error")
    return {detail["field"] for detail in error["details"]}


async def row_counts(db: asyncpg.Connection) -> dict[str, int]:
    return {table: await db.fetchval(f"SELECT count(*) FROM {table}") for table in TABLES}


# ---- register ------------------------------------------------------------------------


async def test_register_new_serial_is_201_with_the_full_device_object(api: Caller) -> None:
    """POST /v1/devices with a new serial answers 201 and the device object of §6."""
    status, body = await api.call("POST", "/v1/devices", {
        "serial_number": "SN-2025-001234", "device_type": "bota_pin_v1",
        "firmware_version": "1.2.0",
    })
    assert status == 201
    assert re.fullmatch(r"dev_[A-Za-z0-9]+", body["id"])
    assert body["serial_number"] == "SN-2025-001234"
    assert body["device_type"] == "bota_pin_v1"
    assert body["model"] == "bota_pin"
    assert body["firmware_version"] == "1.2.0"
    assert body["status"] == "unbound"
    assert body["end_user_id"] is None and body["bound_at"] is None
    for health in ("battery_percent", "storage_used_mb", "storage_total_mb",
                   "signal_strength_dbm", "last_heartbeat_at", "recording_state"):
        assert body[health] is None, health
    assert body["metadata"] is None
    assert body["settings"] == DEFAULT_SETTINGS
    assert TIMESTAMP.match(body["created_at"]) and TIMESTAMP.match(body["updated_at"])


async def test_register_existing_serial_is_200_and_the_device_unchanged(api: Caller) -> None:
    """Registering a known serial again answers 200 with the stored device, ignoring the body."""
    first = await register(api, "SN-AGAIN", device_type="bota_pin_v1", firmware_version="1.0",
                           metadata={"site": "a"})
    status, again = await api.call("POST", "/v1/devices", {
        "serial_number": "SN-AGAIN", "device_type": "bota_note_v2", "firmware_version": "9.9",
        "metadata": {"site": "b"},
    })
    assert status == 200
    assert again == first
    _, read = await api.call("GET", f"/v1/devices/{first['id']}")
    assert read == first


async def test_register_serial_of_deleted_device_is_409_conflict(
    api: Caller, db: asyncpg.Connection
) -> None:
    """A serial that belongs to a soft-deleted device cannot be registered again: 409."""
    created = await register(api, "SN-GONE")
    assert (await api.call("DELETE", f"/v1/devices/{created['id']}"))[0] == 200
    status, body = await api.call("POST", "/v1/devices", {"serial_number": "SN-GONE"})
    error_of(status, body, 409, "conflict")
    assert await db.fetchval("SELECT count(*) FROM devices") == 1


async def test_register_validation_error_names_every_bad_field(
    api: Caller, db: asyncpg.Connection
) -> None:
    """One validation error lists every bad field of the body, and nothing is stored."""
    status, body = await api.call("POST", "/v1/devices", {
        "serial_number": "bad serial/with+wildcards#",
        "device_type": 7,
        "firmware_version": "x" * 65,
        "metadata": ["not", "an", "object"],
        "colour": "red",
    })
    assert bad_fields(status, body) == {
        "serial_number", "device_type", "firmware_version", "metadata", "colour"
    }
    assert await db.fetchval("SELECT count(*) FROM devices") == 0


async def test_register_serial_outside_the_pattern_is_validation_error(
    api: Caller, db: asyncpg.Connection
) -> None:
    """serial_number is required and must match ^[A-Za-z0-9._:-]{1,128}$ exactly (it
    becomes a topic level); anything else is a validation error naming it."""
    bad = ["", " ", "a b", "a/b", "a+b", "a#b", "x" * 129, "SN-1\n", "\nSN-1", "SN\x00",
           "SÑ-1", "SN-1 ", 12345, True, {"a": 1}, None]
    bodies = [{"serial_number": serial} for serial in bad] + [{}, {"device_type": "x"}, None]
    replies = await asyncio.gather(*(api.call("POST", "/v1/devices", b) for b in bodies))
    for body, (status, reply) in zip(bodies, replies, strict=True):
        assert bad_fields(status, reply) == {"serial_number"}, repr(body)
    assert await db.fetchval("SELECT count(*) FROM devices") == 0
    for serial in ("a", "x" * 128, "SN.2025:01_a-B"):
        assert (await api.call("POST", "/v1/devices", {"serial_number": serial}))[0] == 201


async def test_model_is_device_type_without_trailing_version(api: Caller) -> None:
    """model drops a trailing _v<digits> from device_type, and is null without a type."""
    cases = {"bota_pin_v1": "bota_pin", "bota_note_v12": "bota_note", "sensor": "sensor",
             "v2_thing": "v2_thing", "pin_v1_x": "pin_v1_x"}
    devices = await asyncio.gather(*(
        register(api, f"SN-M{n}", device_type=device_type) for n, device_type in enumerate(cases)
    ))
    assert [d["model"] for d in devices] == list(cases.values())
    assert (await register(api, "SN-MNONE"))["model"] is None


async def test_concurrent_registrations_of_one_serial_create_one_device(
    api: Caller, db: asyncpg.Connection
) -> None:
    """20 simultaneous registrations of a serial: exactly one 201, nineteen 200, one id."""
    replies = await asyncio.gather(*(
        api.call("POST", "/v1/devices", {"serial_number": "SN-RACE"}) for _ in range(20)
    ))
    statuses = sorted(status for status, _ in replies)
    assert statuses == [200] * 19 + [201]
    assert len({body["id"] for _, body in replies}) == 1
    assert await db.fetchval("SELECT count(*) FROM devices") == 1
    assert await db.fetchval("SELECT count(*) FROM device_settings") == 1


# ---- list ----------------------------------------------------------------------------


async def test_list_is_newest_first_and_pages_with_starting_after(api: Caller) -> None:
    """GET /v1/devices lists newest first; starting_after continues; has_more is exact."""
    ids = [(await register(api, f"SN-L{n}"))["id"] for n in range(5)]
    newest_first = ids[::-1]
    status, page = await api.call("GET", "/v1/devices", query={"limit": "2"})
    assert status == 200 and page["object"] == "list"
    assert [d["id"] for d in page["data"]] == newest_first[:2] and page["has_more"] is True
    _, page = await api.call("GET", "/v1/devices",
                             query={"limit": "2", "starting_after": newest_first[1]})
    assert [d["id"] for d in page["data"]] == newest_first[2:4] and page["has_more"] is True
    _, page = await api.call("GET", "/v1/devices",
                             query={"limit": "2", "starting_after": newest_first[3]})
    assert [d["id"] for d in page["data"]] == newest_first[4:] and page["has_more"] is False
    _, page = await api.call("GET", "/v1/devices", query={"limit": "5"})
    assert len(page["data"]) == 5 and page["has_more"] is False


async def test_list_default_limit_is_20(api: Caller) -> None:
    """Without limit, a page holds 20 devices."""
    await asyncio.gather(*(register(api, f"SN-D{n}") for n in range(21)))
    status, page = await api.call("GET", "/v1/devices")
    assert status == 200 and len(page["data"]) == 20 and page["has_more"] is True


async def test_list_of_empty_registry_is_empty(api: Caller) -> None:
    """With no devices the list is empty and has_more is false."""
    assert await api.call("GET", "/v1/devices") == (
        200, {"object": "list", "data": [], "has_more": False}
    )


async def test_list_limit_outside_1_to_100_is_validation_error(api: Caller) -> None:
    """limit must be an integer 1..100; anything else names the limit field."""
    limits = ("0", "101", "-1", "abc", "", "1.5", " 5", "²", "٣", "9" * 5000)
    replies = await asyncio.gather(*(
        api.call("GET", "/v1/devices", query={"limit": limit}) for limit in limits
    ))
    for limit, (status, body) in zip(limits, replies, strict=True):
        assert bad_fields(status, body) == {"limit"}, limit
    for limit in ("1", "100"):
        assert (await api.call("GET", "/v1/devices", query={"limit": limit}))[0] == 200


async def test_list_filters_by_status(api: Caller) -> None:
    """status=bound / status=unbound select devices by binding; another value is rejected."""
    bound = await register(api, "SN-B")
    unbound = await register(api, "SN-U")
    await api.call("POST", f"/v1/devices/{bound['id']}/bind", {"end_user_id": "eu_1"})
    _, page = await api.call("GET", "/v1/devices", query={"status": "bound"})
    assert [d["id"] for d in page["data"]] == [bound["id"]]
    _, page = await api.call("GET", "/v1/devices", query={"status": "unbound"})
    assert [d["id"] for d in page["data"]] == [unbound["id"]]
    status, body = await api.call("GET", "/v1/devices", query={"status": "deleted"})
    assert bad_fields(status, body) == {"status"}


async def test_list_filters_by_end_user_id(api: Caller) -> None:
    """end_user_id selects the devices bound to that end user, newest first."""
    ids = {}
    for serial, user in (("SN-A1", "eu_a"), ("SN-A2", "eu_a"), ("SN-B1", "eu_b")):
        ids[serial] = (await register(api, serial))["id"]
        await api.call("POST", f"/v1/devices/{ids[serial]}/bind", {"end_user_id": user})
    await register(api, "SN-C1")
    _, page = await api.call("GET", "/v1/devices", query={"end_user_id": "eu_a"})
    assert [d["id"] for d in page["data"]] == [ids["SN-A2"], ids["SN-A1"]]
    _, page = await api.call("GET", "/v1/devices",
                             query={"end_user_id": "eu_b", "status": "bound"})
    assert [d["id"] for d in page["data"]] == [ids["SN-B1"]]
    _, page = await api.call("GET", "/v1/devices", query={"end_user_id": "eu_nobody"})
    assert page["data"] == []


async def test_list_filters_by_serial_number(api: Caller) -> None:
    """serial_number selects the one device with that serial (exact match, not a pattern)."""
    wanted = await register(api, "SN-WANTED")
    await register(api, "SN-WANTED2")
    _, page = await api.call("GET", "/v1/devices", query={"serial_number": "SN-WANTED"})
    assert [d["id"] for d in page["data"]] == [wanted["id"]]
    for pattern in ("SN-WANTED%", "SN-WANTE_", "sn-wanted"):
        _, page = await api.call("GET", "/v1/devices", query={"serial_number": pattern})
        assert page["data"] == [], pattern


async def test_list_omits_deleted_devices(api: Caller) -> None:
    """A deleted device is not listed, not even when filtering by its serial."""
    kept = await register(api, "SN-KEPT")
    gone = await register(api, "SN-DEL")
    await api.call("DELETE", f"/v1/devices/{gone['id']}")
    _, page = await api.call("GET", "/v1/devices")
    assert [d["id"] for d in page["data"]] == [kept["id"]]
    _, page = await api.call("GET", "/v1/devices", query={"serial_number": "SN-DEL"})
    assert page["data"] == []


async def test_list_starting_after_unknown_id_is_404(api: Caller) -> None:
    """starting_after naming no device is answered 404 not_found (not an empty page)."""
    await register(api, "SN-1")
    status, body = await api.call("GET", "/v1/devices",
                                  query={"starting_after": "dev_doesnotexist"})
    error_of(status, body, 404, "not_found")


async def test_pagination_has_no_gaps_or_repeats_while_devices_are_added(api: Caller) -> None:
    """Paging with limit 7 while another caller registers devices: every device that
    existed at the start appears exactly once, and no device appears twice."""
    initial = {d["id"] for d in await asyncio.gather(
        *(register(api, f"SN-P{n:03d}") for n in range(30))
    )}

    async def keep_registering() -> None:
        for n in range(25):
            await register(api, f"SN-NEW{n:03d}")

    adder = asyncio.create_task(keep_registering())
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        query = {"limit": "7"} | ({"starting_after": after} if after else {})
        status, page = await api.call("GET", "/v1/devices", query=query)
        assert status == 200 and len(page["data"]) <= 7
        seen.extend(d["id"] for d in page["data"])
        pages += 1
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
        await asyncio.sleep(0.01)  # paging at a pace that lets the adder interleave
    await adder
    assert len(seen) == len(set(seen)), "a device appeared twice"
    assert initial <= set(seen), "a device that existed at the start was skipped"
    assert pages >= 5


# ---- get / patch / delete / restore -------------------------------------------------


async def test_unknown_device_is_404_on_every_device_route(api: Caller) -> None:
    """An id that names no device (or could not be an id at all) is 404 not_found on get,
    patch, delete, restore, bind, unbind, reset and the settings routes."""
    await register(api, "SN-EXISTS")
    requests = [
        (method, f"/v1/devices/{device_id}{suffix}", body)
        for device_id in ("dev_nothere", "nope", "dev_x'--", "dev_%20", "dev_ü")
        for method, suffix, body in (
            ("GET", "", None), ("PATCH", "", {"metadata": {"a": 1}}), ("DELETE", "", None),
            ("POST", "/restore", None), ("POST", "/bind", {"end_user_id": "eu_1"}),
            ("POST", "/unbind", None), ("POST", "/reset", None), ("GET", "/settings", None),
            ("PUT", "/settings", {}), ("PATCH", "/settings", {}),
        )
    ]
    replies = await asyncio.gather(*(api.call(*request) for request in requests))
    for request, (status, reply) in zip(requests, replies, strict=True):
        assert status == 404, request
        error_of(status, reply, 404, "not_found")


async def test_patch_metadata_is_a_json_merge_patch(api: Caller) -> None:
    """PATCH metadata merges (RFC 7396): keys added or replaced, null deletes, objects merge."""
    created = await register(api, "SN-MP", metadata={
        "site": "A", "floor": 2, "tags": ["x"], "geo": {"lat": 1, "lon": 2}, "old": True,
    })
    status, body = await api.call("PATCH", f"/v1/devices/{created['id']}", {"metadata": {
        "site": "B", "room": "101", "old": None, "geo": {"lon": 3, "alt": 4}, "tags": ["y"],
    }})
    assert status == 200
    assert body["metadata"] == {"site": "B", "floor": 2, "tags": ["y"], "room": "101",
                                "geo": {"lat": 1, "lon": 3, "alt": 4}}
    assert (await api.call("GET", f"/v1/devices/{created['id']}"))[1]["metadata"] == \
        body["metadata"]


async def test_patch_metadata_on_device_without_metadata(api: Caller) -> None:
    """A device registered without metadata (null) takes the patch as its metadata."""
    created = await register(api, "SN-MP0")
    assert created["metadata"] is None
    _, body = await api.call("PATCH", f"/v1/devices/{created['id']}", {"metadata": {"k": "v"}})
    assert body["metadata"] == {"k": "v"}


async def test_patch_firmware_version_keeps_everything_else(api: Caller) -> None:
    """PATCH firmware_version changes it (and updated_at) and leaves metadata and binding."""
    created = await register(api, "SN-FW", firmware_version="1.0", metadata={"a": 1})
    await api.call("POST", f"/v1/devices/{created['id']}/bind", {"end_user_id": "eu_fw"})
    await asyncio.sleep(0.005)  # a clock tick, so a timestamp rewritten now would differ
    status, body = await api.call("PATCH", f"/v1/devices/{created['id']}",
                                  {"firmware_version": "2.0"})
    assert status == 200
    assert body["firmware_version"] == "2.0"
    assert body["metadata"] == {"a": 1} and body["end_user_id"] == "eu_fw"
    assert body["updated_at"] > created["updated_at"]


async def test_patch_null_clears_firmware_version_and_metadata(api: Caller) -> None:
    """PATCH is a merge patch: firmware_version null and metadata null clear them."""
    created = await register(api, "SN-FWNULL", firmware_version="1.0", metadata={"a": 1})
    status, body = await api.call("PATCH", f"/v1/devices/{created['id']}",
                                  {"firmware_version": None})
    assert status == 200 and body["firmware_version"] is None and body["metadata"] == {"a": 1}
    status, body = await api.call("PATCH", f"/v1/devices/{created['id']}", {"metadata": None})
    assert status == 200 and body["metadata"] is None
    _, read = await api.call("GET", f"/v1/devices/{created['id']}")
    assert read["firmware_version"] is None and read["metadata"] is None


async def test_patch_metadata_value_of_another_json_type_is_a_change(api: Caller) -> None:
    """true replaces 1, false replaces 0, 1.0 replaces 1: JSON types are kept apart even
    where Python's == would call them equal."""
    created = await register(api, "SN-TYPES", metadata={"a": 1, "b": 0, "c": 1})
    status, body = await api.call("PATCH", f"/v1/devices/{created['id']}",
                                  {"metadata": {"a": True, "b": False, "c": 1.0}})
    assert status == 200
    for metadata in (body["metadata"],
                     (await api.call("GET", f"/v1/devices/{created['id']}"))[1]["metadata"]):
        assert metadata["a"] is True and metadata["b"] is False
        assert isinstance(metadata["c"], float)


async def test_patch_with_nothing_changed_keeps_updated_at(api: Caller) -> None:
    """A PATCH that changes nothing leaves the device, updated_at included, as it was."""
    created = await register(api, "SN-NOOP", firmware_version="1.0", metadata={"a": 1})
    await asyncio.sleep(0.005)  # a clock tick, so a timestamp rewritten now would differ
    for patch in ({}, {"firmware_version": "1.0"}, {"metadata": {"a": 1}}):
        assert await api.call("PATCH", f"/v1/devices/{created['id']}", patch) == (200, created)


async def test_patch_validation_error_names_every_bad_field(api: Caller) -> None:
    """Bad PATCH fields are all named, and the device is unchanged."""
    created = await register(api, "SN-PV", firmware_version="1.0")
    status, body = await api.call("PATCH", f"/v1/devices/{created['id']}", {
        "firmware_version": 2, "metadata": "text", "serial_number": "SN-OTHER",
    })
    assert bad_fields(status, body) == {"firmware_version", "metadata", "serial_number"}
    assert (await api.call("GET", f"/v1/devices/{created['id']}"))[1] == created


async def test_delete_answers_deleted_and_the_device_then_reads_as_404(
    api: Caller, db: asyncpg.Connection
) -> None:
    """DELETE answers {id, object, deleted}; the device is then 404 on every route, but
    its record is kept."""
    created = await register(api, "SN-DELME")
    device_id = created["id"]
    assert await api.call("DELETE", f"/v1/devices/{device_id}") == (
        200, {"id": device_id, "object": "device", "deleted": True}
    )
    requests = [
        ("GET", f"/v1/devices/{device_id}", None),
        ("PATCH", f"/v1/devices/{device_id}", {"metadata": {"a": 1}}),
        ("DELETE", f"/v1/devices/{device_id}", None),
        ("POST", f"/v1/devices/{device_id}/bind", {"end_user_id": "eu_1"}),
        ("POST", f"/v1/devices/{device_id}/unbind", None),
        ("POST", f"/v1/devices/{device_id}/reset", None),
        ("GET", f"/v1/devices/{device_id}/settings", None),
        ("PUT", f"/v1/devices/{device_id}/settings", {}),
        ("PATCH", f"/v1/devices/{device_id}/settings", {}),
    ]
    replies = await asyncio.gather(*(api.call(*request) for request in requests))
    for request, (status, reply) in zip(requests, replies, strict=True):
        assert status == 404, request
        error_of(status, reply, 404, "not_found")
    row = await db.fetchrow("SELECT serial_number, deleted_at FROM devices WHERE id = $1",
                            device_id)
    assert row["serial_number"] == "SN-DELME" and row["deleted_at"] is not None
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


async def test_restore_returns_the_device_as_it_was_before_the_delete(api: Caller) -> None:
    """Restore brings back the device exactly as it read before the delete: binding,
    metadata, firmware, settings and timestamps."""
    created = await register(api, "SN-RESTORE", device_type="bota_pin_v1",
                             firmware_version="1.0", metadata={"site": "A"})
    device_id = created["id"]
    await api.call("POST", f"/v1/devices/{device_id}/bind", {"end_user_id": "eu_r"})
    await api.call("PATCH", f"/v1/devices/{device_id}/settings", {"audio": {"codec": "aac"}})
    _, before = await api.call("GET", f"/v1/devices/{device_id}")
    _, settings_before = await api.call("GET", f"/v1/devices/{device_id}/settings")
    await asyncio.sleep(0.005)  # a clock tick, so a timestamp rewritten now would differ
    await api.call("DELETE", f"/v1/devices/{device_id}")
    status, restored = await api.call("POST", f"/v1/devices/{device_id}/restore")
    assert status == 200
    assert restored == before
    assert await api.call("GET", f"/v1/devices/{device_id}") == (200, before)
    assert await api.call("GET", f"/v1/devices/{device_id}/settings") == (200, settings_before)
    _, page = await api.call("GET", "/v1/devices", query={"serial_number": "SN-RESTORE"})
    assert [d["id"] for d in page["data"]] == [device_id]


# ---- bind / unbind / reset -----------------------------------------------------------


async def test_bind_marks_the_device_bound(api: Caller) -> None:
    """bind sets status bound, end_user_id and bound_at."""
    created = await register(api, "SN-BIND")
    status, body = await api.call("POST", f"/v1/devices/{created['id']}/bind",
                                  {"end_user_id": "eu_xyz789"})
    assert status == 200
    assert body["status"] == "bound" and body["end_user_id"] == "eu_xyz789"
    assert TIMESTAMP.match(body["bound_at"])
    assert (await api.call("GET", f"/v1/devices/{created['id']}"))[1] == body


async def test_bind_to_the_same_user_again_is_200_unchanged(api: Caller) -> None:
    """Binding to the user it is already bound to answers 200 and changes nothing."""
    created = await register(api, "SN-BIND2")
    _, bound = await api.call("POST", f"/v1/devices/{created['id']}/bind",
                              {"end_user_id": "eu_same"})
    await asyncio.sleep(0.005)  # a clock tick, so a timestamp rewritten now would differ
    assert await api.call("POST", f"/v1/devices/{created['id']}/bind",
                          {"end_user_id": "eu_same"}) == (200, bound)


async def test_bind_to_another_user_is_409_and_changes_nothing(api: Caller) -> None:
    """A device bound to one end user cannot be bound to another: 409 conflict."""
    created = await register(api, "SN-BIND3")
    _, bound = await api.call("POST", f"/v1/devices/{created['id']}/bind",
                              {"end_user_id": "eu_first"})
    status, body = await api.call("POST", f"/v1/devices/{created['id']}/bind",
                                  {"end_user_id": "eu_second"})
    error_of(status, body, 409, "conflict")
    assert (await api.call("GET", f"/v1/devices/{created['id']}"))[1] == bound


async def test_bind_without_end_user_id_is_validation_error(api: Caller) -> None:
    """end_user_id is required and must be a non-empty string."""
    created = await register(api, "SN-BIND4")
    bodies = (None, {}, {"end_user_id": ""}, {"end_user_id": 5}, {"end_user_id": None})
    replies = await asyncio.gather(*(
        api.call("POST", f"/v1/devices/{created['id']}/bind", body) for body in bodies))
    for body, (status, reply) in zip(bodies, replies, strict=True):
        assert bad_fields(status, reply) == {"end_user_id"}, body
    assert (await api.call("GET", f"/v1/devices/{created['id']}"))[1]["status"] == "unbound"


async def test_unbind_clears_the_binding(api: Caller) -> None:
    """unbind answers the device unbound, end_user_id and bound_at null; again is a no-op."""
    created = await register(api, "SN-UNB")
    await api.call("POST", f"/v1/devices/{created['id']}/bind", {"end_user_id": "eu_u"})
    status, body = await api.call("POST", f"/v1/devices/{created['id']}/unbind")
    assert status == 200
    assert body["status"] == "unbound"
    assert body["end_user_id"] is None and body["bound_at"] is None
    assert await api.call("POST", f"/v1/devices/{created['id']}/unbind") == (200, body)


async def test_reset_unbinds_and_answers_the_device(api: Caller) -> None:
    """reset answers the device: unbound, end_user_id and bound_at null; settings and
    metadata are kept."""
    created = await register(api, "SN-RST", metadata={"keep": "me"})
    device_id = created["id"]
    await api.call("POST", f"/v1/devices/{device_id}/bind", {"end_user_id": "eu_r"})
    await api.call("PATCH", f"/v1/devices/{device_id}/settings", {"power": {
        "auto_sleep_minutes": 10}})
    status, body = await api.call("POST", f"/v1/devices/{device_id}/reset")
    assert status == 200
    assert body["id"] == device_id and body["serial_number"] == "SN-RST"
    assert body["status"] == "unbound"
    assert body["end_user_id"] is None and body["bound_at"] is None
    assert body["metadata"] == {"keep": "me"}
    assert body["settings"]["power"]["auto_sleep_minutes"] == 10
    assert (await api.call("GET", f"/v1/devices/{device_id}"))[1] == body


async def test_resets_never_queue_more_than_one_open_factory_reset(
    api: Caller, db: asyncpg.Connection
) -> None:
    """Two resets, then ten at once: all answer 200, and the device has exactly one open
    factory_reset command."""
    created = await register(api, "SN-RST2")
    for _ in range(2):
        assert (await api.call("POST", f"/v1/devices/{created['id']}/reset"))[0] == 200
    rows = await db.fetch("SELECT type, status, device_id FROM commands")
    assert [(r["type"], r["status"], r["device_id"]) for r in rows] == [
        ("factory_reset", "pending", created["id"])
    ]
    replies = await asyncio.gather(*(
        api.call("POST", f"/v1/devices/{created['id']}/reset") for _ in range(10)
    ))
    assert [status for status, _ in replies] == [200] * 10
    assert await db.fetchval("SELECT count(*) FROM commands") == 1


async def test_reset_with_a_body_field_is_validation_error(
    api: Caller, db: asyncpg.Connection
) -> None:
    """reset takes no body fields; an unknown one is rejected and nothing is queued."""
    created = await register(api, "SN-RST4")
    status, body = await api.call("POST", f"/v1/devices/{created['id']}/reset", {"force": True})
    assert bad_fields(status, body) == {"force"}
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


# ---- settings ------------------------------------------------------------------------


async def test_new_device_settings_are_the_defaults_at_version_1(api: Caller) -> None:
    """GET settings of a new device: the §7 defaults, version 1, applied_version 0."""
    created = await register(api, "SN-S1")
    status, body = await api.call("GET", f"/v1/devices/{created['id']}/settings")
    assert status == 200
    assert set(body) == {"device_id", "settings", "version", "applied_version", "updated_at"}
    assert body["device_id"] == created["id"]
    assert body["settings"] == DEFAULT_SETTINGS
    assert body["version"] == 1 and body["applied_version"] == 0
    assert TIMESTAMP.match(body["updated_at"])


async def test_put_settings_replaces_the_whole_document(api: Caller) -> None:
    """PUT is a full replacement: omitted namespaces and fields take their defaults, and
    an empty body (or none) puts every field back to its default."""
    created = await register(api, "SN-S2")
    path = f"/v1/devices/{created['id']}/settings"
    await api.call("PATCH", path, {"audio": {"codec": "aac"}, "upload": {"allow_roaming": True},
                                   "power": {"auto_sleep_minutes": 60}})
    status, body = await api.call("PUT", path, {"upload": {"mode": "wifi_only"}})
    assert status == 200
    assert set(body) == {"device_id", "settings", "version", "updated_at"}
    assert body["device_id"] == created["id"]
    assert body["settings"] == with_settings(upload={"mode": "wifi_only"})
    assert body["version"] == 3
    _, read = await api.call("GET", path)
    assert read["settings"] == body["settings"] and read["version"] == 3
    assert (await api.call("GET", f"/v1/devices/{created['id']}"))[1]["settings"] == \
        body["settings"]
    for empty in ({}, None):
        status, reply = await api.call("PUT", path, empty)
        assert status == 200 and reply["settings"] == DEFAULT_SETTINGS


async def test_patch_settings_merges_and_null_resets_a_field(api: Caller) -> None:
    """PATCH merges into the current settings; null puts a field back to its default."""
    created = await register(api, "SN-S3")
    path = f"/v1/devices/{created['id']}/settings"
    _, first = await api.call("PATCH", path, {"upload": {"mode": "wifi_only",
                                                         "daily_data_limit_mb": 1000}})
    assert first["settings"] == with_settings(upload={"mode": "wifi_only",
                                                      "daily_data_limit_mb": 1000})
    status, second = await api.call("PATCH", path, {
        "upload": {"mode": None, "off_peak_hours": {"enabled": True}},
        "audio": {"sample_rate_khz": 48},
    })
    assert status == 200
    expected = with_settings(
        upload={"daily_data_limit_mb": 1000,
                "off_peak_hours": {"enabled": True, "start": "00:00", "end": "06:00",
                                   "timezone": "UTC"}},
        audio={"sample_rate_khz": 48},
    )
    assert second["settings"] == expected
    assert second["version"] == 3
    _, third = await api.call("PATCH", path, {"upload": None})
    assert third["settings"]["upload"] == DEFAULT_SETTINGS["upload"]
    assert third["settings"]["audio"]["sample_rate_khz"] == 48


async def test_settings_write_with_unknown_field_is_rejected(api: Caller) -> None:
    """Unknown fields (a typo) in PUT or PATCH are a validation error naming them."""
    created = await register(api, "SN-S4")
    path = f"/v1/devices/{created['id']}/settings"
    for method in ("PUT", "PATCH"):
        status, body = await api.call(method, path, {
            "upload": {"moed": "auto"}, "video": {}, "audio": {"codec": "opus", "gain": 3},
        })
        assert bad_fields(status, body) == {"upload.moed", "video", "audio.gain"}, method
    _, read = await api.call("GET", path)
    assert read["version"] == 1 and read["settings"] == DEFAULT_SETTINGS


async def test_settings_validation_names_every_bad_field_by_dotted_path(api: Caller) -> None:
    """Several bad fields in one write: each named by its dotted path; nothing changes."""
    created = await register(api, "SN-S5")
    path = f"/v1/devices/{created['id']}/settings"
    body = {
        "connection": {
            "enabled_connections": {"wifi": "yes"},
            "upload_network_preference": ["wifi", "wifi"],
            "power_management": {"cellular_idle_timeout_seconds": 86401},
        },
        "upload": {"mode": "turbo", "daily_data_limit_mb": 20000,
                   "off_peak_hours": {"start": "25:00", "timezone": "Mars/Olympus"}},
        "audio": {"sample_rate_khz": 44, "bitrate_kbps": 5.5},
        "power": {"low_battery_threshold_percent": -1, "auto_sleep_minutes": True},
    }
    expected = {
        "connection.enabled_connections.wifi",
        "connection.upload_network_preference",
        "connection.power_management.cellular_idle_timeout_seconds",
        "upload.mode", "upload.daily_data_limit_mb", "upload.off_peak_hours.start",
        "upload.off_peak_hours.timezone", "audio.sample_rate_khz", "audio.bitrate_kbps",
        "power.low_battery_threshold_percent", "power.auto_sleep_minutes",
    }
    for method in ("PUT", "PATCH"):
        status, reply = await api.call(method, path, body)
        assert bad_fields(status, reply) == expected, method
    _, read = await api.call("GET", path)
    assert read["version"] == 1 and read["settings"] == DEFAULT_SETTINGS


async def test_settings_error_for_one_namespace_reads_like_the_bota_example(
    api: Caller,
) -> None:
    """The Bota example: two bad upload fields → "Invalid upload settings" and both named."""
    created = await register(api, "SN-S5B")
    status, body = await api.call("PUT", f"/v1/devices/{created['id']}/settings", {
        "upload": {"daily_data_limit_mb": 10001, "mode": "fast"}
    })
    error = error_of(status, body, 400, "validation_error")
    assert error["message"] == "Invalid upload settings"
    assert sorted(error["details"], key=lambda d: d["field"]) == [
        {"field": "upload.daily_data_limit_mb", "error": "Must be between 0 and 10000 MB"},
        {"field": "upload.mode", "error": "Invalid mode. Must be one of: ble_only, auto, "
                                          "wifi_preferred, 4g_preferred, wifi_only, 4g_only"},
    ]


async def test_settings_write_with_mismatched_if_match_is_409_and_changes_nothing(
    api: Caller,
) -> None:
    """An if-match that is not the current version: 409 conflict, settings unchanged."""
    created = await register(api, "SN-S6")
    path = f"/v1/devices/{created['id']}/settings"
    for method, headers in (("PUT", {"if-match": "2"}), ("PATCH", {"If-Match": "0"}),
                            ("PATCH", {"if-match": '"7"'})):
        status, body = await api.call(method, path, {"audio": {"codec": "pcm"}},
                                      headers=headers)
        error_of(status, body, 409, "conflict")
    _, read = await api.call("GET", path)
    assert read["version"] == 1 and read["settings"] == DEFAULT_SETTINGS


async def test_settings_write_with_matching_if_match_succeeds(api: Caller) -> None:
    """An if-match equal to the current version lets the write through (plain or quoted)."""
    created = await register(api, "SN-S7")
    path = f"/v1/devices/{created['id']}/settings"
    status, body = await api.call("PATCH", path, {"audio": {"codec": "pcm"}},
                                  headers={"If-Match": "1"})
    assert status == 200 and body["version"] == 2
    status, body = await api.call("PUT", path, {}, headers={"if-match": '"2"'})
    assert status == 200 and body["version"] == 3 and body["settings"] == DEFAULT_SETTINGS


async def test_settings_if_match_that_is_not_a_version_is_validation_error(
    api: Caller,
) -> None:
    """An if-match header that is not a version number is a validation error."""
    created = await register(api, "SN-S7B")
    path = f"/v1/devices/{created['id']}/settings"
    for value in ("abc", "1.0", "²", "9" * 5000, ""):
        status, body = await api.call("PUT", path, {}, headers={"if-match": value})
        assert bad_fields(status, body) == {"if-match"}, value
    assert (await api.call("GET", path))[1]["version"] == 1


async def test_settings_version_increments_only_on_change(api: Caller) -> None:
    """A write leaving the settings equal keeps the version (and updated_at); a change
    increments it by exactly one."""
    created = await register(api, "SN-S8")
    path = f"/v1/devices/{created['id']}/settings"
    _, initial = await api.call("GET", path)
    for method, body in (("PUT", {}), ("PATCH", {}), ("PATCH", {"audio": {"codec": "opus"}}),
                         ("PUT", DEFAULT_SETTINGS)):
        status, reply = await api.call(method, path, body)
        assert status == 200 and reply["version"] == 1, (method, body)
        assert reply["updated_at"] == initial["updated_at"]
    document = with_settings(upload={"mode": "4g_only"})
    _, changed = await api.call("PUT", path, document)
    assert changed["version"] == 2
    _, same = await api.call("PUT", path, document)
    assert same["version"] == 2 and same["updated_at"] == changed["updated_at"]
    _, again = await api.call("PATCH", path, {"upload": {"mode": "auto"}})
    assert again["version"] == 3


async def test_get_settings_reports_the_version_the_device_applied(
    api: Caller, topic_prefix: str
) -> None:
    """applied_version in GET settings is the settings_version of the latest heartbeat."""
    created = await register(api, "SN-S9")
    path = f"/v1/devices/{created['id']}/settings"
    await api.call("PATCH", path, {"power": {"auto_sleep_minutes": 1}})
    async with device(topic_prefix, "SN-S9") as dev:
        await dev.heartbeat({"ts": int(time.time() * 1000), "settings_version": 2})

        async def applied() -> bool:
            body = (await api.call("GET", path))[1]
            return bool(body["applied_version"] == 2 and body["version"] == 2)

        await wait_for(applied)


# ---- Telemetron upsert ---------------------------------------------------------------


async def test_telemetron_upsert_creates_a_device(api: Caller) -> None:
    """A new identifier with a type creates the device: 200 "Device created successfully"."""
    status, body = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "sensor-001", "type": "sensor",
        "properties": {"location": "Building A", "firmware": "v2.1.0", "model": "TM-500"},
    }, headers={"x-api-key": api.key or ""})
    assert status == 200
    assert body == {"success": True, "message": "Device created successfully",
                    "deviceId": body["deviceId"], "identifier": "sensor-001", "type": "sensor"}
    assert body["deviceId"].startswith("dev_")
    _, read = await api.call("GET", f"/v1/devices/{body['deviceId']}")
    assert read["serial_number"] == "sensor-001" and read["device_type"] == "sensor"
    assert read["metadata"] == {"location": "Building A", "firmware": "v2.1.0",
                                "model": "TM-500"}
    assert read["settings"] == DEFAULT_SETTINGS


async def test_telemetron_upsert_updates_merging_properties_key_by_key(api: Caller) -> None:
    """An existing identifier is updated: properties merge into metadata key by key, type
    kept when omitted; 200 "Device updated successfully"."""
    _, created = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "sensor-002", "type": "sensor",
        "properties": {"location": "Building A", "firmware": "v2.1.0", "model": "TM-500"},
    })
    status, body = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "sensor-002",
        "properties": {"location": "Building B", "firmware": "v2.2.0"},
    })
    assert status == 200
    assert body == {"success": True, "message": "Device updated successfully",
                    "deviceId": created["deviceId"], "identifier": "sensor-002",
                    "type": "sensor"}
    _, read = await api.call("GET", f"/v1/devices/{created['deviceId']}")
    assert read["metadata"] == {"location": "Building B", "firmware": "v2.2.0",
                                "model": "TM-500"}
    status, body = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "sensor-002", "type": "gateway",
    })
    assert status == 200 and body["type"] == "gateway"
    _, read = await api.call("GET", f"/v1/devices/{created['deviceId']}")
    assert read["device_type"] == "gateway" and read["metadata"]["model"] == "TM-500"


async def test_concurrent_telemetron_upserts_create_one_device(
    api: Caller, db: asyncpg.Connection
) -> None:
    """Ten simultaneous upserts of a new identifier: one "created", nine "updated", one
    device with one settings row, every property merged."""
    replies = await asyncio.gather(*(
        api.call("POST", "/api/ext-v1/device", {
            "identifier": "sensor-race", "type": "sensor", "properties": {f"p{n}": n}})
        for n in range(10)
    ))
    assert [status for status, _ in replies] == [200] * 10
    messages = sorted(body["message"] for _, body in replies)
    assert messages == ["Device created successfully"] + ["Device updated successfully"] * 9
    assert len({body["deviceId"] for _, body in replies}) == 1
    assert await db.fetchval("SELECT count(*) FROM devices") == 1
    assert await db.fetchval("SELECT count(*) FROM device_settings") == 1
    _, read = await api.call("GET", f"/v1/devices/{replies[0][1]['deviceId']}")
    assert read["metadata"] == {f"p{n}": n for n in range(10)}


async def test_telemetron_upsert_of_registered_device_updates_it(api: Caller) -> None:
    """A serial registered through /v1/devices is found by its identifier (one registry)."""
    created = await register(api, "SN-T3", device_type="bota_pin_v1", metadata={"a": 1})
    status, body = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "SN-T3", "properties": {"b": 2}})
    assert status == 200 and body["deviceId"] == created["id"]
    assert body["message"] == "Device updated successfully" and body["type"] == "bota_pin_v1"
    _, read = await api.call("GET", f"/v1/devices/{created['id']}")
    assert read["metadata"] == {"a": 1, "b": 2}


async def test_telemetron_create_without_type_is_400_in_its_shape(
    api: Caller, db: asyncpg.Connection
) -> None:
    """Creating without type: 400 {"success": false, "message"}; nothing is stored."""
    status, body = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "sensor-new", "properties": {"a": 1}})
    assert status == 400
    assert set(body) == {"success", "message"} and body["success"] is False
    assert "type" in body["message"]
    assert await db.fetchval("SELECT count(*) FROM devices") == 0


async def test_telemetron_missing_or_invalid_fields_are_400_in_its_shape(
    api: Caller, db: asyncpg.Connection
) -> None:
    """identifier is required, non-empty, and follows the serial rule; type must be a
    string and properties an object: otherwise 400 {"success": false, "message"}."""
    bodies: list[Any] = [
        {"type": "sensor"}, {"identifier": "", "type": "sensor"},
        {"identifier": 5, "type": "sensor"}, {"identifier": "a b", "type": "sensor"},
        {"identifier": "x/y", "type": "sensor"}, {"identifier": "ok\n", "type": "sensor"},
        None, ["identifier"], {"identifier": "s1", "type": 3},
        {"identifier": "s1", "type": ""}, {"identifier": "s1", "type": "sensor",
                                             "properties": [1]},
    ]
    replies = await asyncio.gather(*(
        api.call("POST", "/api/ext-v1/device", body) for body in bodies))
    for body, (status, reply) in zip(bodies, replies, strict=True):
        assert status == 400, body
        assert set(reply) == {"success", "message"} and reply["success"] is False, body
        assert isinstance(reply["message"], str) and reply["message"], body
    assert await db.fetchval("SELECT count(*) FROM devices") == 0


async def test_telemetron_bad_key_is_401_in_its_shape(
    api: Caller, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """Missing or invalid key on the Telemetron route: 401 {"success": false, "message"}."""
    body = {"identifier": "sensor-401", "type": "sensor"}
    for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": "sk_live_abc_def"}):
        status, reply = await api.call("POST", "/api/ext-v1/device", body, headers=headers,
                                       key=None)
        assert status == 401, headers
        assert set(reply) == {"success", "message"} and reply["success"] is False
    assert await db.fetchval("SELECT count(*) FROM devices") == 0


async def test_telemetron_read_only_key_is_403_in_its_shape(
    api: Caller, database_url: str, topic_prefix: str
) -> None:
    """A key without devices:write on the Telemetron route: 403 in the Telemetron shape."""
    _, read_key = await create_key(database_url, "devices:read")
    async with caller(topic_prefix, read_key) as reader:
        status, reply = await reader.call("POST", "/api/ext-v1/device",
                                          {"identifier": "s403", "type": "sensor"})
    assert status == 403 and set(reply) == {"success", "message"} and not reply["success"]


# ---- routing -------------------------------------------------------------------------


async def test_unknown_route_is_404(api: Caller) -> None:
    """A path no route knows is 404 not_found."""
    for method, path in (("GET", "/v1/nothing"), ("GET", "/v2/devices"), ("GET", "/"),
                         ("POST", "/v1/devices/dev_a/explode"), ("GET", "/v1/devices/a/b/c"),
                         ("GET", "")):
        status, body = await api.call(method, path)
        error_of(status, body, 404, "not_found")


async def test_known_path_with_wrong_method_is_405(api: Caller) -> None:
    """A known path with a method it does not take is 405 method_not_allowed."""
    for method, path in (("DELETE", "/v1/devices"), ("PUT", "/v1/devices/dev_a"),
                         ("GET", "/v1/devices/dev_a/bind"), ("POST", "/v1/devices/dev_a/settings"),
                         ("GET", "/api/ext-v1/device")):
        status, body = await api.call(method, path)
        assert status == 405, (method, path, body)


async def test_method_is_case_insensitive_and_trailing_slash_ignored(api: Caller) -> None:
    """"get" means GET, and /v1/devices/ routes like /v1/devices."""
    assert (await api.call("get", "/v1/devices/"))[0] == 200


# ---- hostile strings -----------------------------------------------------------------


async def test_sql_metacharacters_in_string_fields_are_stored_verbatim(
    api: Caller, db: asyncpg.Connection
) -> None:
    """Quotes, comments, backslashes and unicode in every free-text field are stored and
    returned verbatim, and no other row or table is touched."""
    before = await row_counts(db)
    metadata = {text: text for text in NASTY} | {"nested": {NASTY[0]: [NASTY[1], NASTY[2]]}}
    created = await register(api, "SN-SQL", device_type=NASTY[0], firmware_version=NASTY[1],
                             metadata=metadata)
    assert created["device_type"] == NASTY[0] and created["firmware_version"] == NASTY[1]
    assert created["metadata"] == metadata
    after = await row_counts(db)
    assert after == before | {"devices": 1, "device_settings": 1,
                              "device_settings_history": 1}

    device_id = created["id"]
    for text in NASTY:
        _, patched = await api.call("PATCH", f"/v1/devices/{device_id}",
                                    {"firmware_version": text, "metadata": {"k": text}})
        assert patched["firmware_version"] == text and patched["metadata"]["k"] == text
        await api.call("POST", f"/v1/devices/{device_id}/unbind")
        _, bound = await api.call("POST", f"/v1/devices/{device_id}/bind", {"end_user_id": text})
        assert bound["end_user_id"] == text
        _, page = await api.call("GET", "/v1/devices", query={"end_user_id": text})
        assert [d["id"] for d in page["data"]] == [device_id]
    stored = await db.fetchrow("SELECT device_type, end_user_id FROM devices WHERE id = $1",
                               device_id)
    assert stored["device_type"] == NASTY[0] and stored["end_user_id"] == NASTY[-1]
    assert await row_counts(db) == after


async def test_sql_metacharacters_in_query_parameters_match_nothing(api: Caller) -> None:
    """Injection attempts in list filters match no device and never widen the result."""
    await register(api, "SN-Q1")
    await register(api, "SN-Q2")
    texts = [*NASTY, "' OR '1'='1", "SN-Q1' OR '1'='1"]
    queries = [{name: text} for text in texts
               for name in ("serial_number", "end_user_id", "status", "starting_after")]
    replies = await asyncio.gather(*(api.call("GET", "/v1/devices", query=q) for q in queries))
    for query, (status, body) in zip(queries, replies, strict=True):
        if "status" in query:
            assert bad_fields(status, body) == {"status"}, query
        elif "starting_after" in query:
            error_of(status, body, 404, "not_found")
        else:
            assert (status, body["data"]) == (200, []), query
    _, page = await api.call("GET", "/v1/devices")
    assert len(page["data"]) == 2


async def test_sql_metacharacters_in_serial_are_validation_errors(
    api: Caller, db: asyncpg.Connection
) -> None:
    """A serial with quotes, spaces, backslashes or unicode fails the pattern; nothing stored."""
    before = await row_counts(db)
    registered = await asyncio.gather(*(
        api.call("POST", "/v1/devices", {"serial_number": text}) for text in NASTY))
    upserted = await asyncio.gather(*(
        api.call("POST", "/api/ext-v1/device", {"identifier": text, "type": "sensor"})
        for text in NASTY))
    for text, (status, body), (t_status, t_body) in zip(NASTY, registered, upserted,
                                                          strict=True):
        assert bad_fields(status, body) == {"serial_number"}, text
        assert t_status == 400 and t_body["success"] is False, text
    assert await row_counts(db) == before


async def test_telemetron_stores_hostile_strings_verbatim(api: Caller) -> None:
    """Telemetron type and properties keep quotes, backslashes and unicode verbatim."""
    properties = {text: text for text in NASTY}
    status, body = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "sensor-sql", "type": NASTY[3], "properties": properties})
    assert status == 200 and body["type"] == NASTY[3]
    _, read = await api.call("GET", f"/v1/devices/{body['deviceId']}")
    assert read["device_type"] == NASTY[3] and read["metadata"] == properties


async def test_nul_characters_are_validation_errors_not_server_errors(
    api: Caller, db: asyncpg.Connection
) -> None:
    """PostgreSQL cannot store U+0000: a NUL in any string field is a 400, never a 500."""
    created = await register(api, "SN-NUL")
    device_id = created["id"]
    before = await row_counts(db)
    cases = [
        ("POST", "/v1/devices", {"serial_number": "SN-NUL2", "device_type": "a\x00b"}),
        ("POST", "/v1/devices", {"serial_number": "SN-NUL2", "metadata": {"k": "a\x00"}}),
        ("POST", "/v1/devices", {"serial_number": "SN-NUL2", "metadata": {"k\x00": 1}}),
        ("POST", "/v1/devices", {"serial_number": "SN-NUL2",
                                 "metadata": {"deep": [{"x": "\x00"}]}}),
        ("PATCH", f"/v1/devices/{device_id}", {"metadata": {"k": "\x00"}}),
        ("PATCH", f"/v1/devices/{device_id}", {"firmware_version": "\x00"}),
        ("POST", f"/v1/devices/{device_id}/bind", {"end_user_id": "eu\x00"}),
    ]
    replies = await asyncio.gather(*(api.call(*case) for case in cases))
    for case, (status, reply) in zip(cases, replies, strict=True):
        assert status == 400, case
        error_of(status, reply, 400, "validation_error")
    status, reply = await api.call("POST", "/api/ext-v1/device", {
        "identifier": "sensor-nul", "type": "sensor", "properties": {"k": "\x00"}})
    assert status == 400 and reply["success"] is False
    status, page = await api.call("GET", "/v1/devices", query={"serial_number": "a\x00"})
    assert status in (200, 400) and (status == 400 or page["data"] == [])
    assert await row_counts(db) == before
    assert (await api.call("GET", f"/v1/devices/{device_id}"))[1] == created


async def test_every_device_route_answers_the_same_device_object(api: Caller) -> None:
    """Register, get, list, patch, bind, unbind and reset all answer the same device shape."""
    created = await register(api, "SN-SHAPE")
    keys = set(created)
    device_id = created["id"]
    replies = [
        await api.call("GET", f"/v1/devices/{device_id}"),
        await api.call("PATCH", f"/v1/devices/{device_id}", {"metadata": {"a": 1}}),
        await api.call("POST", f"/v1/devices/{device_id}/bind", {"end_user_id": "eu_s"}),
        await api.call("POST", f"/v1/devices/{device_id}/unbind"),
        await api.call("POST", f"/v1/devices/{device_id}/reset"),
        await api.call("POST", f"/v1/devices/{device_id}/restore"),
    ]
    for status, body in replies:
        assert status == 200 and set(body) == keys
    assert replies[0][1] == created  # GET answers the device as registered
    _, page = await api.call("GET", "/v1/devices")
    assert set(page["data"][0]) == keys
