"""Device broker credentials: hashes, revocation decisions, and leases for broker changes.

Changing a device's account at the broker is a network call that can take seconds, so no
transaction stays open across it. Instead a process takes a short *lease* on the device's
credentials row (``reserve_issue`` or ``claim_revocation``), calls the broker, and then
*confirms* what it did (``confirm_issue``, ``confirm_revocation``) or gives the lease back
(``release``). One lease at a time per device serialises issuing and revoking across
processes; a lease left by a crashed process lapses after ``LEASE_SECONDS``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import msgspec

from gateway.errors import Conflict, NotFound
from gateway.storage.database import Aggregate, found

LEASE_SECONDS = 30


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """A lease on a device's credentials, taken to change them at the broker."""

    device_id: str
    serial: str
    lease: str


class Confirmed(msgspec.Struct, frozen=True, kw_only=True):
    created_at: dt.datetime
    rotated: bool  # live credentials were replaced


# The lease is free, or lapsed.
_FREE = "(dc.lease IS NULL OR dc.lease_until < now())"

# A device that never had credentials gets an inert row (revoked, and applied) to hold
# the lease; `confirm_issue` makes it live.
_PLACEHOLDER_SQL = """
INSERT INTO device_credentials (device_id, password_hash, revoked_at, broker_revoked_at)
SELECT id, ''::bytea, now(), now() FROM devices WHERE id = $1 AND deleted_at IS NULL
ON CONFLICT (device_id) DO NOTHING
"""
_RESERVE_SQL = f"""
UPDATE device_credentials dc SET lease = $2, lease_until = now() + $3 * interval '1 second'
FROM devices d
WHERE dc.device_id = $1 AND d.id = dc.device_id AND d.deleted_at IS NULL AND {_FREE}
RETURNING d.serial_number
"""

_CONFIRM_ISSUE_SQL = """
WITH previous AS (
    SELECT revoked_at IS NULL AS live FROM device_credentials WHERE device_id = $1
)
UPDATE device_credentials dc SET
    password_hash = $3, created_at = now(), revoked_at = NULL, broker_revoked_at = NULL,
    lease = NULL, lease_until = NULL
FROM devices d
WHERE dc.device_id = $1 AND dc.lease = $2 AND d.id = dc.device_id AND d.deleted_at IS NULL
RETURNING dc.created_at, COALESCE((SELECT live FROM previous), false) AS rotated
"""

# Live credentials of a deleted device, or of a device whose factory_reset finished
# (acknowledged, or expired, even before the sweep persisted it) after they were issued.
# A canceled factory_reset revokes nothing.
_REVOKE_DUE_SQL = """
UPDATE device_credentials dc SET revoked_at = now()
FROM devices d
WHERE d.id = dc.device_id AND dc.revoked_at IS NULL
  AND ($1::text[] IS NULL OR dc.device_id = ANY($1::text[]))
  AND (d.deleted_at IS NOT NULL OR EXISTS (
      SELECT 1 FROM commands c
      WHERE c.device_id = dc.device_id AND c.type = 'factory_reset'
        AND CASE WHEN c.status IN ('pending', 'delivered')
                     THEN c.expires_at <= now() AND c.expires_at >= dc.created_at
                 WHEN c.status = 'canceled' THEN false
                 ELSE c.completed_at >= dc.created_at END))
"""


class Credentials(Aggregate):
    async def reserve_issue(self, device_id: str, lease: str) -> Reservation:
        """Lease a live device's credentials to issue new ones. NotFound for an unknown or
        deleted device; Conflict while another change of them is in progress."""
        async with self._db.transaction() as conn:
            await conn.execute(_PLACEHOLDER_SQL, device_id)
            serial = await conn.fetchval(_RESERVE_SQL, device_id, lease, LEASE_SECONDS)
            if serial is None:
                found(await conn.fetchval(
                    "SELECT id FROM devices WHERE id = $1 AND deleted_at IS NULL", device_id
                ))
                raise Conflict("The device's credentials are being changed; retry")
        return Reservation(device_id=device_id, serial=serial, lease=lease)

    async def confirm_issue(self, reservation: Reservation, password_hash: bytes) -> Confirmed:
        """Store the hash of the password the broker now has. When the device was deleted
        meanwhile, the broker's new account is handed to the revocation instead, and
        NotFound is raised."""
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(
                _CONFIRM_ISSUE_SQL, reservation.device_id, reservation.lease, password_hash
            )
            if row is None:
                await conn.execute(
                    "UPDATE device_credentials SET revoked_at = COALESCE(revoked_at, now()),"
                    " broker_revoked_at = NULL, lease = NULL, lease_until = NULL"
                    " WHERE device_id = $1 AND lease = $2",
                    reservation.device_id, reservation.lease,
                )
        if row is None:
            raise NotFound("No such object")
        return Confirmed(created_at=row["created_at"], rotated=row["rotated"])

    async def release(self, reservation: Reservation) -> None:
        """Give a lease back after the broker call failed; nothing changed."""
        await self._end_lease(reservation, "")

    async def _end_lease(self, reservation: Reservation, also_set: str) -> None:
        async with self._db.connection() as conn:
            await conn.execute(
                f"UPDATE device_credentials SET {also_set} lease = NULL, lease_until = NULL"
                " WHERE device_id = $1 AND lease = $2",
                reservation.device_id, reservation.lease,
            )

    async def due_revocations(self, device_ids: Sequence[str] | None) -> list[str]:
        """Record the revocations now due, and return the devices (all when ``device_ids``
        is None) whose revocation the broker has not applied yet.

        Due: the device is deleted, or a factory_reset of it was acknowledged or expired
        after its credentials were issued.
        """
        ids = None if device_ids is None else list(device_ids)
        async with self._db.transaction() as conn:
            await conn.execute(_REVOKE_DUE_SQL, ids)
            rows = await conn.fetch(
                "SELECT device_id FROM device_credentials"
                " WHERE revoked_at IS NOT NULL AND broker_revoked_at IS NULL"
                "   AND ($1::text[] IS NULL OR device_id = ANY($1::text[]))"
                " ORDER BY revoked_at",
                ids,
            )
        return [row["device_id"] for row in rows]

    async def claim_revocation(self, device_id: str, lease: str) -> Reservation | None:
        """Lease a recorded revocation that the broker has not applied yet; None when there
        is none, or another process holds the lease."""
        async with self._db.connection() as conn:
            serial = await conn.fetchval(
                "UPDATE device_credentials dc"
                " SET lease = $2, lease_until = now() + $3 * interval '1 second'"
                " FROM devices d"
                " WHERE dc.device_id = $1 AND d.id = dc.device_id"
                "   AND dc.revoked_at IS NOT NULL AND dc.broker_revoked_at IS NULL"
                f"  AND {_FREE}"
                " RETURNING d.serial_number",
                device_id, lease, LEASE_SECONDS,
            )
        if serial is None:
            return None
        return Reservation(device_id=device_id, serial=serial, lease=lease)

    async def confirm_revocation(self, reservation: Reservation) -> None:
        """The broker removed the account: the revocation is applied."""
        await self._end_lease(reservation, "broker_revoked_at = now(),")

