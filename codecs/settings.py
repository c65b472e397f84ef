"""Device settings document: schema, defaults, validation, PUT/PATCH and RFC 7396 merge patches.

The schema is one declarative table (``_SCHEMA``) of nested namespaces whose leaves are
``_Field`` entries (a default plus a checker returning an error text or ``None``).
"""

from __future__ import annotations

import copy
import re
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeAlias, TypeGuard

__all__ = [
    "AUDIO_CODECS",
    "DEFAULTS",
    "NETWORKS",
    "SAMPLE_RATES_KHZ",
    "UPLOAD_MODES",
    "SettingsError",
    "defaults",
    "merge_patch_apply",
    "merge_patch_diff",
    "patch",
    "replace",
]

UPLOAD_MODES = ("ble_only", "auto", "wifi_preferred", "4g_preferred", "wifi_only", "4g_only")
NETWORKS = ("wifi", "ble", "cellular")
AUDIO_CODECS = ("opus", "aac", "pcm")
SAMPLE_RATES_KHZ = (8, 16, 24, 32, 48)

_HHMM = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]")
# Names the system zoneinfo folder lists that are not IANA zone names.
_NOT_ZONES = frozenset({"localtime", "posixrules"})
_MISSING: Any = object()


class SettingsError(ValueError):
    """Invalid settings; ``details`` lists every bad field as ``{"field", "error"}``."""

    def __init__(self, message: str, details: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


@dataclass(frozen=True)
class _Field:
    """One leaf of the schema: its default and a checker (error text or None)."""

    default: Any
    check: Callable[[object], str | None]


_Schema: TypeAlias = Mapping[str, "_Field | _Schema"]


@cache
def _time_zones() -> frozenset[str]:
    """IANA zone names known to this system (computed once)."""
    return frozenset(zoneinfo.available_timezones() - _NOT_ZONES | {"UTC"})


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _boolean(default: bool) -> _Field:
    return _Field(default, lambda v: None if isinstance(v, bool) else "Must be a boolean")


def _integer(default: int, low: int, high: int, unit: str = "") -> _Field:
    text = f"Must be between {low} and {high}{' ' + unit if unit else ''}"

    def check(value: object) -> str | None:
        if not _is_int(value):
            return "Must be an integer"
        return None if low <= value <= high else text

    return _Field(default, check)


def _int_choice(default: int, options: Sequence[int]) -> _Field:
    text = "Must be one of: " + ", ".join(map(str, options))

    def check(value: object) -> str | None:
        if not _is_int(value):
            return "Must be an integer"
        return None if value in options else text

    return _Field(default, check)


def _choice(default: str, name: str, options: Sequence[str]) -> _Field:
    text = f"Invalid {name}. Must be one of: " + ", ".join(options)

    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return "Must be a string"
        return None if value in options else text

    return _Field(default, check)


def _string(default: str, valid: Callable[[str], object], text: str) -> _Field:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return "Must be a string"
        return None if valid(value) else text

    return _Field(default, check)


def _distinct_list(default: list[str], options: Sequence[str]) -> _Field:
    text = f"Must list 1 to {len(options)} distinct values of: " + ", ".join(options)

    def check(value: object) -> str | None:
        ok = (
            isinstance(value, list)
            and 1 <= len(value) <= len(options)
            and all(isinstance(item, str) and item in options for item in value)
            and len(set(value)) == len(value)
        )
        return None if ok else text

    return _Field(default, check)


_SCHEMA: _Schema = {
    "connection": {
        "enabled_connections": {"wifi": _boolean(True), "cellular": _boolean(True)},
        "upload_network_preference": _distinct_list(list(NETWORKS), NETWORKS),
        "power_management": {
            "wifi_idle_timeout_seconds": _integer(180, 0, 86400, "seconds"),
            "cellular_idle_timeout_seconds": _integer(180, 0, 86400, "seconds"),
        },
    },
    "upload": {
        "mode": _choice("auto", "mode", UPLOAD_MODES),
        "streaming_enabled": _boolean(True),
        "upload_delay_minutes": _integer(5, 0, 1440, "minutes"),
        "daily_data_limit_mb": _integer(500, 0, 10000, "MB"),
        "allow_roaming": _boolean(False),
        "pause_on_low_battery": _boolean(True),
        "off_peak_hours": {
            "enabled": _boolean(False),
            "start": _string("00:00", _HHMM.fullmatch, "Must be a time as HH:MM"),
            "end": _string("06:00", _HHMM.fullmatch, "Must be a time as HH:MM"),
            "timezone": _string(
                "UTC", lambda v: v in _time_zones(), "Must be an IANA time zone name"
            ),
        },
    },
    "audio": {
        "codec": _choice("opus", "codec", AUDIO_CODECS),
        "sample_rate_khz": _int_choice(16, SAMPLE_RATES_KHZ),
        "bitrate_kbps": _integer(32, 6, 510, "kbps"),
    },
    "power": {
        "auto_sleep_minutes": _integer(30, 0, 1440, "minutes"),
        "low_battery_threshold_percent": _integer(20, 0, 100, "percent"),
    },
}


def _default_of(spec: _Field | _Schema) -> Any:
    if isinstance(spec, _Field):
        return copy.deepcopy(spec.default)
    return {key: _default_of(sub) for key, sub in spec.items()}


DEFAULTS: Mapping[str, Any] = _default_of(_SCHEMA)


def defaults() -> dict[str, Any]:
    """A fresh deep copy of the default settings document."""
    return dict(_default_of(_SCHEMA))


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _merge(
    schema: _Schema,
    base: Mapping[str, Any],
    body: Mapping[Any, Any],
    path: str,
    errors: list[dict[str, str]],
) -> dict[str, Any]:
    """Validate ``body`` against ``schema`` and merge it into ``base``; null means default."""
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        where = _join(path, key)
        value = body.get(key, _MISSING)
        if value is _MISSING:
            out[key] = copy.deepcopy(base[key]) if key in base else _default_of(spec)
        elif value is None:
            out[key] = _default_of(spec)
        elif isinstance(spec, _Field):
            problem = spec.check(value)
            if problem is None:
                out[key] = copy.deepcopy(value)
            else:
                errors.append({"field": where, "error": problem})
        elif isinstance(value, Mapping):
            out[key] = _merge(spec, base.get(key, {}), value, where, errors)
        else:
            errors.append({"field": where, "error": "Must be an object"})
    for key in body:
        if key not in schema:
            errors.append({"field": _join(path, key), "error": "Unknown field"})
    return out


def _apply(base: Mapping[str, Any], body: object) -> dict[str, Any]:
    errors: list[dict[str, str]] = []
    if not isinstance(body, Mapping):
        errors.append({"field": "settings", "error": "Must be an object"})
        result: dict[str, Any] = {}
    else:
        result = _merge(_SCHEMA, base, body, "", errors)
    if errors:
        spaces = {detail["field"].split(".")[0] for detail in errors}
        space = spaces.pop() if len(spaces) == 1 else ""
        message = f"Invalid {space} settings" if space in _SCHEMA else "Invalid settings"
        raise SettingsError(message, errors)
    return result


def replace(body: object) -> dict[str, Any]:
    """PUT: validate ``body`` and return the full document; omitted or null fields default."""
    return _apply({}, body)


def patch(current: Mapping[str, Any], body: object) -> dict[str, Any]:
    """PATCH: merge ``body`` into ``current`` (RFC 7396; null resets to default); pure."""
    return _apply(current, body)


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
