"""EMQX's PostgreSQL authentication and authorization (deploy/emqx/emqx.conf) read what the
gateway keeps: the exact queries of that file, run as EMQX runs them (``${username}`` as a
parameter) by the read-only role deploy/emqx/grants.sql makes, against a migrated
database whose credentials are written as the gateway writes them. Password checks and
topic matching are EMQX's own rules, from its source: sha256 of salt then password in
hex, compared without case; a row's ``eq`` topic matches only that very topic; what no
row allows is denied (authorization.no_match = deny)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from conftest import caller, running_gateway
from test_deploy import DEPLOY

from gateway.config import Config, ConfigError
from gateway.dynsec import hash_password

EMQX_CONF = (DEPLOY / "emqx" / "emqx.conf").read_text()
ROLE = "emqx_auth"


def emqx_query(section: str) -> str:
    """The query of the PostgreSQL authenticator ("authentication") or source
    ("authorization"), with EMQX's placeholder made the statement's parameter."""
    start = EMQX_CONF.index(f"\n{section} ")
    block = EMQX_CONF[start:]
    postgres = block.index("backend = postgresql" if section == "authentication"
                           else "type = postgresql")
    query = re.search(r'query = """(.*?)"""', block[postgres:], re.S)
    assert query is not None
    assert query.group(1).count("${username}") >= 1
    assert "${" not in query.group(1).replace("${username}", "")
    return query.group(1).replace("${username}", "$1")


AUTHN = emqx_query("authentication")
AUTHZ = emqx_query("authorization")


def emqx_password_ok(row: asyncpg.Record | None, password: str) -> bool:
    """EMQX's check with password_hash_algorithm {name = sha256, salt_position = prefix}
    (emqx_passwd: hex of sha256(salt ++ password), compared caseless); no row: the
    authenticator passes (ignore), and with no other to accept the device it is refused."""
    if row is None:
        return False
    salt = row["salt"]
    assert isinstance(salt, bytes)  # EMQX concatenates the salt as is
    return hashlib.sha256(salt + password.encode()).hexdigest() == row["password_hash"].lower()


def emqx_allows(rows: list[asyncpg.Record], action: str, topic: str) -> bool:
    """EMQX's decision for a publish or subscribe from the rows of the ACL query."""
    for row in rows:
        assert row["topic"].startswith("eq "), "only literal topics are expected"
        if row["action"] in (action, "all") and row["topic"][3:] == topic:
            return row["permission"] == "allow"
    return False  # no_match = deny


@pytest.fixture
async def emqx(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as EMQX's role, after grants.sql ran as the owner with psql."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed: it comes from Debian's postgresql-client")
    password = secrets.token_hex(8)
    process = await asyncio.create_subprocess_exec(
        psql, database_url, "-q", "-v", "ON_ERROR_STOP=1", "-v", f"emqx_password={password}",
        "-f", str(DEPLOY / "emqx" / "grants.sql"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    conn = await asyncpg.connect(database_url)
    await conn.execute(f"SET ROLE {ROLE}")
    try:
        yield conn
    finally:
        await conn.close()


async def issue(db: asyncpg.Connection, serial: str, password: str) -> str:
    """A device with credentials, written as the gateway's credentials route writes them."""
    device_id = f"dev_{uuid.uuid4().hex[:12]}"
    await db.execute("INSERT INTO devices (id, serial_number) VALUES ($1, $2)", device_id, serial)
    await db.execute("INSERT INTO device_credentials (device_id, password_hash) VALUES ($1, $2)",
                     device_id, hash_password(password))
    return device_id


async def login(emqx: asyncpg.Connection, serial: str, password: str) -> bool:
    return emqx_password_ok(await emqx.fetchrow(AUTHN, serial), password)


def topics(serial: str) -> dict[str, str]:
    return {"heartbeat": f"devices/{serial}/heartbeat", "commands": f"devices/{serial}/commands",
            "settings": f"devices/{serial}/settings"}


async def test_the_issued_password_logs_in_and_no_other(db: asyncpg.Connection,
                                                        emqx: asyncpg.Connection) -> None:
    await issue(db, "SN-A", "right-password")
    await issue(db, "SN-B", "other-password")
    assert await login(emqx, "SN-A", "right-password")
    assert not await login(emqx, "SN-A", "wrong-password")
    assert not await login(emqx, "SN-A", "other-password")  # another device's
    assert not await login(emqx, "SN-B", "right-password")
    assert not await login(emqx, "SN-UNKNOWN", "right-password")
    assert not await login(emqx, "gateway", "right-password")  # never a device's row


async def test_a_device_may_use_its_own_topics_and_nothing_else(
    db: asyncpg.Connection, emqx: asyncpg.Connection
) -> None:
    await issue(db, "SN-A", "pw-a")
    await issue(db, "SN-B", "pw-b")
    rows = await emqx.fetch(AUTHZ, "SN-A")
    own, other = topics("SN-A"), topics("SN-B")
    assert emqx_allows(rows, "publish", own["heartbeat"])
    assert emqx_allows(rows, "subscribe", own["commands"])
    assert emqx_allows(rows, "subscribe", own["settings"])
    denied: list[tuple[str, str]] = [
        ("subscribe", own["heartbeat"]), ("publish", own["commands"]),
        ("publish", own["settings"]),
        *[(action, topic) for topic in other.values() for action in ("publish", "subscribe")],
        ("subscribe", "devices/+/commands"), ("subscribe", "devices/SN-A/+"),
        ("subscribe", "devices/#"), ("subscribe", "#"),
        ("publish", "api/v1/requests"), ("subscribe", "api/v1/replies/#"),
        ("subscribe", "events/v1/#"), ("publish", "events/v1/device.online"),
        ("publish", "devices/SN-A/heartbeat/x"), ("subscribe", "$SYS/#"),
    ]
    for action, topic in denied:
        assert not emqx_allows(rows, action, topic), (action, topic)
    assert len(rows) == 3


async def _gone(db: asyncpg.Connection, emqx: asyncpg.Connection, serial: str) -> bool:
    """Neither a login nor a topic for the device."""
    return (not await login(emqx, serial, "pw") and not await emqx.fetch(AUTHZ, serial))


async def test_deleted_revoked_or_reset_devices_lose_login_and_topics(
    db: asyncpg.Connection, emqx: asyncpg.Connection
) -> None:
    """As the Mosquitto set-up revokes them (docs/operations.md, Revocation): a deleted
    device, revoked credentials, a factory reset acknowledged or expired after they were
    issued; not a canceled or pending reset, nor credentials issued after the reset."""
    cases: dict[str, Any] = {}
    for name in ("deleted", "revoked", "reset_acked", "reset_expired", "reset_canceled",
                 "reset_pending", "reissued_after_reset"):
        cases[name] = await issue(db, f"SN-{name}", "pw")
    # Issued two hours ago, all but the last.
    await db.execute("UPDATE device_credentials SET created_at = now() - interval '2 hours'"
                     " WHERE device_id <> $1", cases["reissued_after_reset"])
    await db.execute("UPDATE devices SET deleted_at = now() WHERE id = $1", cases["deleted"])
    await db.execute("UPDATE device_credentials SET revoked_at = now() WHERE device_id = $1",
                     cases["revoked"])

    async def reset(device: str, status: str, expires: str, completed: bool) -> None:
        await db.execute(
            "INSERT INTO commands (id, device_id, type, status, expires_at, completed_at)"
            f" VALUES ($1, $2, 'factory_reset', $3, now() + interval '{expires}',"
            f" {'now()' if completed else 'NULL'})",
            f"cmd_{uuid.uuid4().hex[:12]}", device, status)

    await reset(cases["reset_acked"], "succeeded", "7 days", True)
    await reset(cases["reset_expired"], "delivered", "-1 second", False)
    await reset(cases["reset_canceled"], "canceled", "7 days", True)
    await reset(cases["reset_pending"], "pending", "7 days", False)
    await db.execute(
        "INSERT INTO commands (id, device_id, type, status, expires_at, completed_at)"
        " VALUES ($1, $2, 'factory_reset', 'succeeded', now(), now() - interval '1 hour')",
        f"cmd_{uuid.uuid4().hex[:12]}", cases["reissued_after_reset"])

    for name in ("deleted", "revoked", "reset_acked", "reset_expired"):
        assert await _gone(db, emqx, f"SN-{name}"), name
    for name in ("reset_canceled", "reset_pending", "reissued_after_reset"):
        assert await login(emqx, f"SN-{name}", "pw"), name
        assert len(await emqx.fetch(AUTHZ, f"SN-{name}")) == 3, name


async def test_emqx_role_reads_nothing_else(emqx: asyncpg.Connection) -> None:
    """grants.sql gives EMQX the columns its queries read, and no API key hash."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await emqx.fetch("SELECT key_hash FROM api_keys")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await emqx.fetch("SELECT metadata FROM devices")


async def test_the_gateway_issues_credentials_emqx_reads_without_a_broker_call(
    config: Config, db: asyncpg.Connection, emqx: asyncpg.Connection, topic_prefix: str,
    api_key: str,
) -> None:
    """With GATEWAY_DATABASE_CREDENTIALS the credentials route writes what EMQX's queries
    read, and nothing else: the issued password logs in, a rotation replaces it, a
    delete revokes it."""
    cfg = dataclasses.replace(config, database_credentials=True)
    async with running_gateway(cfg), caller(topic_prefix, api_key) as api:
        _, device = await api.call("POST", "/v1/devices", {"serial_number": "SN-EMQX-1"})
        path = f"/v1/devices/{device['id']}/credentials"
        status, first = await api.call("POST", path)
        assert (status, first["username"], first["rotated"]) == (201, "SN-EMQX-1", False)
        assert await login(emqx, "SN-EMQX-1", first["password"])
        assert emqx_allows(await emqx.fetch(AUTHZ, "SN-EMQX-1"), "publish",
                           first["topics"]["heartbeat"].removeprefix(f"{topic_prefix}/"))
        status, second = await api.call("POST", path)
        assert (status, second["rotated"]) == (201, True)
        assert await login(emqx, "SN-EMQX-1", second["password"])
        assert not await login(emqx, "SN-EMQX-1", first["password"])
        status, _ = await api.call("DELETE", f"/v1/devices/{device['id']}")
        assert status == 200
        assert not await login(emqx, "SN-EMQX-1", second["password"])
        assert not await emqx.fetch(AUTHZ, "SN-EMQX-1")


def test_both_credential_modes_at_once_are_a_configuration_error(config: Config) -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        dataclasses.replace(config, dynsec=True, database_credentials=True)
