"""The registry's routes: method + path template → scope and handler.

Each handler is a small async function from the request (typed envelope, path
parameters) to a status and a JSON body. Bodies are checked field by field so that a
validation error names every bad field.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from gateway_codecs import settings as settings_schema
from gateway_codecs.api import Request

from gateway import auth
from gateway.dynsec import DeviceAccess
from gateway.errors import (
    Conflict,
    DynsecRefused,
    DynsecUnavailable,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from gateway.storage import Record, Storage

log = structlog.get_logger("gateway.routes")

SERIAL_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
COMMAND_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MODEL_SUFFIX_RE = re.compile(r"_v\d+$")
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
MAX_TTL_SECONDS = 30 * 24 * 3600
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, to the millisecond."""
    if value is None:
        return None
    value = value.astimezone(dt.UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"


# ---- views ------------------------------------------------------------------------------


def device_view(row: Record) -> dict[str, Any]:
    device_type = row["device_type"]
    return {
        "id": row["id"],
        "object": "device",
        "serial_number": row["serial_number"],
        "device_type": device_type,
        "model": MODEL_SUFFIX_RE.sub("", device_type) if device_type else None,
        "firmware_version": row["firmware_version"],
        "status": "bound" if row["end_user_id"] is not None else "unbound",
        "end_user_id": row["end_user_id"],
        "bound_at": iso(row["bound_at"]),
        "battery_percent": row["battery_percent"],
        "storage_used_mb": row["storage_used_mb"],
        "storage_total_mb": row["storage_total_mb"],
        "signal_strength_dbm": row["signal_strength_dbm"],
        "last_heartbeat_at": iso(row["last_heartbeat_at"]),
        "recording_state": row["recording_state"],
        "metadata": row["metadata"],
        "settings": row["settings"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


def command_view(row: Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "command",
        "device_id": row["device_id"],
        "type": row["type"],
        "params": row["params"],
        "status": row["status"],
        "attempts": row["attempts"],
        "created_at": iso(row["created_at"]),
        "delivered_at": iso(row["delivered_at"]),
        "completed_at": iso(row["completed_at"]),
        "expires_at": iso(row["expires_at"]),
        "result": row["result"],
    }


def settings_view(row: Record, *, applied: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "device_id": row["device_id"],
        "settings": row["document"],
        "version": row["version"],
    }
    if applied:
        view["applied_version"] = row["applied_version"]
    view["updated_at"] = iso(row["updated_at"])
    return view


def list_view(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more}


# ---- body checks ------------------------------------------------------------------------


NUL_RULE = "Must not contain the NUL character (U+0000)"


def holds_nul(value: Any) -> bool:
    """Whether a JSON value has U+0000 in a key or string, which PostgreSQL cannot store.

    Iterative, so that a deeply nested document cannot exhaust the stack.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class Fields:
    """Reads fields from a JSON object, collecting every error before raising."""

    def __init__(self, body: Any, allowed: tuple[str, ...] | None) -> None:
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object")
        self.body: dict[str, Any] = body
        self.errors: list[dict[str, str]] = []
        if allowed is not None:
            for name in body:
                if name not in allowed:
                    self.error(name, "Unknown field")

    def error(self, name: str, message: str) -> None:
        self.errors.append({"field": name, "error": message})

    def string(
        self,
        name: str,
        *,
        required: bool = False,
        pattern: re.Pattern[str] | None = None,
        max_length: int = 256,
        rule: str = "",
    ) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                self.error(name, "Required")
            return None
        if not isinstance(value, str):
            self.error(name, "Must be a string")
        elif pattern is not None and not pattern.fullmatch(value):
            self.error(name, rule or f"Must match {pattern.pattern}")
        elif not value or len(value) > max_length or "\x00" in value:
            self.error(name, f"Must be 1 to {max_length} characters")
        else:
            return value
        return None

    def obj(self, name: str) -> dict[str, Any] | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, dict):
            self.error(name, "Must be an object")
            return None
        if value is not None and holds_nul(value):
            self.error(name, NUL_RULE)
            return None
        return value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        value = self.body.get(name, default)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(name, "Must be an integer")
        elif not low <= value <= high:
            self.error(name, f"Must be between {low} and {high}")
        else:
            return value
        return default

    def check(self, message: str = "Invalid request") -> None:
        if self.errors:
            raise ValidationFailed(message, self.errors)


def _query_limit(query: Mapping[str, str], errors: Fields) -> int:
    raw = query.get("limit", "20")
    # isdigit() alone accepts "²" and "٣", which int() rejects, and int() refuses very
    # long digit strings: both would be a 500.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or not 1 <= int(raw) <= 100:
        errors.error("limit", "Must be an integer between 1 and 100")
        return 20
    return int(raw)


def _json_text(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")


def _merge_patch(target: Any, patch: Any) -> Any:
    return settings_schema.merge_patch_apply(target, patch)


# ---- handlers ---------------------------------------------------------------------------


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


Result = tuple[int, Any]
Handler = Callable[[Context], Awaitable[Result]]

SERIAL_RULE = "Must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"


async def register_device(ctx: Context) -> Result:
    f = Fields(ctx.request.body,
               ("serial_number", "device_type", "firmware_version", "metadata"))
    serial = f.string("serial_number", required=True, pattern=SERIAL_RE, rule=SERIAL_RULE)
    device_type = f.string("device_type", max_length=64)
    firmware = f.string("firmware_version", max_length=64)
    metadata = f.obj("metadata")
    f.check("Invalid device")
    assert serial is not None
    row, created = await ctx.storage.register_device(
        new_id("dev_"), serial, device_type, firmware, metadata, settings_schema.defaults()
    )
    return (201 if created else 200), device_view(row)


async def list_devices(ctx: Context) -> Result:
    query = ctx.request.query
    f = Fields({}, None)
    limit = _query_limit(query, f)
    status = query.get("status")
    if status not in (None, "bound", "unbound"):
        f.error("status", "Must be bound or unbound")
    serial = query.get("serial_number")
    end_user = query.get("end_user_id")
    after = query.get("starting_after")
    for name, value in (("serial_number", serial), ("end_user_id", end_user),
                        ("starting_after", after)):
        if value is not None and "\x00" in value:
            f.error(name, NUL_RULE)
    f.check("Invalid query")
    rows, has_more = await ctx.storage.list_devices(
        limit, after, None if status is None else status == "bound", end_user, serial
    )
    return 200, list_view([device_view(r) for r in rows], has_more)


async def get_device(ctx: Context) -> Result:
    return 200, device_view(await ctx.storage.get_device(ctx.id))


async def patch_device(ctx: Context) -> Result:
    f = Fields(ctx.request.body, ("firmware_version", "metadata"))
    firmware = f.string("firmware_version", max_length=64)
    has_metadata = "metadata" in f.body
    metadata_patch = f.body.get("metadata")
    if metadata_patch is not None and not isinstance(metadata_patch, dict):
        f.error("metadata", "Must be an object or null")
    elif metadata_patch is not None and holds_nul(metadata_patch):
        f.error("metadata", NUL_RULE)
    f.check("Invalid device")
    # A merge patch: an explicit null clears the field.
    clear_firmware = "firmware_version" in f.body and f.body["firmware_version"] is None

    def change(row: Record) -> tuple[str | None, dict[str, Any] | None] | None:
        new_firmware = firmware if firmware is not None else row["firmware_version"]
        if clear_firmware:
            new_firmware = None
        metadata = row["metadata"]
        if has_metadata:
            metadata = (
                None if metadata_patch is None else _merge_patch(metadata or {}, metadata_patch)
            )
        # Compared as JSON text: in Python True == 1, so {"a": true} would not replace {"a": 1}.
        if new_firmware == row["firmware_version"] and _json_text(metadata) == _json_text(
            row["metadata"]
        ):
            return None
        return new_firmware, metadata

    return 200, device_view(await ctx.storage.update_device(ctx.id, change))


async def delete_device(ctx: Context) -> Result:
    await ctx.storage.delete_device(ctx.id)
    if ctx.access is not None:
        # The delete recorded the revocation; the broker now drops the device's sessions.
        await ctx.access.revoke_now(ctx.id)
    return 200, {"id": ctx.id, "object": "device", "deleted": True}


async def restore_device(ctx: Context) -> Result:
    return 200, device_view(await ctx.storage.restore_device(ctx.id))


async def bind_device(ctx: Context) -> Result:
    f = Fields(ctx.request.body, ("end_user_id",))
    end_user = f.string("end_user_id", required=True, max_length=128)
    f.check("Invalid bind request")
    assert end_user is not None
    return 200, device_view(await ctx.storage.bind_device(ctx.id, end_user))


async def unbind_device(ctx: Context) -> Result:
    Fields(ctx.request.body, ()).check()
    return 200, device_view(await ctx.storage.unbind_device(ctx.id))


async def reset_device(ctx: Context) -> Result:
    Fields(ctx.request.body, ()).check()
    row = await ctx.storage.reset_device(
        ctx.id, new_id("cmd_"), dt.timedelta(seconds=DEFAULT_TTL_SECONDS)
    )
    return 200, device_view(row)


async def issue_credentials(ctx: Context) -> Result:
    """Issue (or rotate) the device's broker password; it is in this reply only."""
    Fields(ctx.request.body, ()).check()
    if ctx.access is None:
        raise Conflict(
            "Device credentials need the broker's dynamic security (GATEWAY_DYNSEC=1)"
        )
    try:
        issued = await ctx.access.issue(ctx.id)
    except DynsecUnavailable as exc:
        raise Unavailable("The broker's dynamic security did not answer; retry later") from exc
    except DynsecRefused as exc:
        log.error("credentials.refused", command=exc.command, error=exc.error)
        raise InternalError("The broker refused the credentials change") from exc
    return 201, {
        "object": "device_credentials",
        "device_id": issued.device_id,
        "username": issued.serial,
        "password": issued.password,
        "created_at": iso(issued.created_at),
        "rotated": issued.rotated,
        "topics": issued.topics,
    }


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


async def get_settings(ctx: Context) -> Result:
    return 200, settings_view(await ctx.storage.get_settings(ctx.id), applied=True)


def _settings_body(request: Request) -> dict[str, Any]:
    """The body of a settings write: an object (like every other route's), {} when absent."""
    if request.body is None:
        return {}
    if not isinstance(request.body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return request.body


async def put_settings(ctx: Context) -> Result:
    if_match = _if_match(ctx.request)
    body = _settings_body(ctx.request)
    try:
        document = settings_schema.replace(body)
    except settings_schema.SettingsError as exc:
        raise _settings_error(exc) from exc
    row = await ctx.storage.write_settings(ctx.id, if_match, lambda _current: document)
    return 200, settings_view(row, applied=False)


async def patch_settings(ctx: Context) -> Result:
    if_match = _if_match(ctx.request)
    body = _settings_body(ctx.request)
    try:  # validate before touching the database; the merge runs under the row lock
        settings_schema.patch(settings_schema.defaults(), body)
    except settings_schema.SettingsError as exc:
        raise _settings_error(exc) from exc
    row = await ctx.storage.write_settings(
        ctx.id, if_match, lambda current: settings_schema.patch(current, body)
    )
    return 200, settings_view(row, applied=False)


COMMAND_STATUSES = ("pending", "delivered", "succeeded", "failed", "rejected", "expired",
                    "canceled")


async def create_command(ctx: Context) -> Result:
    f = Fields(ctx.request.body, ("type", "params", "ttl_seconds", "idempotency_key"))
    command_type = f.string(
        "type", required=True, pattern=COMMAND_TYPE_RE,
        rule="Must match ^[a-z][a-z0-9_]{0,63}$",
    )
    params = f.obj("params")
    ttl = f.integer("ttl_seconds", 1, MAX_TTL_SECONDS, DEFAULT_TTL_SECONDS)
    key = f.string("idempotency_key", max_length=255)
    f.check("Invalid command")
    assert command_type is not None
    row, created = await ctx.storage.create_command(
        ctx.id, new_id("cmd_"), command_type, params or {}, dt.timedelta(seconds=ttl), key
    )
    return (201 if created else 200), command_view(row)


async def list_commands(ctx: Context) -> Result:
    query = ctx.request.query
    f = Fields({}, None)
    limit = _query_limit(query, f)
    status = query.get("status")
    if status is not None and status not in COMMAND_STATUSES:
        f.error("status", "Must be one of: " + ", ".join(COMMAND_STATUSES))
    if "\x00" in query.get("starting_after", ""):
        f.error("starting_after", NUL_RULE)
    f.check("Invalid query")
    rows, has_more = await ctx.storage.list_commands(
        ctx.id, limit, query.get("starting_after"), status
    )
    return 200, list_view([command_view(r) for r in rows], has_more)


async def get_command(ctx: Context) -> Result:
    return 200, command_view(await ctx.storage.get_command(ctx.id))


async def cancel_command(ctx: Context) -> Result:
    Fields(ctx.request.body, ()).check()
    return 200, command_view(await ctx.storage.cancel_command(ctx.id))


class TelemetronError(Exception):
    """An error on the Telemetron route, answered in its own shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def telemetron_upsert(ctx: Context) -> Result:
    body = ctx.request.body
    if not isinstance(body, dict):
        raise TelemetronError(400, "Invalid JSON: the body must be an object")
    identifier = body.get("identifier")
    device_type = body.get("type")
    properties = body.get("properties")
    if not isinstance(identifier, str) or not identifier:
        raise TelemetronError(400, "identifier is required and must be a non-empty string")
    if not SERIAL_RE.fullmatch(identifier):
        raise TelemetronError(400, f"identifier: {SERIAL_RULE}")
    if device_type is not None and (
        not isinstance(device_type, str) or not 1 <= len(device_type) <= 64
        or "\x00" in device_type  # PostgreSQL text cannot hold NUL: a 500 otherwise
    ):
        raise TelemetronError(400, "type must be a string of 1 to 64 characters")
    if properties is not None and not isinstance(properties, dict):
        raise TelemetronError(400, "properties must be an object")
    if properties is not None and holds_nul(properties):
        raise TelemetronError(400, f"properties: {NUL_RULE}")
    row, created = await ctx.storage.upsert_device(
        new_id("dev_"), identifier, device_type, properties, settings_schema.defaults()
    )
    if row is None:
        raise TelemetronError(400, "type is required when creating a device")
    return 200, {
        "success": True,
        "message": "Device created successfully" if created else "Device updated successfully",
        "deviceId": row["id"],
        "identifier": identifier,
        "type": row["device_type"],
    }


# ---- the router -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str
    scope: str
    handler: Handler


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/devices", auth.WRITE, register_device),
    Route("GET", "/v1/devices", auth.READ, list_devices),
    Route("GET", "/v1/devices/{id}", auth.READ, get_device),
    Route("PATCH", "/v1/devices/{id}", auth.WRITE, patch_device),
    Route("DELETE", "/v1/devices/{id}", auth.WRITE, delete_device),
    Route("POST", "/v1/devices/{id}/restore", auth.WRITE, restore_device),
    Route("POST", "/v1/devices/{id}/bind", auth.WRITE, bind_device),
    Route("POST", "/v1/devices/{id}/unbind", auth.WRITE, unbind_device),
    Route("POST", "/v1/devices/{id}/reset", auth.WRITE, reset_device),
    Route("POST", "/v1/devices/{id}/credentials", auth.WRITE, issue_credentials),
    Route("GET", "/v1/devices/{id}/settings", auth.READ, get_settings),
    Route("PUT", "/v1/devices/{id}/settings", auth.WRITE, put_settings),
    Route("PATCH", "/v1/devices/{id}/settings", auth.WRITE, patch_settings),
    Route("POST", "/v1/devices/{id}/commands", auth.WRITE, create_command),
    Route("GET", "/v1/devices/{id}/commands", auth.READ, list_commands),
    Route("GET", "/v1/commands/{id}", auth.READ, get_command),
    Route("POST", "/v1/commands/{id}/cancel", auth.WRITE, cancel_command),
    Route("POST", "/api/ext-v1/device", auth.WRITE, telemetron_upsert),
)

TELEMETRON_PREFIX = "/api/ext-v1/"


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for method and path, or NotFound / MethodNotAllowed."""
    segments = path.split("?", 1)[0].rstrip("/").split("/") if path != "/" else [""]
    allowed: list[str] = []
    for route in ROUTES:
        params = _match_template(route.template, segments)
        if params is None:
            continue
        if route.method == method:
            return route, params
        allowed.append(route.method)
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed here; allowed: {', '.join(allowed)}")
    raise NotFound(f"No route for {method} {path}")


def route_template(method: str, path: str) -> str:
    """The template label for metrics (never a raw path)."""
    try:
        return match(method, path)[0].template
    except (NotFound, MethodNotAllowed):
        return "unmatched"


def _match_template(template: str, segments: list[str]) -> dict[str, str] | None:
    parts = template.split("/")
    if len(parts) != len(segments):
        return None
    params: dict[str, str] = {}
    for part, segment in zip(parts, segments, strict=True):
        if part.startswith("{"):
            if not ID_RE.fullmatch(segment):
                return None
            params[part[1:-1]] = segment
        elif part != segment:
            return None
    return params
