"""Every SQL statement of the gateway: the pool, and one module per aggregate.

Nothing here builds SQL from input, and every function returns typed rows. Multi-step
writes run in one transaction; no transaction stays open across a call to anything but
PostgreSQL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.health import Health
from gateway.storage.commands import Commands
from gateway.storage.credentials import Credentials
from gateway.storage.database import Database, create_pool, migrate
from gateway.storage.devices import Devices
from gateway.storage.events import Outbox
from gateway.storage.heartbeats import Heartbeats
from gateway.storage.keys import ApiKeys
from gateway.storage.presence import OFFLINE_AFTER_SECONDS, Presence
from gateway.storage.settings import DeviceSettingsStore

__all__ = ["Storage", "migrate"]


class Storage:
    """The database and its aggregates: ``storage.devices.get(...)``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.keys = ApiKeys(db)
        self.devices = Devices(db)
        self.settings = DeviceSettingsStore(db)
        self.commands = Commands(db)
        self.credentials = Credentials(db)
        self.heartbeats = Heartbeats(db)
        self.events = Outbox(db)
        self.presence = Presence(db)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a pool setting, not this call's deadline
        min_size: int = 2,
        max_size: int = 12,
        health: Health | None = None,
        offline_after: float = OFFLINE_AFTER_SECONDS,
    ) -> AsyncIterator[Storage]:
        pool = await create_pool(dsn, timeout, min_size, max_size, offline_after)
        db = Database(pool, timeout, health or Health())
        try:
            yield cls(db)
        finally:
            await db.close()
