"""The registry's routes: each a small async function from a typed body to a typed reply.

`ROUTES` is the table: method, path template, scope, handler, and the Struct the handler
takes. Bodies and query strings are converted before a handler runs (see
`gateway.router.Route`), so a handler only sees valid input.
"""

from __future__ import annotations

import datetime as dt
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from gateway_codecs import registry as wire
from gateway_codecs import settings as settings_schema
from gateway_codecs.api import Request
from gateway_codecs.events import EventQuery
from gateway_codecs.validation import ErrorDetail, Invalid, convert, free_of_nul

from gateway import auth
from gateway.dynsec import DeviceAccess
from gateway.errors import (
    Conflict,
    DynsecRefused,
    DynsecUnavailable,
    InternalError,
    InvalidRequest,
    TelemetronError,
    Unavailable,
    ValidationFailed,
)
from gateway.router import Reply, Route, Router
from gateway.storage import Storage
from gateway.storage.database import iso
from gateway.storage.devices import NewDevice

log = structlog.get_logger("gateway.routes")

TELEMETRON_PREFIX = "/api/ext-v1/"
REGISTER_INVALID = "Invalid device"  # the message of a registration's validation error
_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_SPACE = len(_ID_ALPHABET) ** 20


def new_id(prefix: str) -> str:
    """``prefix`` and 20 random characters of ``a-z0-9``, each uniform (one draw from the
    OS's generator for all 20, which a batch of 1,000 registrations notices)."""
    number = secrets.randbelow(_ID_SPACE)
    digits = []
    for _ in range(20):
        number, digit = divmod(number, 36)
        digits.append(_ID_ALPHABET[digit])
    return prefix + "".join(digits)


@dataclass(frozen=True, slots=True)
class Context:
    storage: Storage
    request: Request
    params: Mapping[str, str]
    # Device broker credentials; None when the broker's dynamic security is not in use.
    access: DeviceAccess | None = None

    @property
    def id(self) -> str:
        return self.params["id"]


def decode_input(route: Route[Any], request: Request) -> Any:
    """The route's typed input from the request, or a 400 naming every bad field."""
    if route.source == "none":
        return None
    if route.source == "query":
        raw: Any = request.query
    else:
        raw = {} if request.body is None else request.body
        if not isinstance(raw, dict):
            raise InvalidRequest("The request body must be a JSON object")
    if route.takes is None:
        return raw
    try:
        return convert(raw, route.takes, message=route.invalid)
    except Invalid as exc:
        raise ValidationFailed(exc.message, exc.details) from exc


# ---- devices ------------------------------------------------------------------------------


async def register_device(ctx: Context, body: wire.RegisterDevice) -> Reply:
    device, created = await ctx.storage.devices.register(
        new_id("dev_"), body.serial_number, body.device_type, body.firmware_version,
        body.metadata,
    )
    return (201 if created else 200), device


async def register_devices(ctx: Context, body: wire.RegisterBatch) -> Reply:
    """Each item as `register_device` would answer it; the valid ones go to the database
    together."""
    results: list[wire.Registration | None] = []
    batch: list[NewDevice] = []
    for item in body.devices:
        try:
            one = _registration(item)
        except Invalid as exc:
            results.append(wire.Registration(
                status=400, error=ValidationFailed(exc.message, exc.details).body().error))
            continue
        results.append(None)
        batch.append(NewDevice(new_id("dev_"), one.serial_number, one.device_type,
                               one.firmware_version, one.metadata))
    outcomes = iter(await ctx.storage.devices.register_batch(batch))
    data = []
    for result in results:
        if result is None:
            outcome = next(outcomes)
            if isinstance(outcome, Conflict):
                result = wire.Registration(status=outcome.status, error=outcome.body().error)
            else:
                device, created = outcome
                result = wire.Registration(status=201 if created else 200, device=device)
        data.append(result)
    return 200, wire.RegistrationList(data=data)


def _registration(item: dict[str, Any]) -> wire.RegisterDevice:
    """One item of a batch as a `RegisterDevice`, or `Invalid` naming every bad field.

    msgspec checks every constraint of the Struct but one, in about 1 µs; the field by
    field check that words the errors takes a hundred times that, so it runs only for an
    item that fails. The one constraint msgspec cannot check is the predicate on
    metadata (no NUL anywhere in it), checked here.
    """
    try:
        body = msgspec.convert(item, wire.RegisterDevice)
    except msgspec.ValidationError:
        pass
    else:
        if body.metadata is None or free_of_nul(body.metadata):
            return body
    return convert(item, wire.RegisterDevice, message=REGISTER_INVALID)


async def list_devices(ctx: Context, query: wire.DeviceQuery) -> Reply:
    bound = None if query.status is None else query.status == "bound"
    devices, has_more = await ctx.storage.devices.page(
        query.page_size, query.starting_after, bound, query.end_user_id, query.serial_number,
        query.connectivity,
    )
    return 200, wire.DeviceList(data=devices, has_more=has_more)


async def get_device(ctx: Context, _: None) -> Reply:
    return 200, await ctx.storage.devices.get(ctx.id)


def _json_text(value: Any) -> bytes:
    # Compared as JSON text: in Python True == 1, so {"a": true} would not replace {"a": 1}.
    return msgspec.json.encode(value, order="sorted")


async def patch_device(ctx: Context, body: wire.PatchDevice) -> Reply:
    def change(device: wire.Device) -> tuple[str | None, dict[str, Any] | None] | None:
        firmware = device.firmware_version
        if body.firmware_version is not msgspec.UNSET:
            firmware = body.firmware_version
        metadata = device.metadata
        if body.metadata is not msgspec.UNSET:
            metadata = (None if body.metadata is None
                        else settings_schema.merge_patch_apply(metadata or {}, body.metadata))
        if firmware == device.firmware_version and _json_text(metadata) == _json_text(
            device.metadata
        ):
            return None
        return firmware, metadata

    return 200, await ctx.storage.devices.update(ctx.id, change)


async def delete_device(ctx: Context, _: None) -> Reply:
    await ctx.storage.devices.delete(ctx.id)
    if ctx.access is not None:
        # The delete recorded the revocation; the broker now drops the device's sessions.
        await ctx.access.revoke_now(ctx.id)
    return 200, wire.DeletedDevice(id=ctx.id)


async def restore_device(ctx: Context, _: None) -> Reply:
    return 200, await ctx.storage.devices.restore(ctx.id)


async def bind_device(ctx: Context, body: wire.BindDevice) -> Reply:
    return 200, await ctx.storage.devices.bind(ctx.id, body.end_user_id)


async def unbind_device(ctx: Context, _: wire.Empty) -> Reply:
    return 200, await ctx.storage.devices.unbind(ctx.id)


async def reset_device(ctx: Context, _: wire.Empty) -> Reply:
    ttl = dt.timedelta(seconds=wire.DEFAULT_TTL_SECONDS)
    return 200, await ctx.storage.devices.reset(ctx.id, new_id("cmd_"), ttl)


async def issue_credentials(ctx: Context, _: wire.Empty) -> Reply:
    """Issue (or rotate) the device's broker password; it is in this reply only."""
    if ctx.access is None:
        raise Conflict(
            "Device credentials need the broker's dynamic security (GATEWAY_DYNSEC=1), or "
            "GATEWAY_DATABASE_CREDENTIALS=1 for a broker that reads them from PostgreSQL"
        )
    try:
        issued = await ctx.access.issue(ctx.id)
    except DynsecUnavailable as exc:
        raise Unavailable("The broker's dynamic security did not answer; retry later") from exc
    except DynsecRefused as exc:
        log.error("credentials.refused", command=exc.command, error=exc.error)
        raise InternalError("The broker refused the credentials change") from exc
    return 201, wire.DeviceCredentials(
        device_id=issued.device_id, username=issued.serial, password=issued.password,
        created_at=iso(issued.created_at), rotated=issued.rotated, topics=issued.topics,
    )


# ---- settings -----------------------------------------------------------------------------


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    # ASCII digits only, and few enough for int() (versions are 32-bit in the database).
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise ValidationFailed(
            "Invalid if-match header",
            [{"field": "if-match", "error": "Must be a settings version number"}],
        )
    return int(value)


def _settings_error(exc: settings_schema.SettingsError) -> ValidationFailed:
    return ValidationFailed(exc.message, exc.details)


async def get_settings(ctx: Context, _: None) -> Reply:
    return 200, await ctx.storage.settings.get(ctx.id)


async def put_settings(ctx: Context, body: dict[str, Any]) -> Reply:
    if_match = _if_match(ctx.request)
    try:
        document = settings_schema.replace(body)
    except settings_schema.SettingsError as exc:
        raise _settings_error(exc) from exc
    return 200, await ctx.storage.settings.write(ctx.id, if_match, lambda _current: document)


async def patch_settings(ctx: Context, body: dict[str, Any]) -> Reply:
    if_match = _if_match(ctx.request)
    try:  # validate before touching the database; the merge runs under the row lock
        settings_schema.patch(settings_schema.DEFAULTS, body)
    except settings_schema.SettingsError as exc:
        raise _settings_error(exc) from exc
    return 200, await ctx.storage.settings.write(
        ctx.id, if_match, lambda current: settings_schema.patch(current, body)
    )


# ---- commands -----------------------------------------------------------------------------


async def create_command(ctx: Context, body: wire.CreateCommand) -> Reply:
    command, created = await ctx.storage.commands.create(
        ctx.id, new_id("cmd_"), body.type, body.params or {},
        dt.timedelta(seconds=body.ttl_seconds), body.idempotency_key,
    )
    return (201 if created else 200), command


async def list_commands(ctx: Context, query: wire.CommandQuery) -> Reply:
    commands, has_more = await ctx.storage.commands.page(
        ctx.id, query.page_size, query.starting_after, query.status
    )
    return 200, wire.CommandList(data=commands, has_more=has_more)


async def get_command(ctx: Context, _: None) -> Reply:
    return 200, await ctx.storage.commands.get(ctx.id)


async def cancel_command(ctx: Context, _: wire.Empty) -> Reply:
    return 200, await ctx.storage.commands.cancel(ctx.id)


async def list_events(ctx: Context, query: EventQuery) -> Reply:
    return 200, await ctx.storage.events.page(
        query.after, query.page_size, query.type, query.device_id
    )


# ---- Telemetron ---------------------------------------------------------------------------

# The Telemetron route words its errors as the vendor's API does, one at a time.
_TELEMETRON_WORDING = {
    ("identifier", "Required"): "identifier is required and must be a non-empty string",
    ("identifier", "Must be a string"): "identifier is required and must be a non-empty string",
    ("type", "Must be a string"): "type must be a string of 1 to 64 characters",
    ("type", "Must be 1 to 64 characters"): "type must be a string of 1 to 64 characters",
    ("properties", "Must be an object"): "properties must be an object",
}


def _telemetron_message(detail: ErrorDetail) -> str:
    key = (detail["field"], detail["error"])
    return _TELEMETRON_WORDING.get(key, f"{detail['field']}: {detail['error']}")


async def telemetron_upsert(ctx: Context, _: None) -> Reply:
    raw = ctx.request.body
    if not isinstance(raw, dict):
        raise TelemetronError(400, "Invalid JSON: the body must be an object")
    if raw.get("identifier") == "":
        raw = {**raw, "identifier": None}  # empty is missing, as the vendor words it
    try:
        body = convert(raw, wire.TelemetronUpsert)
    except Invalid as exc:
        raise TelemetronError(400, _telemetron_message(exc.details[0])) from exc
    device, created = await ctx.storage.devices.upsert(
        new_id("dev_"), body.identifier, body.type, body.properties
    )
    if device is None:
        raise TelemetronError(400, "type is required when creating a device")
    return 200, wire.TelemetronResult(
        success=True,
        message="Device created successfully" if created else "Device updated successfully",
        deviceId=device.id, identifier=body.identifier, type=device.device_type,
    )


# ---- the table ----------------------------------------------------------------------------

R, W = auth.READ, auth.WRITE
ROUTES: tuple[Route[Any], ...] = (
    Route("POST", "/v1/devices", W, register_device, wire.RegisterDevice,
          invalid=REGISTER_INVALID),
    Route("POST", "/v1/devices/batch", W, register_devices, wire.RegisterBatch,
          invalid="Invalid batch"),
    Route("GET", "/v1/devices", R, list_devices, wire.DeviceQuery, "query", "Invalid query"),
    Route("GET", "/v1/devices/{id}", R, get_device, source="none"),
    Route("PATCH", "/v1/devices/{id}", W, patch_device, wire.PatchDevice,
          invalid="Invalid device"),
    Route("DELETE", "/v1/devices/{id}", W, delete_device, source="none"),
    Route("POST", "/v1/devices/{id}/restore", W, restore_device, source="none"),
    Route("POST", "/v1/devices/{id}/bind", W, bind_device, wire.BindDevice,
          invalid="Invalid bind request"),
    Route("POST", "/v1/devices/{id}/unbind", W, unbind_device, wire.Empty),
    Route("POST", "/v1/devices/{id}/reset", W, reset_device, wire.Empty),
    Route("POST", "/v1/devices/{id}/credentials", W, issue_credentials, wire.Empty),
    Route("GET", "/v1/devices/{id}/settings", R, get_settings, source="none"),
    Route("PUT", "/v1/devices/{id}/settings", W, put_settings),
    Route("PATCH", "/v1/devices/{id}/settings", W, patch_settings),
    Route("POST", "/v1/devices/{id}/commands", W, create_command, wire.CreateCommand,
          invalid="Invalid command"),
    Route("GET", "/v1/devices/{id}/commands", R, list_commands, wire.CommandQuery, "query",
          "Invalid query"),
    Route("GET", "/v1/commands/{id}", R, get_command, source="none"),
    Route("POST", "/v1/commands/{id}/cancel", W, cancel_command, wire.Empty),
    Route("GET", "/v1/events", R, list_events, EventQuery, "query", "Invalid query"),
    Route("POST", "/api/ext-v1/device", W, telemetron_upsert, source="none"),
)
ROUTER = Router(ROUTES)
