"""The PostgreSQL pool: connections with a timeout, health, error translation, migrations.

Connection failures surface as ``StorageUnavailable`` (callers answer 503 at once). While
the health check finds the database down, every call fails at once instead of waiting out
its timeout: a database that hangs instead of refusing would otherwise hold each request
for the whole timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import msgspec
import structlog

from gateway.errors import NotFound, SchemaMissing, StorageUnavailable
from gateway.health import Health

log = structlog.get_logger("gateway.storage")
T = TypeVar("T")

TABLES = ("devices", "device_settings", "device_settings_history", "commands", "api_keys",
          "device_credentials", "sweeps", "gateway_processes", "device_health", "event_outbox",
          "events", "event_relay")
_MIGRATION_LOCK = 7261554

# Errors that mean "the database is not there right now", as opposed to a bug.
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # A pooled connection left mid-operation when the server went away ("cannot switch
    # to state 15; another operation is in progress"): the pool replaces it on release.
    asyncpg.exceptions.InternalClientError,
    # New connections the server refuses while up: the database was dropped or renamed,
    # connection slots are full, the role lost its login. None is a reason to crash.
    asyncpg.InvalidCatalogNameError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InvalidAuthorizationSpecificationError,
)


def iso(value: dt.datetime) -> str:
    """ISO 8601 UTC with a Z, to the millisecond: every timestamp the gateway shows."""
    if value.tzinfo is not dt.UTC:  # asyncpg gives timestamptz values in UTC already
        value = value.astimezone(dt.UTC)
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" -> "Z"


def iso_or_none(value: dt.datetime | None) -> str | None:
    return None if value is None else iso(value)


def found(value: T | None, what: str = "No such object") -> T:
    """``value``, or NotFound when the query found nothing."""
    if value is None:
        raise NotFound(what)
    return value


def _encode_json(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def _json_text(value: str) -> str:
    """JSON columns arrive as text; each aggregate decodes them into its own types."""
    return value


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset between uses of a pooled connection: the gateway keeps no session
    state (its advisory locks are per transaction), and asyncpg's default reset costs a
    round trip per release."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=_encode_json, decoder=_json_text, schema="pg_catalog"
        )


async def create_pool(
    dsn: str,
    timeout: float,  # noqa: ASYNC109 - the pool's timeout, not this call's
    min_size: int,
    max_size: int,
    offline_after: float,
) -> asyncpg.Pool:
    """A connection pool, or StorageUnavailable (saying to migrate if the database is
    missing). Its connections carry ``gateway.offline_after``, the presence threshold the
    device queries read."""
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=timeout,
            timeout=timeout,
            server_settings={"gateway.offline_after": f"{offline_after} s"},
            init=_init_connection,
            reset=_no_reset,
            max_inactive_connection_lifetime=60,
        )
    except asyncpg.InvalidCatalogNameError as exc:
        raise StorageUnavailable(f"{exc} (run `gateway db migrate`)") from exc
    except UNAVAILABLE as exc:
        raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc


class Aggregate:
    """Base of the storage aggregates: each holds the database it queries."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def _delete(self, statement: str, *args: object) -> int:
        """Run a DELETE on a pooled connection; the number of rows it deleted."""
        async with self._db.connection() as conn:
            status: str = await conn.execute(statement, *args)
        return int(status.split()[-1])


class Database:
    """The asyncpg pool, its health, and the translation of connection errors."""

    def __init__(self, pool: asyncpg.Pool, timeout: float, health: Health) -> None:
        self._pool = pool
        self.timeout = timeout
        self.health = health
        health.database = True
        # Set when a health check (`ping`) fails and cleared when one passes.
        self._down = False
        self._failed = asyncio.Event()  # a call found the database unavailable

    async def close(self) -> None:
        self.health.database = False
        try:
            await self._pool.close()
        except UNAVAILABLE:
            self._pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self, *, check: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; ``StorageUnavailable`` when the database is away."""
        if not check:
            self.check_available()
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise self.unavailable(type(exc).__name__) from exc

    def unavailable(self, why: str) -> StorageUnavailable:
        """A call found the database unavailable: the health check runs at once. Returns
        the error to raise."""
        self.health.database = False
        self._failed.set()
        return StorageUnavailable(f"database unavailable: {why}")

    def check_available(self) -> None:
        """``StorageUnavailable`` at once while the health check finds the database down."""
        if self._down:
            raise StorageUnavailable("database unavailable (failing fast until it answers)")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def ping(self) -> bool:
        """The health check: True when the database answers within the timeout. While it
        does not, every other call fails at once."""
        try:
            await self.within_timeout(self._select_one())
        except StorageUnavailable:
            self._down = True
            return False
        finally:
            self._failed.clear()
        self._down = False
        self.health.database = True
        return True

    async def _select_one(self) -> None:
        async with self.connection(check=True) as conn:
            await conn.fetchval("SELECT 1")

    async def within_timeout(self, work: Awaitable[T]) -> T:
        """``work``'s result, or ``StorageUnavailable`` once the timeout has passed, whatever
        asyncpg is doing: after a statement timed out on a hung server it can take another
        timeout to give the connection back (it waits for the cancellation). Work given up
        on finishes in the background."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task not in done:
            task.add_done_callback(_retrieved)
            raise self.unavailable(f"no answer within {self.timeout:g} s")
        return task.result()

    async def until_failure(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a call finds the database unavailable meanwhile
        (the health check then runs at once)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._failed.wait()

    async def claim(self, sweep: str, every: float) -> bool:
        """Claim this period's run of a periodic ``sweep``: True for one caller per
        ``every`` seconds, whatever the number of processes asking."""
        async with self.connection() as conn:
            claimed = await conn.fetchval(
                "INSERT INTO sweeps AS s (name, next_run)"
                " VALUES ($1, now() + $2 * interval '1 second')"
                " ON CONFLICT (name) DO UPDATE SET next_run = EXCLUDED.next_run"
                " WHERE s.next_run <= now() RETURNING true",
                sweep, every,
            )
        return bool(claimed)

    async def check_schema(self) -> None:
        """Raise SchemaMissing unless ``gateway db migrate`` has been applied."""
        async with self.connection() as conn:
            missing = await conn.fetchval(
                "SELECT count(*) FROM unnest($1::text[]) AS t(name)"
                " WHERE to_regclass(t.name) IS NULL",
                list(TABLES),
            )
        if missing:
            raise SchemaMissing("the database has no gateway schema; run `gateway db migrate`")


    async def autovacuum(self) -> bool:
        """Whether PostgreSQL's autovacuum is on. The relay deletes every event it moves out
        of `event_outbox`, and heartbeats rewrite `device_health` every minute: without
        vacuum both only grow, and every read of the outbox slows down with them."""
        async with self.connection() as conn:
            return bool(await conn.fetchval("SELECT current_setting('autovacuum') = 'on'"))


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A check given up on finishes later: its outcome is read, so nothing is logged."""
    if not task.cancelled():
        task.exception()


def schema_sql() -> str:
    """``schema.sql``, installed with the package."""
    return resources.files("gateway").joinpath("schema.sql").read_text()


async def migrate(dsn: str) -> bool:
    """Create the database if it is missing and apply the schema. True if created."""
    created = False
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        parts = urlsplit(dsn)
        name = unquote(parts.path.lstrip("/"))
        admin = await asyncpg.connect(parts._replace(path="/postgres").geturl(), timeout=10)
        try:
            quoted = await admin.fetchval("SELECT quote_ident($1)", name)
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await admin.execute(f"CREATE DATABASE {quoted}")
                created = True
        finally:
            await admin.close()
        conn = await asyncpg.connect(dsn, timeout=10)
    except UNAVAILABLE as exc:
        raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    try:
        # One migrator at a time; the schema file itself is idempotent.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(schema_sql())
    finally:
        await conn.close()
    return created
