"""API keys: generation, hashing, and the per-request check.

A key reads ``sk_live_<key id>_<secret>``. Only the sha256 of the whole key is stored;
the key id locates the row and the hash is compared in constant time.

`KeyCache` keeps the keys in use in memory, so that a request costs no query for its key.
A revocation still takes effect at once in every process: it is announced with
PostgreSQL's NOTIFY in the revoking transaction, and each process drops the key when it
hears it; a process that is not listening (its listening connection is down) does not
cache at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import structlog

from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.storage.database import UNAVAILABLE
from gateway.storage.keys import CHANGES_CHANNEL, ApiKeys, StoredKey

log = structlog.get_logger("gateway.auth")

READ = "devices:read"
WRITE = "devices:write"
SCOPES = (READ, WRITE)
KEY_PREFIX = "sk_live_"
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    secret: str
    key_hash: bytes


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    scopes: frozenset[str]


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> NewKey:
    key_id = "key_" + _random(12)
    secret = f"{KEY_PREFIX}{key_id[4:]}_{_random(32)}"
    return NewKey(key_id=key_id, secret=secret, key_hash=hash_key(secret))


def key_id_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    ident, sep, secret = key[len(KEY_PREFIX):].partition("_")
    # Key ids are ASCII letters and digits; anything else (a NUL, which PostgreSQL cannot
    # take as text, or megabytes of junk) is no key and never reaches the database.
    if not sep or not secret or not (ident.isascii() and ident.isalnum() and len(ident) <= 64):
        return None
    return "key_" + ident


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``authorization: Bearer`` or ``x-api-key`` (names already lower-case)."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class KeyLookup(Protocol):
    async def get(self, key_id: str) -> StoredKey | None: ...


class KeyCache:
    """API keys by id, in memory while this process hears every change of them."""

    MAX_KEYS = 10_000
    RETRY_SECONDS = 1.0

    def __init__(self, keys: ApiKeys, dsn: str) -> None:
        self._keys = keys
        self._dsn = dsn
        self._cache: dict[str, StoredKey] = {}
        self._listening = False
        self._changes = 0  # counts announcements, so a lookup racing one is not cached

    async def get(self, key_id: str) -> StoredKey | None:
        cached = self._cache.get(key_id) if self._listening else None
        if cached is not None:
            return cached
        changes = self._changes
        stored = await self._keys.get(key_id)
        if (stored is not None and self._listening and changes == self._changes
                and len(self._cache) < self.MAX_KEYS):
            self._cache[key_id] = stored
        return stored

    def _changed(self, key_id: str) -> None:
        self._changes += 1
        self._cache.pop(key_id, None)

    def _deaf(self) -> None:
        self._listening = False
        self._changes += 1
        self._cache.clear()

    async def run(self) -> None:
        """Listen for changes until cancelled; cache only while listening."""
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
            except (*UNAVAILABLE, asyncpg.PostgresError):
                await asyncio.sleep(self.RETRY_SECONDS)
                continue
            try:
                await self._listen(conn)
            finally:
                self._deaf()
                with contextlib.suppress(*UNAVAILABLE, asyncpg.PostgresError):
                    await conn.close()
            log.warning("auth.key_notifications_lost", retry_in_seconds=self.RETRY_SECONDS)
            await asyncio.sleep(self.RETRY_SECONDS)

    async def _listen(self, conn: asyncpg.Connection) -> None:
        """Until ``conn`` is lost (checked every second, as well as when asyncpg says so)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        await conn.add_listener(
            CHANGES_CHANNEL, lambda _conn, _pid, _channel, key_id: self._changed(key_id)
        )
        self._listening = True
        while not conn.is_closed():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await lost.wait()


async def authenticate(keys: KeyLookup, headers: Mapping[str, str]) -> Principal:
    key = presented_key(headers)
    if key is None:
        raise AuthenticationFailed("No API key provided")
    key_id = key_id_of(key)
    stored = await keys.get(key_id) if key_id else None
    # Hash and compare even when the id is unknown, so timing does not tell ids apart.
    expected = stored.key_hash if stored is not None else b"\0" * 32
    if not hmac.compare_digest(hash_key(key), expected) or stored is None:
        raise AuthenticationFailed("Invalid API key")
    if stored.revoked:
        raise AuthenticationFailed("API key has been revoked")
    return Principal(key_id=stored.id, scopes=stored.scopes)


def require(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise PermissionDenied(f"This API key lacks the {scope} scope")
