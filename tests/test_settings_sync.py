"""Settings sync over MQTT (docs/protocol.md §2, §4): a heartbeat reporting an old settings_version
gets a minimal RFC 7396 merge patch from that version, or the full document where the
gateway does not know the version (0, pruned from history, never issued)."""

from __future__ import annotations

import json
from typing import Any

from conftest import Caller, Device
from gateway_codecs import settings as settings_schema
from gateway_codecs.settings import merge_patch_apply, merge_patch_diff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sync_support import handled, metric, now_ms, register, settled, sim_device

from gateway.app import Gateway
from gateway.storage.settings import HISTORY_KEEP as SETTINGS_HISTORY_KEEP

NAMESPACES = ["connection", "upload", "audio", "power"]


def canonical(value: Any) -> str:
    """Type-aware JSON equality (``true`` is not ``1``)."""
    return json.dumps(value, sort_keys=True)


def sent(kind: str) -> float:
    return metric("gateway_settings_updates_sent_total", kind=kind)


class Clock:
    def __init__(self) -> None:
        self.ts = now_ms() - 60_000

    def __call__(self) -> int:
        self.ts += 1
        return self.ts


async def report(dev: Device, clock: Clock, version: int | None, **fields: Any) -> None:
    """A heartbeat reporting ``version`` as the applied settings (None: no field)."""
    body: dict[str, Any] = {"ts": clock(), **fields}
    if version is not None:
        body["settings_version"] = version
    await dev.heartbeat(body)


async def handled_report(dev: Device, clock: Clock, version: int | None, **fields: Any) -> None:
    """`report`, and wait until the gateway is done with the heartbeat (see `handled`)."""
    before = handled()
    await report(dev, clock, version, **fields)
    await settled(before)


async def nothing_sent_before(api: Caller, dev: Device, clock: Clock, device_id: str) -> None:
    """Assert that the heartbeats handled so far got no SettingsUpdate since the device
    last read its queue.

    The barrier: a write now (version N+1), then a heartbeat reporting N, gets the patch
    from N to N+1 on the same topic, behind anything the earlier heartbeats got. None of
    those can carry N+1: they were answered before the write.
    """
    current = (await read_settings(api, device_id))["version"]
    written = await write(api, "PATCH", device_id,
                          {"power": {"auto_sleep_minutes": 1 + current % 1000}})
    assert written["version"] == current + 1
    await report(dev, clock, current)
    update = await dev.next(dev.settings)
    assert (update["version"], update["base_version"]) == (current + 1, current)


async def read_settings(api: Caller, device_id: str) -> dict[str, Any]:
    status, body = await api.call("GET", f"/v1/devices/{device_id}/settings")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def write(api: Caller, method: str, device_id: str, body: Any) -> dict[str, Any]:
    status, reply = await api.call(method, f"/v1/devices/{device_id}/settings", body)
    assert status == 200, reply
    return reply  # type: ignore[no-any-return]


async def test_version_0_gets_the_full_document_with_null_base(
    api: Caller, topic_prefix: str
) -> None:
    """A device that has applied nothing gets every namespace, in order, base_version null."""
    dev = await register(api, "SN-SET-ZERO")
    current = await read_settings(api, dev["id"])
    assert current["version"] == 1 and current["applied_version"] == 0
    full = sent("full")
    async with sim_device(topic_prefix, "SN-SET-ZERO") as sim:
        await report(sim, Clock(), 0)
        update = await sim.next(sim.settings)
    assert update == {"version": 1, "base_version": None, "settings": current["settings"]}
    assert list(update["settings"]) == NAMESPACES
    assert canonical(update["settings"]) == canonical(settings_schema.defaults())
    assert sent("full") == full + 1


async def test_older_version_gets_the_minimal_merge_patch(api: Caller, topic_prefix: str) -> None:
    """After a PATCH (version 2), reporting 1 gets exactly the changed fields as a patch."""
    dev = await register(api, "SN-SET-PATCH")
    v1 = (await read_settings(api, dev["id"]))["settings"]
    v2 = await write(api, "PATCH", dev["id"],
                     {"upload": {"mode": "wifi_only", "off_peak_hours": {"enabled": True}},
                      "audio": {"codec": "aac"}})
    assert v2["version"] == 2
    patches = sent("patch")
    async with sim_device(topic_prefix, "SN-SET-PATCH") as sim:
        await report(sim, Clock(), 1)
        update = await sim.next(sim.settings)
    assert update == {
        "version": 2,
        "base_version": 1,
        "patch": {"upload": {"mode": "wifi_only", "off_peak_hours": {"enabled": True}},
                  "audio": {"codec": "aac"}},
    }
    assert canonical(merge_patch_apply(v1, update["patch"])) == canonical(v2["settings"])
    assert sent("patch") == patches + 1


async def test_patch_spans_several_versions_and_can_be_empty(
    api: Caller, topic_prefix: str
) -> None:
    """The patch goes from the reported version to the current one, however many steps;
    when a later write restored the reported document the patch is empty."""
    dev = await register(api, "SN-SET-MULTI")
    v1 = (await read_settings(api, dev["id"]))["settings"]
    await write(api, "PATCH", dev["id"], {"power": {"auto_sleep_minutes": 5}})
    v3 = await write(api, "PATCH", dev["id"], {"audio": {"bitrate_kbps": 64}})
    v4 = await write(api, "PATCH", dev["id"], {"power": {"auto_sleep_minutes": None},
                                               "audio": {"bitrate_kbps": None}})
    assert v4["version"] == 4
    assert canonical(v4["settings"]) == canonical(v1)
    clock = Clock()
    async with sim_device(topic_prefix, "SN-SET-MULTI") as sim:
        await report(sim, clock, 1)
        assert await sim.next(sim.settings) == {"version": 4, "base_version": 1, "patch": {}}
        await report(sim, clock, 3)
        update = await sim.next(sim.settings)
    assert update == {"version": 4, "base_version": 3, "patch": {
        "audio": {"bitrate_kbps": 32}, "power": {"auto_sleep_minutes": 30}}}
    assert canonical(merge_patch_apply(v3["settings"], update["patch"])) == canonical(v1)


async def test_up_to_date_device_gets_nothing(api: Caller, topic_prefix: str) -> None:
    """Reporting the current version sends no SettingsUpdate."""
    dev = await register(api, "SN-SET-CURRENT")
    await write(api, "PATCH", dev["id"], {"upload": {"allow_roaming": True}})
    clock = Clock()
    async with sim_device(topic_prefix, "SN-SET-CURRENT") as sim:
        await handled_report(sim, clock, 2)
        assert (await read_settings(api, dev["id"]))["applied_version"] == 2
        await nothing_sent_before(api, sim, clock, dev["id"])


async def test_heartbeat_without_settings_version_gets_nothing(
    api: Caller, topic_prefix: str
) -> None:
    """No settings_version, no SettingsUpdate, even when the device is behind."""
    dev = await register(api, "SN-SET-NONE")
    await write(api, "PATCH", dev["id"], {"upload": {"allow_roaming": True}})
    clock = Clock()
    async with sim_device(topic_prefix, "SN-SET-NONE") as sim:
        await handled_report(sim, clock, None, battery_percent=50)
        assert (await read_settings(api, dev["id"]))["applied_version"] == 0
        await nothing_sent_before(api, sim, clock, dev["id"])


async def test_applied_version_is_recorded(api: Caller, topic_prefix: str) -> None:
    """GET settings shows the version the device last reported as applied."""
    dev = await register(api, "SN-SET-APPLIED")
    v2 = await write(api, "PATCH", dev["id"], {"audio": {"codec": "pcm"}})
    clock = Clock()
    async with sim_device(topic_prefix, "SN-SET-APPLIED") as sim:
        await report(sim, clock, 1)
        update = await sim.next(sim.settings)
        assert update["version"] == 2
        assert (await read_settings(api, dev["id"]))["applied_version"] == 1
        await handled_report(sim, clock, update["version"])
        body = await read_settings(api, dev["id"])
        assert body["applied_version"] == 2
        assert body["version"] == 2 and body["settings"] == v2["settings"]
        await nothing_sent_before(api, sim, clock, dev["id"])


async def test_version_pruned_from_history_gets_the_full_document(
    api: Caller, gateway: Gateway, topic_prefix: str
) -> None:
    """Only the newest versions are kept: the oldest kept one gets a patch, one older the
    full document."""
    dev = await register(api, "SN-SET-PRUNED")
    writes = SETTINGS_HISTORY_KEEP + 2
    for n in range(writes):  # straight into storage: 34 writes through MQTT take long
        await gateway.storage.settings.write(
            dev["id"], None,
            lambda current, n=n: settings_schema.patch(
                current, {"upload": {"daily_data_limit_mb": 1000 + n}}),
        )
    current = await read_settings(api, dev["id"])
    version = 1 + writes
    assert current["version"] == version
    oldest_kept = version - SETTINGS_HISTORY_KEEP + 1
    clock = Clock()
    async with sim_device(topic_prefix, "SN-SET-PRUNED") as sim:
        await report(sim, clock, oldest_kept)
        assert await sim.next(sim.settings) == {
            "version": version, "base_version": oldest_kept,
            "patch": {"upload": {"daily_data_limit_mb": 1000 + writes - 1}},
        }
        for reported in (oldest_kept - 1, 1):
            await report(sim, clock, reported)
            assert await sim.next(sim.settings) == {
                "version": version, "base_version": None, "settings": current["settings"]}


async def test_version_never_issued_gets_the_full_document(
    api: Caller, topic_prefix: str
) -> None:
    """A made-up version (newer than any the gateway issued) is unknown: full document."""
    dev = await register(api, "SN-SET-MADEUP")
    v2 = await write(api, "PATCH", dev["id"], {"upload": {"mode": "4g_only"}})
    full = sent("full")
    clock = Clock()
    async with sim_device(topic_prefix, "SN-SET-MADEUP") as sim:
        for reported in (3, 99, 2**31 - 1):
            await report(sim, clock, reported)
            assert await sim.next(sim.settings) == {
                "version": 2, "base_version": None, "settings": v2["settings"]}
    assert sent("full") == full + 3


async def test_stale_heartbeat_gets_no_settings_update(api: Caller, topic_prefix: str) -> None:
    """A heartbeat whose ts is not newer is not applied, so it is not answered."""
    dev = await register(api, "SN-SET-STALE")
    await write(api, "PATCH", dev["id"], {"audio": {"codec": "pcm"}})
    clock = Clock()
    async with sim_device(topic_prefix, "SN-SET-STALE") as sim:
        ts = clock()
        for version in (2, 1):  # the second one has the same ts: stale
            before = handled()
            await sim.heartbeat({"ts": ts, "settings_version": version})
            await settled(before)
        assert (await read_settings(api, dev["id"]))["applied_version"] == 2
        await nothing_sent_before(api, sim, clock, dev["id"])


# --- property: the patch is merge_patch_diff(a, b) --------------------------------------

times = st.builds("{:02d}:{:02d}".format, st.integers(0, 23), st.integers(0, 59))
LEAVES: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("connection", "enabled_connections", "wifi"): st.booleans(),
    ("connection", "enabled_connections", "cellular"): st.booleans(),
    ("connection", "upload_network_preference"): st.lists(
        st.sampled_from(settings_schema.NETWORKS), min_size=1, max_size=3, unique=True),
    ("connection", "power_management", "wifi_idle_timeout_seconds"): st.integers(0, 86400),
    ("upload", "mode"): st.sampled_from(settings_schema.UPLOAD_MODES),
    ("upload", "streaming_enabled"): st.booleans(),
    ("upload", "daily_data_limit_mb"): st.integers(0, 10000),
    ("upload", "off_peak_hours", "enabled"): st.booleans(),
    ("upload", "off_peak_hours", "start"): times,
    ("upload", "off_peak_hours", "timezone"): st.sampled_from(
        ["UTC", "Europe/Berlin", "Asia/Tokyo", "America/New_York"]),
    ("audio", "codec"): st.sampled_from(settings_schema.AUDIO_CODECS),
    ("audio", "sample_rate_khz"): st.sampled_from(settings_schema.SAMPLE_RATES_KHZ),
    ("audio", "bitrate_kbps"): st.integers(6, 510),
    ("power", "auto_sleep_minutes"): st.integers(0, 1440),
    ("power", "low_battery_threshold_percent"): st.integers(0, 100),
}


@st.composite
def put_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid PUT body setting a random subset of fields (the rest take defaults)."""
    body: dict[str, Any] = {}
    for path in draw(st.lists(st.sampled_from(sorted(LEAVES)), max_size=6, unique=True)):
        node = body
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = draw(LEAVES[path])
    return body


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(put_bodies(), put_bodies()), min_size=1, max_size=2))
async def test_patch_is_the_merge_patch_diff_between_reported_and_current(
    api: Caller, topic_prefix: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]
) -> None:
    """PUT a then PUT b; a device reporting a's version gets merge_patch_diff(a, b), which
    applied to a gives b."""
    dev = await register(api, f"SN-SET-PROP-{now_ms()}")
    clock = Clock()
    async with sim_device(topic_prefix, dev["serial_number"]) as sim:
        for body_a, body_b in pairs:
            a = await write(api, "PUT", dev["id"], body_a)
            b = await write(api, "PUT", dev["id"], body_b)
            if b["version"] == a["version"]:
                assert canonical(a["settings"]) == canonical(b["settings"])
                continue  # nothing changed: up to date (tested above)
            assert b["version"] == a["version"] + 1
            await report(sim, clock, a["version"])
            update = await sim.next(sim.settings)
            expected = merge_patch_diff(a["settings"], b["settings"])
            assert update == {"version": b["version"], "base_version": a["version"],
                              "patch": expected}
            assert canonical(update["patch"]) == canonical(expected)
            assert canonical(merge_patch_apply(a["settings"], update["patch"])) == canonical(
                b["settings"])
            assert canonical(settings_schema.patch(a["settings"], update["patch"])) == canonical(
                b["settings"])
