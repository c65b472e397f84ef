"""API keys: generation, hashing, and the per-request check.

A key reads ``sk_live_<key id>_<secret>``. Only the sha256 of the whole key is stored;
the key id locates the row and the hash is compared in constant time. Nothing is cached,
so a revocation takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.storage.keys import ApiKeys

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


async def authenticate(keys: ApiKeys, headers: Mapping[str, str]) -> Principal:
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
