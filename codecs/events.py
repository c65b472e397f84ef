"""Events: what the gateway publishes on ``events/v1/{type}`` and lists at ``GET /v1/events``.

An event says that a change committed: ``data.object`` is the device or the command after
it. Event ids sort in publish order, which for one device is its commit order.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from gateway_codecs.registry import Command, Device
from gateway_codecs.validation import NUL_RULE, rule

DeviceEventType = Literal[
    "device.registered", "device.updated", "device.bound", "device.unbound", "device.reset",
    "device.deleted", "device.restored", "device.online", "device.offline",
    "device.settings_changed", "device.settings_applied",
]
CommandEventType = Literal[
    "command.created", "command.delivered", "command.succeeded", "command.failed",
    "command.rejected", "command.expired", "command.canceled",
]
EventType = Literal[DeviceEventType, CommandEventType]
EVENT_TYPES: tuple[str, ...] = (
    *DeviceEventType.__args__,  # type: ignore[attr-defined]
    *CommandEventType.__args__,  # type: ignore[attr-defined]
)
TOPIC_PREFIX = "events/v1/"


class EventData(msgspec.Struct):
    """The device or the command after the change (tagged by its ``object`` field)."""

    object: Device | Command


class Event(msgspec.Struct, kw_only=True):
    """One event; consumers de-duplicate by ``id`` (delivery is at least once)."""

    id: str  # evt_..., sorting in publish order (per device: commit order)
    object: Literal["event"] = "event"
    type: EventType
    created_at: str  # ISO 8601 UTC to the millisecond, with a Z
    device_id: str
    data: EventData


class EventList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


EventLimit = Annotated[
    str, msgspec.Meta(pattern=r"^0*(?:[1-9][0-9]{0,2}|1000)$", max_length=4,
                      extra=rule("Must be an integer between 1 and 1000"))
]
QueryText = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$", extra=rule(NUL_RULE))]


class EventQuery(msgspec.Struct, kw_only=True):
    """``GET /v1/events``: oldest first, after the event id ``after``."""

    after: Annotated[str, msgspec.Meta(
        pattern=r"^evt_[0-9]{1,20}$",
        extra=rule("Must be an event id (evt_ and digits)"))] | None = None
    limit: EventLimit = "100"
    type: Annotated[EventType, msgspec.Meta(
        extra=rule("Must be one of: " + ", ".join(EVENT_TYPES)))] | None = None
    device_id: QueryText | None = None

    @property
    def page_size(self) -> int:
        return int(self.limit)

