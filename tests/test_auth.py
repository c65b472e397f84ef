"""API keys on the request/reply routes (docs/protocol.md §5, Authentication).

Every request carries a key in ``authorization: Bearer`` or ``x-api-key``; keys carry the
``devices:read`` and ``devices:write`` scopes, are stored only as hashes, and a revocation
takes effect on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from conftest import Caller, caller, create_key

from gateway.storage import Storage

# A device's whole stored state: the registry row and its health.
DEVICE_STATE = "SELECT d.*, h.* FROM devices d JOIN device_health h ON h.device_id = d.id"

READ = "devices:read"
WRITE = "devices:write"


@contextlib.asynccontextmanager
async def caller_with(database_url: str, prefix: str, *scopes: str) -> AsyncIterator[Caller]:
    """A caller holding a new key with exactly ``scopes``."""
    _, secret = await create_key(database_url, *scopes)
    async with caller(prefix, secret) as c:
        yield c


def assert_error(reply: tuple[int, Any], status: int, error_type: str) -> None:
    code, body = reply
    assert code == status, body
    assert body["error"]["type"] == error_type, body


async def new_device(api: Caller, serial: str = "SN-AUTH") -> str:
    status, body = await api.call("POST", "/v1/devices", {"serial_number": serial})
    assert status == 201, body
    return str(body["id"])


# Every docs/protocol.md §6 route but commands (commands are the same auth code path), with
# a body that would succeed, so that only the key decides the answer.
def all_routes(device_id: str) -> list[tuple[str, str, Any, str]]:
    return [
        ("POST", "/v1/devices", {"serial_number": "SN-OTHER"}, WRITE),
        ("GET", "/v1/devices", None, READ),
        ("GET", f"/v1/devices/{device_id}", None, READ),
        ("PATCH", f"/v1/devices/{device_id}", {"metadata": {"a": 1}}, WRITE),
        ("POST", f"/v1/devices/{device_id}/bind", {"end_user_id": "eu_1"}, WRITE),
        ("POST", f"/v1/devices/{device_id}/unbind", None, WRITE),
        ("POST", f"/v1/devices/{device_id}/reset", None, WRITE),
        ("GET", f"/v1/devices/{device_id}/settings", None, READ),
        ("PUT", f"/v1/devices/{device_id}/settings", {}, WRITE),
        ("PATCH", f"/v1/devices/{device_id}/settings", {}, WRITE),
        ("POST", f"/v1/devices/{device_id}/restore", None, WRITE),
        ("GET", f"/v1/devices/{device_id}/commands", None, READ),
        ("DELETE", f"/v1/devices/{device_id}", None, WRITE),
    ]


async def test_request_without_a_key_is_401_on_every_route(
    api: Caller, db: asyncpg.Connection
) -> None:
    """No key at all (or an empty one): 401 authentication_error on every route, and
    nothing changes."""
    device_id = await new_device(api)
    before = await db.fetchrow(DEVICE_STATE)
    routes = all_routes(device_id)
    replies = await asyncio.gather(*(
        api.call(method, path, body, key=None) for method, path, body, _ in routes
    ))
    for route, reply in zip(routes, replies, strict=True):
        assert reply[0] == 401, route
        assert_error(reply, 401, "authentication_error")
    assert await db.fetchrow(DEVICE_STATE) == before
    assert await db.fetchval("SELECT count(*) FROM commands") == 0
    # Empty or blank header values are no key either.
    for headers in ({"authorization": ""}, {"authorization": "Bearer"},
                    {"authorization": "Bearer   "}, {"x-api-key": ""}, {"x-api-key": "  "}):
        assert_error(await api.call("GET", "/v1/devices", headers=headers, key=None), 401,
                     "authentication_error")


async def test_unknown_key_is_401(api: Caller) -> None:
    """A well-formed key that was never issued is 401."""
    unknown = "sk_live_AAAAAAAAAAAA_" + "B" * 32
    for headers in ({"authorization": f"Bearer {unknown}"}, {"x-api-key": unknown}):
        assert_error(await api.call("GET", "/v1/devices", headers=headers, key=None), 401,
                     "authentication_error")


async def test_wrong_secret_for_a_real_key_id_is_401(api: Caller) -> None:
    """The id part of a real key with another secret is 401 (the hash decides), answered
    exactly like a key id that does not exist."""
    assert api.key is not None
    prefix, _, secret = api.key.rpartition("_")
    for wrong in (f"{prefix}_{'x' * len(secret)}", f"{prefix}_{secret[:-1]}",
                  f"{prefix}_{secret}x", api.key.upper(), f"{prefix}_"):
        assert_error(await api.call("GET", "/v1/devices", key=wrong), 401,
                     "authentication_error")
    known = await api.call("GET", "/v1/devices", key=f"{prefix}_{'z' * 32}")
    unknown = await api.call("GET", "/v1/devices", key=f"sk_live_ZZZZZZZZZZZZ_{'z' * 32}")
    assert known == unknown


async def test_malformed_key_is_401(api: Caller) -> None:
    """Keys not of the issued shape are 401, never 400 or 500: junk, SQL, NUL, unicode,
    a megabyte-free but long string, and other authorization schemes."""
    malformed = [
        "garbage", "sk_live_", "sk_live_abc", "sk_live__secret", "sk_test_abc_def",
        "sk_live_' OR '1'='1_x", "sk_live_abc'; DROP TABLE api_keys; --_x",
        "sk_live_a\x00b_secret", "sk_live_ünï_cødé", "sk_live_" + "a" * 5000 + "_b",
        "\\x00", "🔑",
    ]
    assert api.key is not None
    header_sets = [
        *({"authorization": f"Bearer {key}"} for key in malformed),
        *({"x-api-key": key} for key in malformed),
        *({"authorization": f"{scheme} {api.key}"} for scheme in ("Basic", "Token", "Bearer:")),
    ]
    replies = await asyncio.gather(*(
        api.call("GET", "/v1/devices", headers=headers, key=None) for headers in header_sets
    ))
    for headers, reply in zip(header_sets, replies, strict=True):
        assert reply[0] == 401, headers
        assert_error(reply, 401, "authentication_error")


async def test_revoked_key_is_401_on_the_next_request(
    api: Caller, database_url: str, topic_prefix: str
) -> None:
    """A key works, is revoked, and the very next request with it is 401."""
    key_id, secret = await create_key(database_url, READ, WRITE)
    async with caller(topic_prefix, secret) as user:
        assert (await user.call("GET", "/v1/devices"))[0] == 200
        async with Storage.open(database_url, min_size=1, max_size=1) as storage:
            assert await storage.keys.revoke(key_id) is not None
        assert_error(await user.call("GET", "/v1/devices"), 401, "authentication_error")
        assert_error(await user.call("POST", "/v1/devices", {"serial_number": "SN-R"}), 401,
                     "authentication_error")
    assert (await api.call("GET", "/v1/devices"))[0] == 200  # other keys still work


async def test_read_only_key_on_write_routes_is_403_and_changes_nothing(
    api: Caller, database_url: str, topic_prefix: str, db: asyncpg.Connection
) -> None:
    """devices:read alone: every write route answers 403 permission_error."""
    device_id = await new_device(api)
    before = await db.fetchrow(DEVICE_STATE)
    async with caller_with(database_url, topic_prefix, READ) as reader:
        for method, path, body, scope in all_routes(device_id):
            if scope == WRITE:
                assert_error(await reader.call(method, path, body), 403, "permission_error")
        status, reply = await reader.call("POST", f"/v1/devices/{device_id}/commands",
                                          {"type": "reboot"})
        assert status == 403, reply
    assert await db.fetchrow(DEVICE_STATE) == before
    assert await db.fetchval("SELECT count(*) FROM devices") == 1
    assert await db.fetchval("SELECT count(*) FROM commands") == 0
    assert await db.fetchval("SELECT version FROM device_settings") == 1


async def test_read_only_key_on_read_routes_is_200(
    api: Caller, database_url: str, topic_prefix: str
) -> None:
    """devices:read is enough for every read route."""
    device_id = await new_device(api)
    async with caller_with(database_url, topic_prefix, READ) as reader:
        for method, path, body, scope in all_routes(device_id):
            if scope == READ:
                status, reply = await reader.call(method, path, body)
                assert status == 200, (method, path, reply)


async def test_write_only_key_on_read_routes_is_403(
    api: Caller, database_url: str, topic_prefix: str
) -> None:
    """devices:write does not imply devices:read: read routes answer 403."""
    device_id = await new_device(api)
    async with caller_with(database_url, topic_prefix, WRITE) as writer:
        for method, path, body, scope in all_routes(device_id):
            if scope == READ:
                assert_error(await writer.call(method, path, body), 403, "permission_error")


async def test_write_only_key_on_write_routes_is_allowed(
    api: Caller, database_url: str, topic_prefix: str
) -> None:
    """devices:write alone is enough for every write route."""
    device_id = await new_device(api)
    async with caller_with(database_url, topic_prefix, WRITE) as writer:
        for method, path, body, scope in all_routes(device_id):
            if scope == WRITE:
                status, reply = await writer.call(method, path, body)
                assert status in (200, 201), (method, path, reply)


async def test_both_header_forms_work_with_any_header_name_case(api: Caller) -> None:
    """authorization: Bearer and x-api-key both work; names (and the scheme) ignore case."""
    key = api.key
    assert key is not None
    forms = [
        {"authorization": f"Bearer {key}"},
        {"Authorization": f"Bearer {key}"},
        {"AUTHORIZATION": f"bearer {key}"},
        {"authorization": f"BEARER  {key} "},
        {"x-api-key": key},
        {"X-API-Key": key},
        {"X-Api-Key": f" {key}"},
    ]
    for headers in forms:
        status, body = await api.call("GET", "/v1/devices", headers=headers, key=None)
        assert status == 200, (headers, body)
    status, body = await api.call("POST", "/v1/devices", {"serial_number": "SN-HDR"},
                                  headers={"X-API-KEY": key}, key=None)
    assert status == 201, body


async def test_keys_are_stored_only_as_hashes(
    api: Caller, database_url: str, db: asyncpg.Connection
) -> None:
    """No api_keys row holds the key or its secret part, in any column; the hash is 32 bytes."""
    secrets = [api.key] + [(await create_key(database_url, READ))[1] for _ in range(3)]
    rows = await db.fetch("SELECT t::text AS text, key_hash FROM api_keys t")
    assert len(rows) == 4
    for row in rows:
        assert len(row["key_hash"]) == 32
        for secret in secrets:
            assert secret is not None
            tail = secret.rpartition("_")[2]
            assert secret not in row["text"] and tail not in row["text"]
            assert tail.encode() not in row["key_hash"]


