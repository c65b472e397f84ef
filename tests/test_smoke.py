"""End-to-end smoke: register a device over request/reply, heartbeat it, read it back."""

from __future__ import annotations

import time

from conftest import Caller, device, wait_for


async def test_register_heartbeat_and_read_back(api: Caller, topic_prefix: str) -> None:
    status, created = await api.call("POST", "/v1/devices", {"serial_number": "SN-SMOKE-1"})
    assert status == 201
    async with device(topic_prefix, "SN-SMOKE-1") as dev:
        await dev.heartbeat({"ts": int(time.time() * 1000), "battery_percent": 77,
                             "settings_version": 0})
        update = await dev.next(dev.settings)
        assert update["version"] == 1 and update["base_version"] is None

    async def battery() -> bool:
        _, body = await api.call("GET", f"/v1/devices/{created['id']}")
        return body["battery_percent"] == 77

    await wait_for(battery)
