"""Tests for the device settings document (gateway_codecs.settings)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from gateway_codecs.settings import (
    DEFAULTS,
    SettingsError,
    defaults,
    merge_patch_apply,
    merge_patch_diff,
    patch,
    replace,
)
from hypothesis import given, settings
from hypothesis import strategies as st

EXPECTED_DEFAULTS: dict[str, Any] = {
    "connection": {
        "enabled_connections": {"wifi": True, "cellular": True},
        "upload_network_preference": ["wifi", "ble", "cellular"],
        "power_management": {
            "wifi_idle_timeout_seconds": 180,
            "cellular_idle_timeout_seconds": 180,
        },
    },
    "upload": {
        "mode": "auto",
        "streaming_enabled": True,
        "upload_delay_minutes": 5,
        "daily_data_limit_mb": 500,
        "allow_roaming": False,
        "pause_on_low_battery": True,
        "off_peak_hours": {
            "enabled": False,
            "start": "00:00",
            "end": "06:00",
            "timezone": "UTC",
        },
    },
    "audio": {"codec": "opus", "sample_rate_khz": 16, "bitrate_kbps": 32},
    "power": {"auto_sleep_minutes": 30, "low_battery_threshold_percent": 20},
}

MODES = ["ble_only", "auto", "wifi_preferred", "4g_preferred", "wifi_only", "4g_only"]
MODE_ERROR = "Invalid mode. Must be one of: " + ", ".join(MODES)
CODEC_ERROR = "Invalid codec. Must be one of: opus, aac, pcm"
RATE_ERROR = "Must be one of: 8, 16, 24, 32, 48"
NETWORKS = ("wifi", "ble", "cellular")
PREFERENCE_ERROR = "Must list 1 to 3 distinct values of: wifi, ble, cellular"

BOOL_FIELDS = [
    "connection.enabled_connections.wifi",
    "connection.enabled_connections.cellular",
    "upload.streaming_enabled",
    "upload.allow_roaming",
    "upload.pause_on_low_battery",
    "upload.off_peak_hours.enabled",
]

# (path, low, high, unit suffix of the range error)
INT_FIELDS = [
    ("connection.power_management.wifi_idle_timeout_seconds", 0, 86400, " seconds"),
    ("connection.power_management.cellular_idle_timeout_seconds", 0, 86400, " seconds"),
    ("upload.upload_delay_minutes", 0, 1440, " minutes"),
    ("upload.daily_data_limit_mb", 0, 10000, " MB"),
    ("audio.bitrate_kbps", 6, 510, " kbps"),
    ("power.auto_sleep_minutes", 0, 1440, " minutes"),
    ("power.low_battery_threshold_percent", 0, 100, " percent"),
]

# (path, a valid value, a value of the wrong type, its error, a bad value, its error)
OTHER_FIELDS = [
    ("upload.mode", "wifi_only", 3, "Must be a string", "5g_only", MODE_ERROR),
    ("audio.codec", "pcm", True, "Must be a string", "mp3", CODEC_ERROR),
    ("audio.sample_rate_khz", 48, "16", "Must be an integer", 44, RATE_ERROR),
    ("audio.sample_rate_khz", 8, 16.0, "Must be an integer", 0, RATE_ERROR),
    ("audio.sample_rate_khz", 24, True, "Must be an integer", 44, RATE_ERROR),
    (
        "upload.off_peak_hours.start",
        "23:59",
        2300,
        "Must be a string",
        "24:00",
        "Must be a time as HH:MM",
    ),
    ("upload.off_peak_hours.end", "00:00", None, None, "7:00", "Must be a time as HH:MM"),
    (
        "upload.off_peak_hours.timezone",
        "Europe/Berlin",
        1,
        "Must be a string",
        "Not/AZone",
        "Must be an IANA time zone name",
    ),
    (
        "connection.upload_network_preference",
        ["ble"],
        "wifi",
        PREFERENCE_ERROR,
        [],
        PREFERENCE_ERROR,
    ),
]


def body_for(path: str, value: Any) -> dict[str, Any]:
    """A nested body that sets the dotted ``path`` to ``value``."""
    *parents, leaf = path.split(".")
    body: dict[str, Any] = {leaf: value}
    for key in reversed(parents):
        body = {key: body}
    return body


def get_path(doc: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        doc = doc[key]
    return doc


def expect_error(body: object, *details: tuple[str, str]) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        replace(body)
    got = [(d["field"], d["error"]) for d in caught.value.details]
    assert sorted(got) == sorted(details)
    return caught.value


def canonical(value: Any) -> str:
    """Type-aware JSON equality: ``true`` and ``1`` differ."""
    return json.dumps(value, sort_keys=True)


# --- defaults -------------------------------------------------------------------------------


def test_defaults_match_spec() -> None:
    assert defaults() == EXPECTED_DEFAULTS
    assert dict(DEFAULTS) == EXPECTED_DEFAULTS
    assert canonical(defaults()) == canonical(EXPECTED_DEFAULTS)


def test_defaults_is_a_fresh_deep_copy() -> None:
    first = defaults()
    first["connection"]["upload_network_preference"].append("x")
    first["upload"]["off_peak_hours"]["start"] = "01:00"
    assert defaults() == EXPECTED_DEFAULTS
    assert replace({}) == EXPECTED_DEFAULTS


# --- replace (PUT) --------------------------------------------------------------------------


def test_replace_empty_body_gives_defaults() -> None:
    assert replace({}) == EXPECTED_DEFAULTS


def test_replace_fills_omitted_namespaces_and_fields() -> None:
    doc = replace({"audio": {"codec": "aac"}, "upload": {"off_peak_hours": {"enabled": True}}})
    expected = copy.deepcopy(EXPECTED_DEFAULTS)
    expected["audio"]["codec"] = "aac"
    expected["upload"]["off_peak_hours"]["enabled"] = True
    assert doc == expected


def test_replace_null_takes_default() -> None:
    body = {"upload": None, "audio": {"codec": None, "bitrate_kbps": 64}}
    doc = replace(body)
    expected = copy.deepcopy(EXPECTED_DEFAULTS)
    expected["audio"]["bitrate_kbps"] = 64
    assert doc == expected


def test_replace_full_document_round_trips() -> None:
    doc = copy.deepcopy(EXPECTED_DEFAULTS)
    doc["connection"]["upload_network_preference"] = ["cellular", "wifi"]
    doc["upload"]["mode"] = "4g_only"
    doc["power"]["low_battery_threshold_percent"] = 100
    assert replace(doc) == doc


def test_replace_does_not_alias_body() -> None:
    body = {"connection": {"upload_network_preference": ["ble"]}}
    doc = replace(body)
    body["connection"]["upload_network_preference"].append("wifi")
    assert doc["connection"]["upload_network_preference"] == ["ble"]


@pytest.mark.parametrize("path", BOOL_FIELDS)
@pytest.mark.parametrize("bad", [1, 0, "true", 1.0, [], {}])
def test_bool_field_type_error(path: str, bad: Any) -> None:
    namespace = path.split(".")[0]
    err = expect_error(body_for(path, bad), (path, "Must be a boolean"))
    assert err.message == f"Invalid {namespace} settings"


@pytest.mark.parametrize("path", BOOL_FIELDS)
@pytest.mark.parametrize("good", [True, False])
def test_bool_field_accepts_bools(path: str, good: bool) -> None:
    assert get_path(replace(body_for(path, good)), path) is good


@pytest.mark.parametrize(("path", "low", "high", "unit"), INT_FIELDS)
@pytest.mark.parametrize("bad", [True, False, 5.0, "5", [5], {"v": 5}])
def test_int_field_type_error(path: str, low: int, high: int, unit: str, bad: Any) -> None:
    expect_error(body_for(path, bad), (path, "Must be an integer"))


@pytest.mark.parametrize(("path", "low", "high", "unit"), INT_FIELDS)
def test_int_field_range(path: str, low: int, high: int, unit: str) -> None:
    message = f"Must be between {low} and {high}{unit}"
    expect_error(body_for(path, low - 1), (path, message))
    expect_error(body_for(path, high + 1), (path, message))
    expect_error(body_for(path, 10**30), (path, message))
    for good in (low, high, (low + high) // 2):
        value = get_path(replace(body_for(path, good)), path)
        assert value == good
        assert type(value) is int


@pytest.mark.parametrize(
    ("path", "good", "wrong_type", "type_error", "bad", "bad_error"), OTHER_FIELDS
)
def test_other_fields(
    path: str, good: Any, wrong_type: Any, type_error: str | None, bad: Any, bad_error: str
) -> None:
    assert get_path(replace(body_for(path, good)), path) == good
    if type_error is not None:
        expect_error(body_for(path, wrong_type), (path, type_error))
    expect_error(body_for(path, bad), (path, bad_error))


def test_every_enum_value_accepted() -> None:
    for mode in MODES:
        assert replace({"upload": {"mode": mode}})["upload"]["mode"] == mode
    for codec in ("opus", "aac", "pcm"):
        assert replace({"audio": {"codec": codec}})["audio"]["codec"] == codec
    for rate in (8, 16, 24, 32, 48):
        assert replace({"audio": {"sample_rate_khz": rate}})["audio"]["sample_rate_khz"] == rate
    expect_error({"upload": {"mode": "AUTO"}}, ("upload.mode", MODE_ERROR))


# --- times and zones --------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["00:00", "23:59", "12:30", "09:05", "19:00", "20:59"])
def test_hhmm_accepted(good: str) -> None:
    doc = replace({"upload": {"off_peak_hours": {"start": good, "end": good}}})
    assert doc["upload"]["off_peak_hours"]["start"] == good


@pytest.mark.parametrize(
    "bad",
    [
        "24:00",
        "7:00",
        "07:0",
        "07:60",
        "25:00",
        "0700",
        "07:00:00",
        " 07:00",
        "07:00\n",
        "",
        "aa:bb",
        "07-00",
        "\uff10\uff17:00",
        "\u0667\u0667:00",
        "-1:00",
    ],
)
def test_hhmm_rejected(bad: str) -> None:
    field = "upload.off_peak_hours.start"
    expect_error(body_for(field, bad), (field, "Must be a time as HH:MM"))


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"])
def test_time_zone_accepted(zone: str) -> None:
    assert (
        replace(body_for("upload.off_peak_hours.timezone", zone))["upload"]["off_peak_hours"][
            "timezone"
        ]
        == zone
    )


@pytest.mark.parametrize(
    "zone",
    [
        "Not/AZone",
        "../etc/passwd",
        "/etc/localtime",
        "localtime",
        "posixrules",
        "",
        "europe/berlin",
        "Europe/Berlin/",
        "Europe/../Europe/Berlin",
        "Europe\\Berlin",
    ],
)
def test_time_zone_rejected(zone: str) -> None:
    field = "upload.off_peak_hours.timezone"
    expect_error(body_for(field, zone), (field, "Must be an IANA time zone name"))


# --- upload_network_preference ----------------------------------------------------------------


@pytest.mark.parametrize(
    "good", [["wifi"], ["cellular", "ble"], ["ble", "cellular", "wifi"], list(NETWORKS)]
)
def test_preference_accepted(good: list[str]) -> None:
    doc = replace({"connection": {"upload_network_preference": good}})
    assert doc["connection"]["upload_network_preference"] == good


@pytest.mark.parametrize(
    "bad",
    [
        [],
        ["wifi", "wifi"],
        ["wifi", "ble", "wifi"],
        ["wifi", "ble", "cellular", "wifi"],
        ["wifi", "ble", "cellular", "lora"],
        ["lte"],
        ["WIFI"],
        [1],
        [["wifi"]],
        [{"wifi": 1}],
        [None],
        "wifi",
        {"wifi": 1},
        1,
        True,
    ],
)
def test_preference_rejected(bad: Any) -> None:
    field = "connection.upload_network_preference"
    expect_error(body_for(field, bad), (field, PREFERENCE_ERROR))


# --- unknown fields and structure -----------------------------------------------------------


def test_unknown_top_level_field() -> None:
    err = expect_error({"uplaod": {"mode": "auto"}}, ("uplaod", "Unknown field"))
    assert err.message == "Invalid settings"


def test_unknown_field_in_namespace() -> None:
    err = expect_error({"upload": {"mdoe": "auto"}}, ("upload.mdoe", "Unknown field"))
    assert err.message == "Invalid upload settings"


def test_unknown_nested_fields() -> None:
    err = expect_error(
        {
            "upload": {"off_peak_hours": {"enabled": True, "stat": "01:00"}},
            "connection": {"enabled_connections": {"ble": True}},
        },
        ("upload.off_peak_hours.stat", "Unknown field"),
        ("connection.enabled_connections.ble", "Unknown field"),
    )
    assert err.message == "Invalid settings"


@pytest.mark.parametrize(
    "path",
    [
        "connection",
        "upload",
        "audio",
        "power",
        "connection.enabled_connections",
        "connection.power_management",
        "upload.off_peak_hours",
    ],
)
@pytest.mark.parametrize("bad", [True, 1, "x", ["a"], []])
def test_object_given_as_non_object(path: str, bad: Any) -> None:
    err = expect_error(body_for(path, bad), (path, "Must be an object"))
    assert err.message == f"Invalid {path.split('.')[0]} settings"


@pytest.mark.parametrize("body", [None, [], "settings", 3, True, [{"upload": {}}]])
def test_body_not_an_object(body: object) -> None:
    err = expect_error(body, ("settings", "Must be an object"))
    assert err.message == "Invalid settings"
    with pytest.raises(SettingsError):
        patch(defaults(), body)


def test_all_bad_fields_listed_in_one_namespace() -> None:
    err = expect_error(
        {
            "upload": {
                "mode": "turbo",
                "daily_data_limit_mb": 10001,
                "upload_delay_minutes": True,
                "off_peak_hours": {"start": "24:00", "timezone": "Mars/Base", "extra": 1},
                "streaming_enabled": "yes",
            }
        },
        ("upload.mode", MODE_ERROR),
        ("upload.daily_data_limit_mb", "Must be between 0 and 10000 MB"),
        ("upload.upload_delay_minutes", "Must be an integer"),
        ("upload.off_peak_hours.start", "Must be a time as HH:MM"),
        ("upload.off_peak_hours.timezone", "Must be an IANA time zone name"),
        ("upload.off_peak_hours.extra", "Unknown field"),
        ("upload.streaming_enabled", "Must be a boolean"),
    )
    assert err.message == "Invalid upload settings"
    assert str(err) == "Invalid upload settings"
    assert isinstance(err, ValueError)


def test_all_bad_fields_listed_across_namespaces() -> None:
    err = expect_error(
        {
            "audio": {"bitrate_kbps": 5, "sample_rate_khz": 44.1},
            "power": {"low_battery_threshold_percent": 101},
            "connection": {"upload_network_preference": ["wifi", "wifi"]},
        },
        ("audio.bitrate_kbps", "Must be between 6 and 510 kbps"),
        ("audio.sample_rate_khz", "Must be an integer"),
        ("power.low_battery_threshold_percent", "Must be between 0 and 100 percent"),
        ("connection.upload_network_preference", PREFERENCE_ERROR),
    )
    assert err.message == "Invalid settings"


def test_details_are_string_dicts() -> None:
    with pytest.raises(SettingsError) as caught:
        replace({"power": {"auto_sleep_minutes": -1, 7: 1}})
    for detail in caught.value.details:
        assert set(detail) == {"field", "error"}
        assert all(isinstance(v, str) for v in detail.values())
    assert {"field": "power.auto_sleep_minutes", "error": "Must be between 0 and 1440 minutes"} in (
        caught.value.details
    )


# --- bool vs int strictness -------------------------------------------------------------------


def test_bool_is_not_int_and_int_is_not_bool() -> None:
    expect_error(
        {"power": {"auto_sleep_minutes": True}}, ("power.auto_sleep_minutes", "Must be an integer")
    )
    expect_error({"upload": {"allow_roaming": 0}}, ("upload.allow_roaming", "Must be a boolean"))
    expect_error(
        {"audio": {"sample_rate_khz": True}}, ("audio.sample_rate_khz", "Must be an integer")
    )
    expect_error({"audio": {"bitrate_kbps": 32.0}}, ("audio.bitrate_kbps", "Must be an integer"))
    doc = replace({"upload": {"allow_roaming": True}, "power": {"auto_sleep_minutes": 1}})
    assert doc["upload"]["allow_roaming"] is True
    assert type(doc["power"]["auto_sleep_minutes"]) is int


# --- patch (PATCH) ----------------------------------------------------------------------------


def test_patch_merges_fields() -> None:
    current = replace({"audio": {"codec": "aac"}, "power": {"auto_sleep_minutes": 10}})
    new = patch(
        current, {"audio": {"bitrate_kbps": 64}, "upload": {"off_peak_hours": {"enabled": True}}}
    )
    assert new["audio"] == {"codec": "aac", "sample_rate_khz": 16, "bitrate_kbps": 64}
    assert new["power"]["auto_sleep_minutes"] == 10
    assert new["upload"]["off_peak_hours"] == {
        "enabled": True,
        "start": "00:00",
        "end": "06:00",
        "timezone": "UTC",
    }


def test_patch_empty_body_is_identity() -> None:
    current = replace({"upload": {"mode": "ble_only"}})
    assert patch(current, {}) == current


def test_patch_replaces_lists_whole() -> None:
    current = defaults()
    new = patch(current, {"connection": {"upload_network_preference": ["ble"]}})
    assert new["connection"]["upload_network_preference"] == ["ble"]


def test_patch_null_resets_field_to_default() -> None:
    current = replace({"audio": {"codec": "pcm", "bitrate_kbps": 128}})
    new = patch(current, {"audio": {"codec": None}})
    assert new["audio"] == {"codec": "opus", "sample_rate_khz": 16, "bitrate_kbps": 128}


def test_patch_null_resets_whole_namespace_and_sub_object() -> None:
    current = replace(
        {
            "upload": {"mode": "wifi_only", "off_peak_hours": {"enabled": True, "end": "08:00"}},
            "power": {"auto_sleep_minutes": 1, "low_battery_threshold_percent": 5},
        }
    )
    new = patch(current, {"power": None, "upload": {"off_peak_hours": None}})
    assert new["power"] == EXPECTED_DEFAULTS["power"]
    assert new["upload"]["off_peak_hours"] == EXPECTED_DEFAULTS["upload"]["off_peak_hours"]
    assert new["upload"]["mode"] == "wifi_only"


def test_patch_does_not_mutate_or_alias_current() -> None:
    current = replace({"connection": {"upload_network_preference": ["ble", "wifi"]}})
    snapshot = copy.deepcopy(current)
    new = patch(current, {"connection": {"enabled_connections": {"wifi": False}}, "audio": None})
    assert current == snapshot
    new["connection"]["upload_network_preference"].append("cellular")
    new["upload"]["off_peak_hours"]["enabled"] = True
    assert current == snapshot


def test_patch_errors_leave_nothing_changed() -> None:
    current = replace({"upload": {"mode": "auto", "daily_data_limit_mb": 100}})
    snapshot = copy.deepcopy(current)
    with pytest.raises(SettingsError) as caught:
        patch(current, {"upload": {"mode": "wifi_only", "daily_data_limit_mb": -5}})
    assert caught.value.details == [
        {"field": "upload.daily_data_limit_mb", "error": "Must be between 0 and 10000 MB"}
    ]
    assert caught.value.message == "Invalid upload settings"
    assert current == snapshot


def test_patch_collects_all_errors() -> None:
    with pytest.raises(SettingsError) as caught:
        patch(defaults(), {"audio": {"codec": 1, "foo": 2}, "power": {"auto_sleep_minutes": 2.5}})
    fields = sorted(d["field"] for d in caught.value.details)
    assert fields == ["audio.codec", "audio.foo", "power.auto_sleep_minutes"]
    assert caught.value.message == "Invalid settings"


# --- merge_patch_apply / merge_patch_diff examples ------------------------------------------


def test_merge_patch_apply_rfc7396_examples() -> None:
    cases: list[tuple[Any, Any, Any]] = [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ]
    for target, merge, expected in cases:
        before = copy.deepcopy((target, merge))
        assert merge_patch_apply(target, merge) == expected
        assert (target, merge) == before


def test_merge_patch_apply_result_does_not_alias_inputs() -> None:
    target = {"a": {"b": [1]}, "c": [2]}
    result = merge_patch_apply(target, {"d": {"e": [3]}})
    result["a"]["b"].append(9)
    result["c"].append(9)
    assert target == {"a": {"b": [1]}, "c": [2]}


def test_merge_patch_diff_examples() -> None:
    assert merge_patch_diff({"a": 1}, {"a": 1}) == {}
    assert merge_patch_diff({"a": 1, "b": 2}, {"a": 1}) == {"b": None}
    assert merge_patch_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == {"a": {"c": 3}}
    assert merge_patch_diff({"a": [1, 2]}, {"a": [1, 3]}) == {"a": [1, 3]}
    assert merge_patch_diff({"a": {"b": 1}}, {"a": 5}) == {"a": 5}
    assert merge_patch_diff({"a": 5}, {"a": {"b": 1}}) == {"a": {"b": 1}}
    assert merge_patch_diff({"a": {"b": 1}}, {"a": {}}) == {"a": {"b": None}}


def test_merge_patch_diff_is_type_aware() -> None:
    assert canonical(merge_patch_diff({"a": 1}, {"a": True})) == canonical({"a": True})
    assert canonical(merge_patch_diff({"a": True}, {"a": 1})) == canonical({"a": 1})
    assert canonical(merge_patch_diff({"a": 0}, {"a": False})) == canonical({"a": False})
    assert canonical(merge_patch_diff({"a": [1]}, {"a": [True]})) == canonical({"a": [True]})
    assert merge_patch_diff({"a": {"b": False}}, {"a": {"b": 0}}) == {"a": {"b": 0}}
    assert merge_patch_diff({"a": [True, 1]}, {"a": [True, 1]}) == {}


def test_diff_of_settings_documents() -> None:
    old = defaults()
    new = patch(old, {"upload": {"off_peak_hours": {"enabled": True}}, "audio": {"codec": "aac"}})
    assert merge_patch_diff(old, new) == {
        "upload": {"off_peak_hours": {"enabled": True}},
        "audio": {"codec": "aac"},
    }


# --- property tests ---------------------------------------------------------------------------

times = st.builds("{:02d}:{:02d}".format, st.integers(0, 23), st.integers(0, 59))
zones = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Etc/GMT+5"])

documents = st.fixed_dictionaries(
    {
        "connection": st.fixed_dictionaries(
            {
                "enabled_connections": st.fixed_dictionaries(
                    {"wifi": st.booleans(), "cellular": st.booleans()}
                ),
                "upload_network_preference": st.lists(
                    st.sampled_from(["wifi", "ble", "cellular"]),
                    min_size=1,
                    max_size=3,
                    unique=True,
                ),
                "power_management": st.fixed_dictionaries(
                    {
                        "wifi_idle_timeout_seconds": st.integers(0, 86400),
                        "cellular_idle_timeout_seconds": st.integers(0, 86400),
                    }
                ),
            }
        ),
        "upload": st.fixed_dictionaries(
            {
                "mode": st.sampled_from(MODES),
                "streaming_enabled": st.booleans(),
                "upload_delay_minutes": st.integers(0, 1440),
                "daily_data_limit_mb": st.integers(0, 10000),
                "allow_roaming": st.booleans(),
                "pause_on_low_battery": st.booleans(),
                "off_peak_hours": st.fixed_dictionaries(
                    {"enabled": st.booleans(), "start": times, "end": times, "timezone": zones}
                ),
            }
        ),
        "audio": st.fixed_dictionaries(
            {
                "codec": st.sampled_from(["opus", "aac", "pcm"]),
                "sample_rate_khz": st.sampled_from([8, 16, 24, 32, 48]),
                "bitrate_kbps": st.integers(6, 510),
            }
        ),
        "power": st.fixed_dictionaries(
            {
                "auto_sleep_minutes": st.integers(0, 1440),
                "low_battery_threshold_percent": st.integers(0, 100),
            }
        ),
    }
)

# Arbitrary JSON objects without null values (a merge patch cannot express a null value).
json_leaves = st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "a", "b"])
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abcd"), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.sampled_from("abcde"), json_values, max_size=5)


def retyped(value: Any) -> Any:
    """``value`` with bools and 0/1 swapped: equal in Python, different in JSON."""
    if isinstance(value, dict):
        return {key: retyped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [retyped(item) for item in value]
    if isinstance(value, bool):
        return int(value)
    if value in (0, 1) and isinstance(value, int):
        return bool(value)
    return value


@st.composite
def json_pairs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two JSON objects, the second often a near variant of the first."""
    a = draw(json_objects)
    b = draw(json_objects)
    for key, value in a.items():
        how = draw(st.sampled_from(["keep", "retype", "drop", "new"]))
        if how == "keep":
            b[key] = copy.deepcopy(value)
        elif how == "retype":
            b[key] = retyped(value)
        elif how == "drop":
            b.pop(key, None)
    return a, b


def assert_minimal(old: Any, diff: dict[str, Any], new: Any) -> None:
    """Every entry of ``diff`` is a real change from ``old`` towards ``new``."""
    for key, value in diff.items():
        if value is None:
            assert key in old
            assert key not in new
            continue
        assert key in new
        if key in old and isinstance(value, dict) and isinstance(old[key], dict):
            assert isinstance(new[key], dict)
            assert value  # a nested patch is never empty
            assert_minimal(old[key], value, new[key])
        else:
            assert key not in old or canonical(old[key]) != canonical(value)
            assert canonical(value) == canonical(new[key])


@settings(max_examples=200, deadline=None)
@given(documents)
def test_generated_documents_are_valid(doc: dict[str, Any]) -> None:
    assert replace(doc) == doc
    assert patch(defaults(), doc) == doc


@settings(max_examples=200, deadline=None)
@given(documents, documents)
def test_diff_then_apply_round_trips_documents(a: dict[str, Any], b: dict[str, Any]) -> None:
    snapshot = copy.deepcopy((a, b))
    diff = merge_patch_diff(a, b)
    assert canonical(merge_patch_apply(a, diff)) == canonical(b)
    assert_minimal(a, diff, b)
    assert (a, b) == snapshot


@settings(max_examples=200, deadline=None)
@given(documents, documents)
def test_patch_with_diff_gives_target_document(a: dict[str, Any], b: dict[str, Any]) -> None:
    snapshot = copy.deepcopy(a)
    assert canonical(patch(a, merge_patch_diff(a, b))) == canonical(b)
    assert a == snapshot


@settings(max_examples=200, deadline=None)
@given(documents)
def test_diff_of_equal_documents_is_empty(a: dict[str, Any]) -> None:
    assert merge_patch_diff(a, a) == {}
    assert merge_patch_diff(a, copy.deepcopy(a)) == {}
    assert patch(a, {}) == a


@settings(max_examples=200, deadline=None)
@given(json_pairs())
def test_diff_then_apply_round_trips_json(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, b = pair
    diff = merge_patch_diff(a, b)
    assert canonical(merge_patch_apply(a, diff)) == canonical(b)
    assert_minimal(a, diff, b)
    assert merge_patch_diff(b, b) == {}
