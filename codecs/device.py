"""Device-facing messages: heartbeats in, command batches and settings updates out.

Device payloads tolerate unknown fields (devices are upgraded slowly). Decoders are built
once at import and reused for every message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

MAX_HEARTBEAT_BYTES = 64 * 1024
MAX_ACKS = 64

# Integers and strings are bounded by what PostgreSQL can hold (bigint; text has no NUL):
# a value the database would refuse must be rejected here, not fail a whole batch later.
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, msgspec.Meta(pattern=_NO_NUL)]
AckStatus = Literal["succeeded", "failed", "rejected"]


class RecordingState(msgspec.Struct, omit_defaults=True, gc=False):
    device_state: Text | None = None
    pending_recordings: NonNegInt | None = None
    flags: NonNegInt | None = None
    connection_type: list[Text] | None = None


class Ack(msgspec.Struct, gc=False):
    id: Annotated[str, msgspec.Meta(max_length=64, pattern=_NO_NUL)]
    status: AckStatus
    detail: Annotated[str, msgspec.Meta(max_length=1024, pattern=_NO_NUL)] | None = None


class Heartbeat(msgspec.Struct, gc=False):
    """A device's health report. Every field is optional; null means absent.

    Decoded by the thousand a second and never part of a reference cycle, so the garbage
    collector does not track them (``gc=False``)."""

    ts: NonNegInt | None = None
    firmware_version: Annotated[str, msgspec.Meta(max_length=64, pattern=_NO_NUL)] | None = None
    battery_percent: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    storage_used_mb: NonNegInt | None = None
    storage_total_mb: NonNegInt | None = None
    signal_strength_dbm: Annotated[int, msgspec.Meta(ge=-150, le=0)] | None = None
    recording_state: RecordingState | None = None
    settings_version: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    acks: Annotated[list[Ack], msgspec.Meta(max_length=MAX_ACKS)] | None = None


class Command(msgspec.Struct):
    """One command as devices receive it (the gateway's SQL builds this JSON for speed;
    a test decodes that output with this Struct)."""

    id: str
    type: str
    params: dict[str, Any]
    created_at: str
    expires_at: str


class CommandBatch(msgspec.Struct):
    """``devices/{serial}/commands``: the device's open commands, oldest first."""

    commands: list[Command]


class SettingsPatch(msgspec.Struct):
    """``devices/{serial}/settings``: the merge patch from the version the device has."""

    version: int
    base_version: int
    patch: dict[str, Any]


class SettingsFull(msgspec.Struct):
    """``devices/{serial}/settings``: the whole document, when no patch can be made."""

    version: int
    base_version: None
    settings: dict[str, Any]


class DecodeError(ValueError):
    """A device payload that cannot become a Heartbeat; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_json_heartbeat = msgspec.json.Decoder(Heartbeat)
_msgpack_heartbeat = msgspec.msgpack.Decoder(Heartbeat)
# Schema-less decoders, used only to tell a malformed payload from a mistyped one.
_json_any = msgspec.json.Decoder()
_msgpack_any = msgspec.msgpack.Decoder()
_json_encoder = msgspec.json.Encoder()

JSON = "application/json"
MSGPACK = "application/msgpack"
_WHITESPACE = b" \t\r\n"


def sniff_format(payload: bytes, content_type: str | None = None) -> str:
    """JSON or MessagePack: the MQTT 5 content type if given, else the first byte.

    A JSON heartbeat starts with ``{`` (after optional whitespace); a MessagePack map starts
    with a fixmap (0x80-0x8f), map16 (0xde) or map32 (0xdf) marker.
    """
    if content_type:
        if content_type.startswith(JSON):
            return JSON
        if content_type in (MSGPACK, "application/x-msgpack", "application/vnd.msgpack"):
            return MSGPACK
    first = payload.lstrip(_WHITESPACE)[:1]
    if first in (b"{", b"["):
        return JSON
    return MSGPACK


def decode_heartbeat(payload: bytes, content_type: str | None = None) -> Heartbeat:
    """Decode one heartbeat, or raise DecodeError with a bounded ``reason``."""
    if len(payload) > MAX_HEARTBEAT_BYTES:
        raise DecodeError("too_large", f"payload of {len(payload)} bytes exceeds 64 KiB")
    fmt = sniff_format(payload, content_type)
    try:
        if fmt == JSON:
            return _json_heartbeat.decode(payload)
        return _msgpack_heartbeat.decode(payload)
    except msgspec.ValidationError as exc:
        reason = "invalid" if _well_formed(payload, fmt) else "malformed"
        raise DecodeError(reason, _explain(payload, fmt, str(exc))) from exc
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        # msgspec bounds its recursion: `[[[[...` 100,000 deep ends here, not in a crash.
        # Invalid UTF-8 in a string surfaces as UnicodeDecodeError.
        raise DecodeError("malformed", str(exc)) from exc


_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


def _explain(payload: bytes, fmt: str, error: str) -> str:
    """msgspec's error, unless the payload is no object at all: then say what it is."""
    first = payload.lstrip(_WHITESPACE)[:1]
    if fmt == MSGPACK and (not first or first[0] not in _MAP_MARKERS):
        return "not a heartbeat: neither a JSON object nor a MessagePack map"
    if fmt == JSON and first == b"[":
        return "not a heartbeat: a JSON array, not an object"
    return error


def _well_formed(payload: bytes, fmt: str) -> bool:
    """True when ``payload`` parses without a schema.

    msgspec checks types while it parses, so a type error can be reported before the
    parser reaches bytes that are not JSON or MessagePack at all (`[[[[...`, a truncated
    object): only rejected payloads pay for this second parse.
    """
    try:
        (_json_any if fmt == JSON else _msgpack_any).decode(payload)
    except msgspec.ValidationError:
        return True  # parsed, but e.g. a number beyond a double
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return False
    return True


def encode(message: msgspec.Struct) -> bytes:
    return _json_encoder.encode(message)
