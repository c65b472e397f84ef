"""Pure tests of the heartbeat decoder (gateway_codecs.device); no broker, no database.

docs/protocol.md §2: a heartbeat is a JSON object or a MessagePack map, told apart by the MQTT 5
content type or the first byte; every field is optional, unknown fields are ignored, and a
payload that is too large, not JSON/MessagePack, or of wrong types or ranges is rejected
with a bounded reason.
"""

from __future__ import annotations

import math
import os
from typing import Any

import msgspec
import pytest
from gateway_codecs import device
from gateway_codecs.device import (
    MAX_HEARTBEAT_BYTES,
    Ack,
    DecodeError,
    Heartbeat,
    RecordingState,
    decode_heartbeat,
    sniff_format,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REASONS = {"too_large", "malformed", "invalid"}
INT64_MAX = 2**63 - 1
FUZZ_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FULL: dict[str, Any] = {
    "ts": 1_736_942_400_000,
    "firmware_version": "2.4.1",
    "battery_percent": 87,
    "storage_used_mb": 1024,
    "storage_total_mb": 32768,
    "signal_strength_dbm": -67,
    "recording_state": {
        "device_state": "recording",
        "pending_recordings": 3,
        "flags": 5,
        "connection_type": ["wifi", "ble"],
    },
    "settings_version": 4,
    "acks": [
        {"id": "cmd_abc", "status": "succeeded"},
        {"id": "cmd_def", "status": "failed", "detail": "disk full"},
        {"id": "cmd_ghi", "status": "rejected", "detail": ""},
    ],
}

EXPECTED_FULL = Heartbeat(
    ts=1_736_942_400_000,
    firmware_version="2.4.1",
    battery_percent=87,
    storage_used_mb=1024,
    storage_total_mb=32768,
    signal_strength_dbm=-67,
    recording_state=RecordingState(
        device_state="recording", pending_recordings=3, flags=5, connection_type=["wifi", "ble"]
    ),
    settings_version=4,
    acks=[
        Ack(id="cmd_abc", status="succeeded"),
        Ack(id="cmd_def", status="failed", detail="disk full"),
        Ack(id="cmd_ghi", status="rejected", detail=""),
    ],
)


def as_json(doc: Any) -> bytes:
    return msgspec.json.encode(doc)


def as_msgpack(doc: Any) -> bytes:
    return msgspec.msgpack.encode(doc)


ENCODERS = [pytest.param(as_json, id="json"), pytest.param(as_msgpack, id="msgpack")]


def without_nulls(value: Any) -> Any:
    """``value`` as builtins with null members dropped (absent and null read the same)."""
    value = msgspec.to_builtins(value)
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def reason_of(payload: bytes, content_type: str | None = None) -> str:
    with pytest.raises(DecodeError) as caught:
        decode_heartbeat(payload, content_type)
    assert caught.value.reason in REASONS
    return caught.value.reason


# --- formats ---------------------------------------------------------------------------


def test_json_and_msgpack_decode_to_the_same_struct() -> None:
    """The same document as JSON and as MessagePack decodes to one equal Heartbeat."""
    from_json = decode_heartbeat(as_json(FULL))
    from_msgpack = decode_heartbeat(as_msgpack(FULL))
    assert from_json == from_msgpack == EXPECTED_FULL


@pytest.mark.parametrize("encode", ENCODERS)
def test_empty_object_is_a_heartbeat_with_every_field_absent(encode: Any) -> None:
    """Every field is optional: ``{}`` is a heartbeat with all fields None."""
    assert decode_heartbeat(encode({})) == Heartbeat()


@pytest.mark.parametrize("encode", ENCODERS)
def test_null_fields_read_as_absent(encode: Any) -> None:
    """An explicit null is the same as leaving the field out."""
    doc = {name: None for name in FULL}
    assert decode_heartbeat(encode(doc)) == Heartbeat()


def test_first_byte_sniffing_without_content_type() -> None:
    """Without a content type, ``{`` (after whitespace) is JSON and a map marker MessagePack."""
    assert sniff_format(b' \r\n\t{"ts": 1}') == device.JSON
    assert sniff_format(as_msgpack({"ts": 1})) == device.MSGPACK  # fixmap 0x81
    big_map = as_msgpack({f"k{n}": n for n in range(20)})  # map16 0xde
    assert big_map[0] == 0xDE
    assert sniff_format(big_map) == device.MSGPACK
    assert decode_heartbeat(b' \r\n\t{"battery_percent": 5}').battery_percent == 5
    assert decode_heartbeat(big_map) == Heartbeat()


@pytest.mark.parametrize(
    "content_type", ["application/msgpack", "application/x-msgpack", "application/vnd.msgpack"]
)
def test_msgpack_content_type_decodes_msgpack(content_type: str) -> None:
    """A MessagePack content type selects the MessagePack decoder."""
    assert decode_heartbeat(as_msgpack(FULL), content_type) == EXPECTED_FULL


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_json_content_type_decodes_json(content_type: str) -> None:
    """A JSON content type (with or without parameters) selects the JSON decoder."""
    assert decode_heartbeat(as_json(FULL), content_type) == EXPECTED_FULL


def test_content_type_wins_over_the_first_byte() -> None:
    """The content type property decides the format even when the first byte says otherwise."""
    assert sniff_format(as_msgpack(FULL), device.JSON) == device.JSON
    assert sniff_format(as_json(FULL), device.MSGPACK) == device.MSGPACK
    # A MessagePack map labelled JSON is not JSON, and a JSON object labelled MessagePack
    # is not a MessagePack map: both are rejected rather than guessed at.
    assert reason_of(as_msgpack(FULL), "application/json") == "malformed"
    assert reason_of(as_json(FULL), "application/msgpack") in {"malformed", "invalid"}


def test_unknown_content_type_falls_back_to_sniffing() -> None:
    """A content type that names neither format is ignored in favour of the first byte."""
    assert decode_heartbeat(as_json(FULL), "text/plain") == EXPECTED_FULL
    assert decode_heartbeat(as_msgpack(FULL), "application/octet-stream") == EXPECTED_FULL


@pytest.mark.parametrize("encode", ENCODERS)
def test_unknown_fields_are_tolerated_at_every_level(encode: Any) -> None:
    """Unknown fields, top-level and nested, are ignored (devices are upgraded slowly)."""
    doc: dict[str, Any] = {
        **FULL,
        "new_sensor": {"temperature_c": 21.5, "history": [1, 2, [3, {"x": None}]]},
        "uptime_s": 12345,
        "recording_state": {**FULL["recording_state"], "codec": "opus", "extra": [1.5]},
        "acks": [{**ack, "received_at": 17} for ack in FULL["acks"]],
    }
    assert decode_heartbeat(encode(doc)) == EXPECTED_FULL


# --- ranges and types ------------------------------------------------------------------

ACCEPTED = [
    ("battery_percent", 0),
    ("battery_percent", 100),
    ("signal_strength_dbm", -150),
    ("signal_strength_dbm", 0),
    ("storage_used_mb", 0),
    ("storage_total_mb", INT64_MAX),
    ("ts", 0),
    ("settings_version", 0),
    ("settings_version", 2**31 - 1),
    ("firmware_version", "v" * 64),
    ("firmware_version", ""),
    ("recording_state", {"pending_recordings": 0, "flags": 0}),
    ("recording_state", {"connection_type": []}),
    ("acks", [{"id": f"cmd_{n}", "status": "succeeded"} for n in range(64)]),
    ("acks", []),
    ("acks", [{"id": "c" * 64, "status": "rejected", "detail": "d" * 1024}]),
]

REJECTED = [
    ("battery_percent", -1),
    ("battery_percent", 101),
    ("battery_percent", 50.0),
    ("battery_percent", True),
    ("battery_percent", "50"),
    ("signal_strength_dbm", -151),
    ("signal_strength_dbm", 1),
    ("storage_used_mb", -1),
    ("storage_total_mb", -1),
    ("storage_used_mb", INT64_MAX + 1),
    ("ts", -1),
    ("ts", 1.5),
    ("ts", INT64_MAX + 1),
    ("settings_version", -1),
    ("settings_version", 2**31),
    ("firmware_version", "v" * 65),
    ("firmware_version", 2),
    ("recording_state", {"pending_recordings": -1}),
    ("recording_state", {"flags": -1}),
    ("recording_state", {"device_state": 3}),
    ("recording_state", {"connection_type": "wifi"}),
    ("recording_state", {"connection_type": [1]}),
    ("recording_state", [1]),
    ("acks", [{"id": f"cmd_{n}", "status": "succeeded"} for n in range(65)]),
    ("acks", [{"id": "cmd_1", "status": "done"}]),
    ("acks", [{"id": "cmd_1", "status": "SUCCEEDED"}]),
    ("acks", [{"id": "cmd_1"}]),
    ("acks", [{"status": "failed"}]),
    ("acks", [{"id": "c" * 65, "status": "failed"}]),
    ("acks", [{"id": "cmd_1", "status": "failed", "detail": "d" * 1025}]),
    ("acks", [{"id": "cmd_1", "status": "failed", "detail": 7}]),
    ("acks", {"id": "cmd_1", "status": "failed"}),
]


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize(("field", "value"), ACCEPTED, ids=[f"{f}={v!s:.16}" for f, v in ACCEPTED])
def test_values_at_the_edges_of_each_range_are_accepted(field: str, value: Any,
                                                        encode: Any) -> None:
    """The boundary values of every constrained field decode."""
    heartbeat = decode_heartbeat(encode({field: value}))
    assert without_nulls(getattr(heartbeat, field)) == value


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize(("field", "value"), REJECTED, ids=[f"{f}={v!s:.16}" for f, v in REJECTED])
def test_values_outside_each_range_or_type_are_invalid(field: str, value: Any,
                                                      encode: Any) -> None:
    """A value of the wrong type or outside its range rejects the heartbeat as invalid."""
    assert reason_of(encode({**FULL, field: value})) == "invalid"


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize(
    "doc",
    [
        {"firmware_version": "2.4\x00.1"},
        {"recording_state": {"device_state": "rec\x00"}},
        {"recording_state": {"connection_type": ["wifi\x00"]}},
        {"acks": [{"id": "cmd_\x00", "status": "failed"}]},
        {"acks": [{"id": "cmd_1", "status": "failed", "detail": "\x00"}]},
    ],
    ids=["firmware", "device_state", "connection_type", "ack_id", "ack_detail"],
)
def test_nul_characters_in_stored_strings_are_invalid(doc: dict[str, Any], encode: Any) -> None:
    """A NUL character cannot be stored by PostgreSQL, so the decoder rejects it as invalid."""
    assert reason_of(encode(doc)) == "invalid"


@pytest.mark.parametrize("payload", [b"[]", b"null", b"3", b'"text"', b"true"])
def test_well_formed_json_that_is_not_an_object_is_invalid(payload: bytes) -> None:
    """JSON that parses but is not an object has the wrong type: invalid."""
    assert reason_of(payload, "application/json") == "invalid"


@pytest.mark.parametrize("doc", [[], None, 3, "text", [1, 2]])
def test_well_formed_msgpack_that_is_not_a_map_is_invalid(doc: Any) -> None:
    """MessagePack that parses but is not a map has the wrong type: invalid."""
    assert reason_of(as_msgpack(doc)) == "invalid"


# --- malformed input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b'{"ts": 1',
        b'{"ts": 1,}',
        b'{"ts": 1}}',
        b"{'ts': 1}",
        b'{"battery_percent": 500',  # truncated after an out-of-range value
        b"   ",
        b"\xff\xfe\x00",
        b"hello",
        as_json(FULL)[:-3],
        as_msgpack(FULL)[:-3],
        as_msgpack(FULL) + b"\x00",
    ],
)
def test_bytes_that_are_neither_json_nor_msgpack_are_malformed(payload: bytes) -> None:
    """Truncated, trailing or foreign bytes are rejected as malformed, not as invalid."""
    assert reason_of(payload) == "malformed"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"firmware_version": "\xff"}',
        b'{"recording_state": {"device_state": "\xc3\x28"}}',
        b'{"acks": [{"id": "cmd_1", "status": "failed", "detail": "\xe2\x82"}]}',
        b'{"firmware_version": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"firmware_version": "\\ud800"}',  # a lone escaped surrogate
    ],
)
def test_invalid_utf8_in_json_strings_is_malformed(payload: bytes) -> None:
    """Invalid UTF-8 (or a lone surrogate) in a JSON string is malformed, never a crash."""
    assert reason_of(payload) == "malformed"


@pytest.mark.parametrize("field", ["firmware_version", "recording_state", "acks"])
def test_invalid_utf8_in_msgpack_strings_is_malformed(field: str) -> None:
    """Invalid UTF-8 inside a MessagePack str is malformed, never a crash."""
    bad = b"\xa2\xc3\x28"  # fixstr of 2 bytes that are not UTF-8
    if field == "firmware_version":
        payload = b"\x81" + as_msgpack("firmware_version") + bad
    elif field == "recording_state":
        payload = (b"\x81" + as_msgpack("recording_state") + b"\x81"
                   + as_msgpack("device_state") + bad)
    else:
        payload = (b"\x81" + as_msgpack("acks") + b"\x91\x82" + as_msgpack("id") + bad
                   + as_msgpack("status") + as_msgpack("failed"))
    assert reason_of(payload) == "malformed"


def test_json_nan_and_infinity_literals_are_malformed() -> None:
    """``NaN`` and ``Infinity`` are not JSON."""
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        assert reason_of(b'{"battery_percent": ' + literal + b"}") == "malformed"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1.0e300])
def test_msgpack_floats_in_integer_fields_are_invalid(value: float) -> None:
    """A MessagePack float (NaN, infinities, huge) where an int belongs is invalid."""
    assert reason_of(as_msgpack({"battery_percent": value})) == "invalid"


@pytest.mark.parametrize(
    "literal", [b"1" + b"0" * 30, b"-" + b"9" * 40, b"1e400", b"18446744073709551616"]
)
def test_huge_json_numbers_are_invalid(literal: bytes) -> None:
    """Numbers beyond any field's range (or beyond a double) are invalid, not a crash."""
    for field in (b"ts", b"storage_used_mb", b"battery_percent", b"settings_version"):
        assert reason_of(b'{"' + field + b'": ' + literal + b"}") == "invalid"


def test_huge_msgpack_integers_are_invalid() -> None:
    """A uint64 beyond int64 in a MessagePack int field is invalid (PostgreSQL bigint)."""
    for field in ("ts", "storage_used_mb", "storage_total_mb"):
        assert reason_of(as_msgpack({field: 2**64 - 1})) == "invalid"


def test_recording_state_counters_beyond_int64_are_invalid() -> None:
    """Counters inside recording_state are bounded like the other integers."""
    assert reason_of(as_msgpack({"recording_state": {"flags": 2**64 - 1}})) == "invalid"
    assert reason_of(as_json({"recording_state": {"pending_recordings": 2**63}})) == "invalid"


# --- size and depth --------------------------------------------------------------------


def test_payload_of_exactly_64_kib_is_decoded() -> None:
    """The limit is inclusive: a 65,536-byte heartbeat is decoded."""
    head = b'{"battery_percent": 42, "padding": "'
    payload = head + b"x" * (MAX_HEARTBEAT_BYTES - len(head) - 2) + b'"}'
    assert len(payload) == MAX_HEARTBEAT_BYTES == 64 * 1024
    assert decode_heartbeat(payload).battery_percent == 42


class ExplodingDecoder:
    """Stands in for a module decoder to prove it is not reached."""

    def decode(self, payload: bytes) -> Any:
        raise AssertionError("the decoder ran")


@pytest.mark.parametrize("encode", ENCODERS)
def test_payload_over_64_kib_is_too_large_before_decoding(
    encode: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte over 64 KiB is rejected as too_large without running a decoder."""
    padding = "x" * MAX_HEARTBEAT_BYTES
    payload = encode({"battery_percent": 42, "padding": padding})
    assert len(payload) > MAX_HEARTBEAT_BYTES
    for name in dir(device):
        if isinstance(getattr(device, name), msgspec.json.Decoder | msgspec.msgpack.Decoder):
            monkeypatch.setattr(device, name, ExplodingDecoder())
    assert reason_of(payload) == "too_large"
    assert reason_of(b"{" + b" " * MAX_HEARTBEAT_BYTES + b"}") == "too_large"


@pytest.mark.parametrize("opener", [b"[", b"\x91"], ids=["json", "msgpack"])
def test_nesting_100000_deep_is_rejected_without_crashing(opener: bytes) -> None:
    """``[[[[...`` 100,000 deep (JSON or MessagePack) is rejected (too_large), no crash."""
    assert reason_of(opener * 100_000) == "too_large"
    assert reason_of(b"{" + b'"x":' + b"[" * 100_000) == "too_large"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"[" * 65_000, id="json-top-level"),
        pytest.param(b"[" * 32_000 + b"]" * 32_000, id="json-balanced"),
        pytest.param(b'{"x":' + b"[" * 65_000, id="json-unknown-field"),
        pytest.param(b'{"x":' + b"[" * 32_000 + b"]" * 32_000 + b"}", id="json-unknown-balanced"),
        pytest.param(b"\x91" * 65_000, id="msgpack-top-level"),
        pytest.param(b"\x81\xa1x" + b"\x91" * 65_000, id="msgpack-unknown-field"),
        pytest.param(b"\x81\xa1x" + b"\x91" * 65_000 + b"\x90", id="msgpack-unknown-balanced"),
    ],
)
def test_deep_nesting_within_the_size_limit_is_malformed(payload: bytes) -> None:
    """Nesting deeper than the decoder's recursion bound (but under 64 KiB) is malformed."""
    assert len(payload) <= MAX_HEARTBEAT_BYTES
    assert reason_of(payload) == "malformed"


def test_module_decoders_survive_deep_nesting_beyond_the_limit() -> None:
    """The prebuilt decoders themselves bound recursion: 100,000 deep raises, never crashes."""
    for decoder, payload in (
        (device._json_heartbeat, b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        (device._msgpack_heartbeat, b"\x81\xa1x" + b"\x91" * 100_000 + b"\x90"),
    ):
        with pytest.raises((msgspec.DecodeError, RecursionError)):
            decoder.decode(payload)


# --- decoder reuse ---------------------------------------------------------------------


def test_decoders_are_built_once_at_import() -> None:
    """The module holds one prebuilt Heartbeat decoder per format."""
    assert isinstance(device._json_heartbeat, msgspec.json.Decoder)
    assert isinstance(device._msgpack_heartbeat, msgspec.msgpack.Decoder)
    assert device._json_heartbeat.type is Heartbeat
    assert device._msgpack_heartbeat.type is Heartbeat


def test_decode_heartbeat_never_constructs_a_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding, accepted or rejected, reuses module decoders: constructing one would raise."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decode_heartbeat built a decoder per call")

    for module in (msgspec.json, msgspec.msgpack):
        monkeypatch.setattr(module, "Decoder", forbidden)
        monkeypatch.setattr(module, "decode", forbidden)
    assert decode_heartbeat(as_json(FULL)) == EXPECTED_FULL
    assert decode_heartbeat(as_msgpack(FULL)) == EXPECTED_FULL
    for payload in (b'{"battery_percent": 500}', b"{", b"[" * 1000, as_msgpack([1])):
        with pytest.raises(DecodeError):
            decode_heartbeat(payload)


# --- fuzzing ---------------------------------------------------------------------------


def check_outcome(payload: bytes, content_type: str | None = None) -> None:
    """Any input gives a Heartbeat that fits the database, or a DecodeError with a reason."""
    try:
        heartbeat = decode_heartbeat(payload, content_type)
    except DecodeError as exc:
        assert exc.reason in REASONS, exc.reason
        return
    assert isinstance(heartbeat, Heartbeat)
    assert len(payload) <= MAX_HEARTBEAT_BYTES
    for value in (heartbeat.ts, heartbeat.storage_used_mb, heartbeat.storage_total_mb):
        assert value is None or 0 <= value <= INT64_MAX
    strings = [heartbeat.firmware_version]
    if heartbeat.recording_state is not None:
        strings.append(heartbeat.recording_state.device_state)
        strings.extend(heartbeat.recording_state.connection_type or [])
        for value in (heartbeat.recording_state.pending_recordings,
                      heartbeat.recording_state.flags):
            assert value is None or 0 <= value <= INT64_MAX
    for ack in heartbeat.acks or []:
        strings.extend((ack.id, ack.detail))
    for text in strings:
        assert text is None or "\x00" not in text  # PostgreSQL text cannot hold NUL
        if text is not None:
            text.encode("utf-8")  # no lone surrogates
    # Whatever decoded re-encodes: the gateway stores recording_state as JSON.
    msgspec.json.encode(heartbeat)


# Values near the edges that matter: field ranges, int64/uint64, NUL, over-long strings.
edge_ints = st.sampled_from(
    [0, 1, -1, 100, 101, -150, -151, 2**31 - 1, 2**31, INT64_MAX, INT64_MAX + 1, 2**64 - 1,
     -(2**63)]
)
edge_texts = st.sampled_from(["", "\x00", "fw\x00", "x" * 64, "x" * 65, "\ud7ff\ue000"])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what MessagePack can encode
    | edge_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
    | edge_texts
)
json_documents = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=12,
)
# Heartbeat-shaped documents: every known field, each drawing from valid values, values at
# and past the edges, and values of other types.
odd_scalars = st.none() | st.booleans() | st.floats() | st.sampled_from(["", "7", "x" * 300])
near_ints = st.integers(-200, 200) | edge_ints | st.integers(-(2**63), 2**64 - 1) | odd_scalars
near_texts = st.text(max_size=12) | edge_texts | near_ints
small_documents = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3),
                               max_leaves=4)
anything = near_ints | near_texts | small_documents
acks = st.fixed_dictionaries(
    {},
    optional={
        "id": st.from_regex(r"cmd_[a-z0-9]{1,8}", fullmatch=True) | near_texts,
        "status": st.sampled_from(["succeeded", "failed", "rejected"]) | near_texts,
        "detail": near_texts,
        "other": anything,
    },
)
heartbeat_like = st.fixed_dictionaries(
    {},
    optional={
        **{name: near_ints for name in ("ts", "battery_percent", "storage_used_mb",
                                        "storage_total_mb", "signal_strength_dbm",
                                        "settings_version")},
        "firmware_version": near_texts,
        "recording_state": anything | st.fixed_dictionaries(
            {},
            optional={
                "device_state": near_texts,
                "pending_recordings": near_ints,
                "flags": near_ints,
                "connection_type": st.lists(near_texts, max_size=3) | anything,
                "other": anything,
            },
        ),
        "acks": st.lists(acks | anything, max_size=4) | anything,
        "other": anything,
    },
)
# Byte sequences that are not UTF-8 (stray continuation, truncated, surrogate, overlong).
bad_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"])
content_types = st.sampled_from(
    [None, "application/json", "application/msgpack", "text/plain", "application/x-msgpack"]
)


@FUZZ
@given(st.binary(max_size=512), content_types)
def test_fuzz_arbitrary_bytes_decode_or_fail_with_a_known_reason(payload: bytes,
                                                                 content_type: str | None) -> None:
    """Arbitrary bytes give a Heartbeat or a DecodeError with a known reason, nothing else."""
    check_outcome(payload, content_type)
    check_outcome(b"{" + payload, content_type)
    check_outcome(b"\x81" + payload, content_type)


@FUZZ
@given(json_documents | heartbeat_like)
def test_fuzz_documents_decode_or_fail_with_a_known_reason(doc: Any) -> None:
    """JSON/MessagePack documents (heartbeat-shaped or not) never raise another exception."""
    check_outcome(as_json(doc))
    check_outcome(as_msgpack(doc))
    check_outcome(as_json(doc), "application/msgpack")
    check_outcome(as_msgpack(doc), "application/json")


@FUZZ
@given(heartbeat_like, st.integers(0, 4096),
       bad_utf8 | st.binary(min_size=1, max_size=4))
def test_fuzz_corrupted_documents_decode_or_fail_with_a_known_reason(
    doc: Any, where: int, junk: bytes
) -> None:
    """A heartbeat-shaped document with bytes spliced in, overwritten or cut never raises
    another exception."""
    for encoded in (as_json(doc), as_msgpack(doc)):
        at = where % (len(encoded) + 1)
        check_outcome(encoded[:at] + junk + encoded[at:])
        check_outcome(encoded[:at] + junk + encoded[at + len(junk):])
        check_outcome(encoded[:at])
    # The same junk inside a string value of a known field.
    text = as_json({"firmware_version": "ab"})
    check_outcome(text.replace(b"ab", b"a" + junk + b"b"))
    packed = as_msgpack({"firmware_version": "ab"})
    check_outcome(packed[:-3] + bytes([0xA0 | (2 + len(junk))]) + b"a" + junk + b"b")


@settings(max_examples=min(FUZZ_EXAMPLES, 100), deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "ts": st.integers(0, INT64_MAX),
            "firmware_version": st.text(max_size=64).filter(lambda s: "\x00" not in s),
            "battery_percent": st.integers(0, 100),
            "storage_used_mb": st.integers(0, INT64_MAX),
            "storage_total_mb": st.integers(0, INT64_MAX),
            "signal_strength_dbm": st.integers(-150, 0),
            "settings_version": st.integers(0, 2**31 - 1),
            "acks": st.lists(
                st.fixed_dictionaries(
                    {"id": st.from_regex(r"cmd_[a-z0-9]{1,20}", fullmatch=True),
                     "status": st.sampled_from(["succeeded", "failed", "rejected"])},
                    optional={"detail": st.text(max_size=50).filter(lambda s: "\x00" not in s)},
                ),
                max_size=8,
            ),
        },
    )
)
def test_valid_heartbeats_round_trip_in_both_formats(doc: dict[str, Any]) -> None:
    """Every valid heartbeat decodes, to the same Struct from JSON and from MessagePack."""
    from_json = decode_heartbeat(as_json(doc))
    assert from_json == decode_heartbeat(as_msgpack(doc))
    assert without_nulls(from_json) == doc
