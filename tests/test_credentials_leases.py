"""Device credentials are changed at the broker under a lease, never inside a transaction
(gateway/storage/credentials.py; docs/operations.md, Device security)."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest
from conftest import caller, running_gateway, wait_for

from gateway.config import Config
from gateway.errors import Conflict, NotFound
from gateway.storage import Storage


async def test_a_second_change_waits_for_the_first_ones_lease(database_url: str) -> None:
    """While one process holds the lease on a device's credentials, another cannot start a
    change of them; once the first gives it back, it can."""
    async with Storage.open(database_url, min_size=1, max_size=2) as storage:
        await storage.devices.register("dev_lease", "SN-LEASE", None, None, None)
        first = await storage.credentials.reserve_issue("dev_lease", "holder-1")
        assert first.serial == "SN-LEASE"
        with pytest.raises(Conflict):
            await storage.credentials.reserve_issue("dev_lease", "holder-2")
        await storage.credentials.release(first)
        second = await storage.credentials.reserve_issue("dev_lease", "holder-2")
        confirmed = await storage.credentials.confirm_issue(second, b"\x01" * 48)
        assert confirmed.rotated is False
        again = await storage.credentials.reserve_issue("dev_lease", "holder-3")
        assert (await storage.credentials.confirm_issue(again, b"\x02" * 48)).rotated is True


async def test_a_lapsed_lease_can_be_taken_over(database_url: str, db: asyncpg.Connection) -> None:
    """A process that died holding a lease does not block the device forever."""
    async with Storage.open(database_url, min_size=1, max_size=2) as storage:
        await storage.devices.register("dev_lapse", "SN-LAPSE", None, None, None)
        await storage.credentials.reserve_issue("dev_lapse", "crashed")
        await db.execute("UPDATE device_credentials SET lease_until = now() - interval '1 s'"
                         " WHERE device_id = 'dev_lapse'")
        taken = await storage.credentials.reserve_issue("dev_lapse", "successor")
        assert taken.lease == "successor"


async def test_a_device_deleted_during_an_issue_gets_no_live_credentials(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Deleted while the broker was being changed: the confirmation fails (404), and the
    account the broker got is left marked for revocation instead of live."""
    async with Storage.open(database_url, min_size=1, max_size=2) as storage:
        await storage.devices.register("dev_gone", "SN-GONE", None, None, None)
        reservation = await storage.credentials.reserve_issue("dev_gone", "issuer")
        await storage.devices.delete("dev_gone")
        with pytest.raises(NotFound):
            await storage.credentials.confirm_issue(reservation, b"\x03" * 48)
        row = await db.fetchrow("SELECT revoked_at, broker_revoked_at, lease"
                                " FROM device_credentials WHERE device_id = 'dev_gone'")
        assert row["revoked_at"] is not None and row["broker_revoked_at"] is None
        assert row["lease"] is None
        assert await storage.credentials.due_revocations(None) == ["dev_gone"]
        claim = await storage.credentials.claim_revocation("dev_gone", "revoker")
        assert claim is not None and claim.serial == "SN-GONE"
        assert await storage.credentials.claim_revocation("dev_gone", "other") is None
        await storage.credentials.confirm_revocation(claim)
        assert await storage.credentials.due_revocations(None) == []


@pytest.mark.slow
async def test_no_transaction_stays_open_while_the_broker_does_not_answer(
    config: Config, topic_prefix: str, api_key: str, db: asyncpg.Connection
) -> None:
    """With dynamic security on and a broker that never answers its control API (the
    shared broker has no plugin), an issue waits out its timeout and is answered 503; all
    that time no connection of the gateway is idle in a transaction, and afterwards the
    lease is given back."""
    async with running_gateway(dataclasses.replace(config, dynsec=True)), \
            caller(topic_prefix, api_key) as api:
        status, device = await api.call("POST", "/v1/devices", {"serial_number": "SN-WAIT"})
        assert status == 201
        issue = asyncio.create_task(api.call("POST", f"/v1/devices/{device['id']}/credentials"))

        async def leased() -> bool:
            return bool(await db.fetchval(
                "SELECT lease IS NOT NULL FROM device_credentials WHERE device_id = $1",
                device["id"]))

        await wait_for(leased, timeout=5)
        while not issue.done():
            in_transaction = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%'")
            assert in_transaction == 0
            await asyncio.sleep(0.2)
        status, body = await issue
        assert (status, body["error"]["type"]) == (503, "unavailable")
        assert not await leased()
