"""The device settings document: its Structs, defaults, PUT and PATCH, RFC 7396 merge patches.

The Structs below are the schema: every field's type, range and default, and the wording
of its validation error (``rule``). A document is stored and sent as the plain JSON object
these Structs encode to, in their field order.
"""

from __future__ import annotations

import copy
import zoneinfo
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal

import msgspec
from gateway_codecs.validation import ErrorDetail, Invalid, rule, validate

__all__ = [
    "AUDIO_CODECS",
    "DEFAULTS",
    "NETWORKS",
    "SAMPLE_RATES_KHZ",
    "UPLOAD_MODES",
    "Settings",
    "SettingsError",
    "defaults",
    "merge_patch_apply",
    "merge_patch_diff",
    "patch",
    "replace",
]

UploadMode = Literal["ble_only", "auto", "wifi_preferred", "4g_preferred", "wifi_only", "4g_only"]
Network = Literal["wifi", "ble", "cellular"]
AudioCodec = Literal["opus", "aac", "pcm"]
SampleRate = Literal[8, 16, 24, 32, 48]
UPLOAD_MODES: tuple[str, ...] = UploadMode.__args__  # type: ignore[attr-defined]
NETWORKS: tuple[str, ...] = Network.__args__  # type: ignore[attr-defined]
AUDIO_CODECS: tuple[str, ...] = AudioCodec.__args__  # type: ignore[attr-defined]
SAMPLE_RATES_KHZ: tuple[int, ...] = SampleRate.__args__  # type: ignore[attr-defined]

_NOT_ZONES = frozenset({"localtime", "posixrules"})  # in the zoneinfo folder, not IANA names


@cache
def _time_zones() -> frozenset[str]:
    """IANA zone names known to this system (computed once)."""
    return frozenset(zoneinfo.available_timezones() - _NOT_ZONES | {"UTC"})


def _is_zone(name: str) -> bool:
    return name in _time_zones()


def _distinct(values: list[str]) -> bool:
    return len(set(values)) == len(values)


def _range(low: int, high: int, unit: str) -> Any:
    return msgspec.Meta(ge=low, le=high, extra=rule(f"Must be between {low} and {high} {unit}"))


def _one_of(name: str, options: tuple[object, ...]) -> Any:
    prefix = f"Invalid {name}. " if name else ""
    return msgspec.Meta(extra=rule(prefix + "Must be one of: " + ", ".join(map(str, options))))


Seconds = Annotated[int, _range(0, 86400, "seconds")]
Minutes = Annotated[int, _range(0, 1440, "minutes")]
ClockTime = Annotated[
    str, msgspec.Meta(pattern=r"^(?:[01][0-9]|2[0-3]):[0-5][0-9]$", min_length=5,
                      max_length=5, extra=rule("Must be a time as HH:MM"))
]
TimeZone = Annotated[str, msgspec.Meta(extra=rule("Must be an IANA time zone name", _is_zone))]
NetworkPreference = Annotated[
    list[Network],
    msgspec.Meta(min_length=1, max_length=3, extra=rule(
        "Must list 1 to 3 distinct values of: " + ", ".join(NETWORKS), _distinct)),
]


class _Namespace(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A part of the settings document: unknown fields are an error (a typo must not be
    dropped silently)."""


class EnabledConnections(_Namespace):
    wifi: bool = True
    cellular: bool = True


class PowerManagement(_Namespace):
    wifi_idle_timeout_seconds: Seconds = 180
    cellular_idle_timeout_seconds: Seconds = 180


class Connection(_Namespace):
    enabled_connections: EnabledConnections = msgspec.field(default_factory=EnabledConnections)
    upload_network_preference: NetworkPreference = msgspec.field(
        default_factory=lambda: ["wifi", "ble", "cellular"]
    )
    power_management: PowerManagement = msgspec.field(default_factory=PowerManagement)


class OffPeakHours(_Namespace):
    enabled: bool = False
    start: ClockTime = "00:00"
    end: ClockTime = "06:00"
    timezone: TimeZone = "UTC"


class Upload(_Namespace):
    mode: Annotated[UploadMode, _one_of("mode", UPLOAD_MODES)] = "auto"
    streaming_enabled: bool = True
    upload_delay_minutes: Minutes = 5
    daily_data_limit_mb: Annotated[int, _range(0, 10000, "MB")] = 500
    allow_roaming: bool = False
    pause_on_low_battery: bool = True
    off_peak_hours: OffPeakHours = msgspec.field(default_factory=OffPeakHours)


class Audio(_Namespace):
    codec: Annotated[AudioCodec, _one_of("codec", AUDIO_CODECS)] = "opus"
    sample_rate_khz: Annotated[SampleRate, _one_of("", SAMPLE_RATES_KHZ)] = 16
    bitrate_kbps: Annotated[int, _range(6, 510, "kbps")] = 32


class Power(_Namespace):
    auto_sleep_minutes: Minutes = 30
    low_battery_threshold_percent: Annotated[int, _range(0, 100, "percent")] = 20


class Settings(_Namespace):
    """A device's whole settings document; every field has a default."""

    connection: Connection = msgspec.field(default_factory=Connection)
    upload: Upload = msgspec.field(default_factory=Upload)
    audio: Audio = msgspec.field(default_factory=Audio)
    power: Power = msgspec.field(default_factory=Power)


class SettingsError(Invalid):
    """Invalid settings; ``details`` lists every bad field by dotted path."""


_NAMESPACES = frozenset(field.name for field in msgspec.structs.fields(Settings))
_to_document = msgspec.to_builtins

DEFAULTS: Mapping[str, Any] = _to_document(Settings())


def defaults() -> dict[str, Any]:
    """A fresh copy of the default settings document."""
    return copy.deepcopy(dict(DEFAULTS))


def replace(body: object) -> dict[str, Any]:
    """PUT: validate ``body`` and return the full document; omitted or null fields default."""
    return _document(_without_nulls(body))


def patch(current: Mapping[str, Any], body: object) -> dict[str, Any]:
    """PATCH: merge ``body`` into ``current`` (RFC 7396; null resets to default); pure."""
    if not isinstance(body, Mapping):
        return _document(body)
    return _document(merge_patch_apply(current, body))


def _document(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SettingsError("Invalid settings",
                            [{"field": "settings", "error": "Must be an object"}])
    details = validate(body, Settings)
    if details:
        raise SettingsError(_message(details), details)
    result: dict[str, Any] = _to_document(msgspec.convert(body, Settings))
    return result


def _message(details: list[ErrorDetail]) -> str:
    """"Invalid upload settings" when every bad field is in one namespace."""
    spaces = {detail["field"].split(".")[0] for detail in details}
    space = spaces.pop() if len(spaces) == 1 else ""
    return f"Invalid {space} settings" if space in _NAMESPACES else "Invalid settings"


def _without_nulls(value: object) -> object:
    """``value`` with every null member of an object removed (a null field takes its default)."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    return value


# ---- RFC 7396 merge patches ----------------------------------------------------------------

_MISSING: Any = object()


def _same(a: object, b: object) -> bool:
    """JSON equality that keeps types apart (``True`` != ``1``, ``1`` != ``1.0``)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def merge_patch_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The minimal RFC 7396 merge patch turning ``old`` into ``new`` ({} when equal).

    ``new`` must hold no null values: a merge patch cannot express them.
    """
    diff: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if _same(before, value):
            continue
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            diff[key] = merge_patch_diff(before, value)
        else:
            diff[key] = copy.deepcopy(value)
    return diff


def merge_patch_apply(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 merge patch (null deletes) and return a new value."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    base: Mapping[Any, Any] = target if isinstance(target, Mapping) else {}
    result: dict[Any, Any] = {}
    for key, value in base.items():
        if key not in patch:
            result[key] = copy.deepcopy(value)
        elif patch[key] is not None:
            result[key] = merge_patch_apply(value, patch[key])
    for key, value in patch.items():
        if key not in base and value is not None:
            result[key] = merge_patch_apply(None, value)
    return result

