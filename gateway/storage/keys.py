"""API keys: only a hash of each key is stored."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import msgspec

from gateway.storage.database import Aggregate


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """A key as listed; never its secret or hash."""

    id: str
    name: str | None
    scopes: list[str]
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class StoredKey(msgspec.Struct, frozen=True, kw_only=True):
    """What authentication needs to check a presented key."""

    id: str
    key_hash: bytes
    scopes: frozenset[str]
    revoked: bool


_COLUMNS = "id, name, scopes, created_at, revoked_at"
# Every process caching keys listens here; a revocation is announced in its transaction.
CHANGES_CHANNEL = "gateway_api_keys"


class ApiKeys(Aggregate):
    async def create(
        self, key_id: str, name: str | None, key_hash: bytes, scopes: Sequence[str]
    ) -> ApiKey:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "INSERT INTO api_keys (id, name, key_hash, scopes) VALUES ($1, $2, $3, $4)"
                f" RETURNING {_COLUMNS}",
                key_id, name, key_hash, list(scopes),
            )
        return ApiKey(**row)

    async def get(self, key_id: str) -> StoredKey | None:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, key_hash, scopes, revoked_at IS NOT NULL AS revoked"
                " FROM api_keys WHERE id = $1",
                key_id,
            )
        if row is None:
            return None
        return StoredKey(id=row["id"], key_hash=row["key_hash"],
                         scopes=frozenset(row["scopes"]), revoked=row["revoked"])

    async def all(self) -> list[ApiKey]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at")
        return [ApiKey(**row) for row in rows]

    async def revoke(self, key_id: str) -> tuple[ApiKey, bool] | None:
        """Revoke the key: (the key, whether this call revoked it), or None when there is
        no such key. Revoking a revoked key changes nothing."""
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(
                "WITH previous AS (SELECT revoked_at FROM api_keys WHERE id = $1)"
                " UPDATE api_keys SET revoked_at = COALESCE(api_keys.revoked_at, now())"
                " WHERE id = $1"
                f" RETURNING {_COLUMNS}, (SELECT revoked_at IS NULL FROM previous) AS newly",
                key_id,
            )
            if row is not None:
                await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, key_id)
        if row is None:
            return None
        return ApiKey(**{name: row[name] for name in ApiKey.__struct_fields__}), row["newly"]
