"""The device registry's request bodies, query strings and response objects.

One Struct per route body and per response object. Bodies forbid unknown fields (a typo
must not be dropped silently), except the Telemetron upsert, which ignores them like the
vendor API it follows. Constraints are ``msgspec.Meta``; ``rule`` is the wording of the
error a caller gets (see ``gateway_codecs.validation``). Query strings are strings, as in
HTTP, and unknown query parameters are ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from gateway_codecs.device import RecordingState
from gateway_codecs.settings import Settings
from gateway_codecs.validation import NUL_RULE, ErrorDetail, free_of_nul, rule
from msgspec import UNSET, UnsetType

SERIAL_PATTERN = r"^[A-Za-z0-9._:-]{1,128}(?!\n)$"
SERIAL_RULE = "Must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"
COMMAND_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,63}(?!\n)$"
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
MAX_TTL_SECONDS = 30 * 24 * 3600
MAX_OPEN_COMMANDS = 50
MAX_BATCH = 1000  # items of one POST /v1/devices/batch
COMMANDS_PER_MESSAGE = 16
COMMAND_STATUSES = ("pending", "delivered", "succeeded", "failed", "rejected", "expired",
                    "canceled")
_NO_NUL = r"^[^\x00]*$"
_MODEL_SUFFIX = re.compile(r"_v\d+$")


def _text(max_length: int) -> Any:
    return msgspec.Meta(min_length=1, max_length=max_length, pattern=_NO_NUL,
                        extra=rule(f"Must be 1 to {max_length} characters"))


Serial = Annotated[str, msgspec.Meta(pattern=SERIAL_PATTERN, extra=rule(SERIAL_RULE))]
Text64 = Annotated[str, _text(64)]
Text128 = Annotated[str, _text(128)]
Text255 = Annotated[str, _text(255)]
# A JSON object the caller owns (metadata, command params), stored as given.
JsonObject = Annotated[dict[str, Any], msgspec.Meta(extra=rule(NUL_RULE, free_of_nul))]
CommandType = Annotated[
    str, msgspec.Meta(pattern=COMMAND_TYPE_PATTERN,
                      extra=rule("Must match ^[a-z][a-z0-9_]{0,63}$"))
]
TtlSeconds = Annotated[
    int, msgspec.Meta(ge=1, le=MAX_TTL_SECONDS,
                      extra=rule(f"Must be between 1 and {MAX_TTL_SECONDS}"))
]
CommandStatus = Literal["pending", "delivered", "succeeded", "failed", "rejected", "expired",
                        "canceled"]


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A request body of a ``/v1`` route (encoded by clients without its defaults)."""


class Empty(Body):
    """The body of a route that takes none (``{}`` or absent)."""


class RegisterDevice(Body):
    """``POST /v1/devices``."""

    serial_number: Serial
    device_type: Text64 | None = None
    firmware_version: Text64 | None = None
    metadata: JsonObject | None = None


class RegisterBatch(Body):
    """``POST /v1/devices/batch``: each item a `RegisterDevice` body, checked one by one,
    so that one bad item fails alone."""

    devices: Annotated[
        list[dict[str, Any]],
        msgspec.Meta(min_length=1, max_length=MAX_BATCH,
                     extra=rule(f"Must be a list of 1 to {MAX_BATCH} objects")),
    ]


class PatchDevice(Body):
    """``PATCH /v1/devices/{id}``: a merge patch; null clears a field."""

    firmware_version: Text64 | UnsetType | None = UNSET
    metadata: JsonObject | UnsetType | None = UNSET


class BindDevice(Body):
    """``POST /v1/devices/{id}/bind``."""

    end_user_id: Text128


class CreateCommand(Body):
    """``POST /v1/devices/{id}/commands``."""

    type: CommandType
    params: JsonObject | None = None
    ttl_seconds: TtlSeconds = DEFAULT_TTL_SECONDS
    idempotency_key: Text255 | None = None


class TelemetronUpsert(msgspec.Struct, kw_only=True):
    """``POST /api/ext-v1/device``: unknown fields are ignored, as by the vendor's API."""

    identifier: Serial
    type: Text64 | None = None
    properties: JsonObject | None = None


# ---- query strings ------------------------------------------------------------------------

Limit = Annotated[
    str, msgspec.Meta(pattern=r"^0*(?:[1-9][0-9]?|100)$", max_length=3,
                      extra=rule("Must be an integer between 1 and 100"))
]
QueryText = Annotated[str, msgspec.Meta(pattern=_NO_NUL, extra=rule(NUL_RULE))]


# Presence: online while the last applied heartbeat is recent, unknown without any.
Connectivity = Literal["online", "offline", "unknown"]


class Query(msgspec.Struct, kw_only=True):
    """A query string; values are strings, unknown names are ignored."""

    limit: Limit = "20"
    starting_after: QueryText | None = None

    @property
    def page_size(self) -> int:
        return int(self.limit)


class DeviceQuery(Query):
    """``GET /v1/devices``."""

    status: Annotated[Literal["bound", "unbound"],
                      msgspec.Meta(extra=rule("Must be bound or unbound"))] | None = None
    end_user_id: QueryText | None = None
    serial_number: QueryText | None = None
    connectivity: Annotated[Connectivity, msgspec.Meta(
        extra=rule("Must be online, offline or unknown"))] | None = None


class CommandQuery(Query):
    """``GET /v1/devices/{id}/commands``."""

    status: Annotated[CommandStatus, msgspec.Meta(
        extra=rule("Must be one of: " + ", ".join(COMMAND_STATUSES)))] | None = None


# ---- responses ------------------------------------------------------------------------------

Timestamp = str  # ISO 8601 UTC to the millisecond, with a Z: 2025-01-15T12:00:00.000Z


class Device(msgspec.Struct, kw_only=True, tag_field="object", tag="device"):
    """The device object, returned by every device route (``"object": "device"``)."""

    id: str
    serial_number: str
    device_type: str | None
    model: str | None
    firmware_version: str | None
    status: Literal["bound", "unbound"]
    end_user_id: str | None
    bound_at: Timestamp | None
    battery_percent: int | None
    storage_used_mb: int | None
    storage_total_mb: int | None
    signal_strength_dbm: int | None
    last_heartbeat_at: Timestamp | None
    connectivity: Connectivity
    recording_state: RecordingState | None
    metadata: dict[str, Any] | None
    settings: Settings
    created_at: Timestamp
    updated_at: Timestamp


def model_of(device_type: str | None) -> str | None:
    """The model: the device type without a trailing ``_v<digits>`` (``bota_pin_v1``)."""
    return _MODEL_SUFFIX.sub("", device_type) if device_type else None


class DeletedDevice(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["device"] = "device"
    deleted: Literal[True] = True


class CommandResult(msgspec.Struct):
    """What the device said in its ack."""

    detail: str | None


class Command(msgspec.Struct, kw_only=True, tag_field="object", tag="command"):
    """The command object (``"object": "command"``)."""

    id: str
    device_id: str
    type: str
    params: dict[str, Any]
    status: CommandStatus
    attempts: int
    created_at: Timestamp
    delivered_at: Timestamp | None
    completed_at: Timestamp | None
    expires_at: Timestamp
    result: CommandResult | None


class DeviceSettings(msgspec.Struct, kw_only=True):
    """``GET`` (with ``applied_version``) and ``PUT``/``PATCH /v1/devices/{id}/settings``."""

    device_id: str
    settings: Settings
    version: int
    applied_version: int | UnsetType = UNSET
    updated_at: Timestamp


class DeviceList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Device]
    has_more: bool


class CommandList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Command]
    has_more: bool


class DeviceTopics(msgspec.Struct, kw_only=True):
    heartbeat: str
    commands: str
    settings: str


class DeviceCredentials(msgspec.Struct, kw_only=True):
    """``POST /v1/devices/{id}/credentials``: the password is in this reply only."""

    object: Literal["device_credentials"] = "device_credentials"
    device_id: str
    username: str
    password: str
    created_at: Timestamp
    rotated: bool
    topics: DeviceTopics


class TelemetronResult(msgspec.Struct, kw_only=True):
    """The Telemetron upsert's answer, success or failure, in its own shape."""

    success: bool
    message: str
    deviceId: str | UnsetType = UNSET  # the vendor's spelling
    identifier: str | UnsetType = UNSET
    type: str | UnsetType | None = UNSET


class Error(msgspec.Struct, kw_only=True):
    type: str
    message: str
    details: list[ErrorDetail] | UnsetType = UNSET


class ErrorBody(msgspec.Struct):
    """Every ``/v1`` error: ``{"error": {"type", "message", "details"?}}``."""

    error: Error


class Registration(msgspec.Struct, kw_only=True):
    """One item's outcome in a batch: the device (201 new, 200 already registered), or
    the error a single registration would have answered (400, 409)."""

    status: int
    device: Device | UnsetType = UNSET
    error: Error | UnsetType = UNSET


class RegistrationList(msgspec.Struct, kw_only=True):
    """``POST /v1/devices/batch``: one `Registration` per item, in input order."""

    object: Literal["list"] = "list"
    data: list[Registration]
