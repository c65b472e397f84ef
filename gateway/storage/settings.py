"""Device settings: the current document and version, and the history devices patch from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from gateway_codecs.registry import DeviceSettings
from gateway_codecs.settings import Settings

from gateway.errors import Conflict
from gateway.storage.database import Aggregate, found, iso
from gateway.storage.devices import record_events

# Versions kept per device; a device reporting an older one gets the full document.
HISTORY_KEEP = 32

_settings = msgspec.json.Decoder(Settings)
_document = msgspec.json.Decoder(dict[str, Any])

_SELECT = """
    SELECT s.device_id, s.document, s.version, h.applied_version, s.updated_at
    FROM device_settings s JOIN device_health h ON h.device_id = s.device_id
    WHERE s.device_id = $1 AND NOT h.deleted
"""

Change = Callable[[dict[str, Any]], dict[str, Any]]


def _view(row: Mapping[str, Any], *, applied: bool) -> DeviceSettings:
    view = DeviceSettings(
        device_id=row["device_id"],
        settings=_settings.decode(row["document"]),
        version=row["version"],
        updated_at=iso(row["updated_at"]),
    )
    if applied:
        view.applied_version = row["applied_version"]
    return view


class DeviceSettingsStore(Aggregate):
    async def get(self, device_id: str) -> DeviceSettings:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(_SELECT, device_id)
        found(row)
        return _view(row, applied=True)

    async def write(self, device_id: str, if_match: int | None, change: Change) -> DeviceSettings:
        """Lock the settings and apply ``change`` to the document; the version goes up by
        one only when the document changed. 409 when ``if_match`` is not the version."""
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(_SELECT + " FOR UPDATE OF s", device_id)
            found(row)
            if if_match is not None and if_match != row["version"]:
                raise Conflict(
                    f"Settings are at version {row['version']}, not {if_match} (if-match)"
                )
            current = _document.decode(row["document"])
            document = change(current)
            if document == current:
                return _view(row, applied=False)
            version = row["version"] + 1
            await conn.execute(
                "INSERT INTO device_settings_history (device_id, version, document)"
                " VALUES ($1, $2, $3)",
                device_id, version, document,
            )
            updated = await conn.fetchrow(
                "UPDATE device_settings SET document = $2, version = $3, updated_at = now()"
                " WHERE device_id = $1 RETURNING device_id, document, version, updated_at",
                device_id, document, version,
            )
            await conn.execute(
                "UPDATE device_health SET settings_version = $2 WHERE device_id = $1",
                device_id, version,
            )
            await record_events(conn, [("device.settings_changed", device_id)])
        return _view(updated, applied=False)

    async def prune_history(self) -> int:
        """Drop history versions beyond the newest `HISTORY_KEEP` of every device."""
        return await self._delete(
            "DELETE FROM device_settings_history h USING device_settings s"
            " WHERE h.device_id = s.device_id AND h.version <= s.version - $1",
            HISTORY_KEEP,
        )
