"""The AsyncAPI 3.0 document of every topic, payload and operation of the gateway.

Built from the codecs Structs with msgspec's JSON Schema support, so it cannot say other
than what the gateway decodes and encodes; the routes come from `gateway.routes.ROUTES`.
`gateway asyncapi` prints it as YAML. ``docs/asyncapi.yaml`` is that output, checked in;
a test regenerates it and fails when the two differ.

Operations are the gateway's own view: it receives heartbeats and requests, and sends
commands, settings updates, replies and events.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml
from gateway_codecs import api, device, events, registry, settings

from gateway import __version__
from gateway.router import Route
from gateway.routes import ROUTES

__all__ = ["EXAMPLES", "RESPONSES", "add_arguments", "document", "main", "render", "run"]

_REF = "#/components/schemas/{name}"
_MQTT_BINDING = {"qos": 1, "bindingVersion": "0.2.0"}

# What each route answers: the Struct of the body, the success statuses, and the routes
# ("METHOD template"). Every `/v1` error answers `ErrorBody`; the Telemetron route answers
# `TelemetronResult` for errors too. A route missing here is described without its answer
# (and `tests/test_asyncapi.py` fails until it is added).
_ANSWERS: tuple[tuple[type[msgspec.Struct], str, tuple[str, ...]], ...] = (
    (registry.Device, "201 (created) or 200 (already registered)", ("POST /v1/devices",)),
    (registry.Device, "200", (
        "GET /v1/devices/{id}", "PATCH /v1/devices/{id}", "POST /v1/devices/{id}/restore",
        "POST /v1/devices/{id}/bind", "POST /v1/devices/{id}/unbind",
        "POST /v1/devices/{id}/reset")),
    (registry.RegistrationList, "200", ("POST /v1/devices/batch",)),
    (registry.DeviceList, "200", ("GET /v1/devices",)),
    (registry.DeletedDevice, "200", ("DELETE /v1/devices/{id}",)),
    (registry.DeviceCredentials, "201", ("POST /v1/devices/{id}/credentials",)),
    (registry.DeviceSettings, "200", tuple(
        f"{method} /v1/devices/{{id}}/settings" for method in ("GET", "PUT", "PATCH"))),
    (registry.Command, "201 (created) or 200 (idempotent retry)",
     ("POST /v1/devices/{id}/commands",)),
    (registry.Command, "200", ("GET /v1/commands/{id}", "POST /v1/commands/{id}/cancel")),
    (registry.CommandList, "200", ("GET /v1/devices/{id}/commands",)),
    (events.EventList, "200", ("GET /v1/events",)),
    (registry.TelemetronResult, "200", ("POST /api/ext-v1/device",)),
)
RESPONSES: dict[tuple[str, str], tuple[str, type[msgspec.Struct]]] = {
    (route.split(" ")[0], route.split(" ")[1]): (status, struct)
    for struct, status, routes in _ANSWERS for route in routes
}

# Routes whose body the handler checks itself (settings documents): what that body is.
_RAW_BODIES: dict[tuple[str, str], tuple[type[msgspec.Struct], str]] = {
    ("PUT", "/v1/devices/{id}/settings"): (
        settings.Settings, "a whole document; omitted or null fields take their default"),
    ("PATCH", "/v1/devices/{id}/settings"): (
        settings.Settings, "an RFC 7396 merge patch; null resets a field to its default"),
    ("POST", "/api/ext-v1/device"): (registry.TelemetronUpsert, "unknown fields are ignored"),
}

_KEY = "sk_live_key0example0000000_secret"
_DEVICE_ID = "dev_a1b2c3d4e5f6g7h8i9j0"


def _request(method: str, path: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = {"method": method, "path": path,
                                "headers": {"authorization": f"Bearer {_KEY}"}}
    if body is not None:
        envelope["body"] = body
    return envelope | extra


# Message examples, by message name. `tests/test_asyncapi.py` decodes each with the codecs,
# so they cannot fall out of step with the Structs.
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "heartbeat": [{
        "name": "health",
        "summary": "A full heartbeat acknowledging two commands",
        "payload": {
            "ts": 1736942400123, "firmware_version": "2.4.1", "battery_percent": 80,
            "storage_used_mb": 1200, "storage_total_mb": 32000, "signal_strength_dbm": -67,
            "recording_state": {"device_state": "recording", "pending_recordings": 3,
                                "flags": 0, "connection_type": ["wifi"]},
            "settings_version": 4,
            "acks": [{"id": "cmd_4f8k2m9q1x7c3v5b6n0z", "status": "succeeded"},
                     {"id": "cmd_7h2j9k4l1m8n3b6v5c0x", "status": "failed",
                      "detail": "storage busy"}],
        },
    }, {"name": "minimal", "summary": "The smallest heartbeat", "payload": {}}],
    "commandBatch": [{
        "name": "reset",
        "summary": "A factory reset, the device's only open command",
        "payload": {"commands": [{
            "id": "cmd_4f8k2m9q1x7c3v5b6n0z", "type": "factory_reset", "params": {},
            "created_at": "2025-01-15T12:00:00.000Z",
            "expires_at": "2025-01-22T12:00:00.000Z"}]},
    }],
    "settingsPatch": [{
        "name": "patch",
        "summary": "From version 4 to 7",
        "payload": {"version": 7, "base_version": 4, "patch": {"upload": {"mode": "wifi_only"}}},
    }],
    "settingsFull": [{
        "name": "full",
        "summary": "The defaults, to a device that reported version 0",
        "payload": {"version": 1, "base_version": None, "settings": settings.defaults()},
    }],
    "request": [
        {"name": "register", "summary": "Register a device (MQTT 5: the reply topic and "
                                        "correlation data are properties)",
         "payload": _request("POST", "/v1/devices", {"serial_number": "SN-2025-001234",
                                                    "device_type": "bota_pin_v1"})},
        {"name": "list", "summary": "List devices (MQTT 3.1.1: the envelope names the reply "
                                    "topic)",
         "payload": _request("GET", "/v1/devices", query={"limit": "10"},
                             reply_to="api/v1/replies/client-7", correlation_id="42")},
        {"name": "settings", "summary": "Change one setting",
         "payload": _request("PATCH", f"/v1/devices/{_DEVICE_ID}/settings",
                             {"audio": {"codec": "aac"}})},
        {"name": "command", "summary": "Send a command",
         "payload": _request("POST", f"/v1/devices/{_DEVICE_ID}/commands",
                             {"type": "set_led", "params": {"color": "red"},
                              "ttl_seconds": 3600})},
        {"name": "reset", "summary": "Unbind and factory-reset a device",
         "payload": _request("POST", f"/v1/devices/{_DEVICE_ID}/reset")},
    ],
    "response": [
        {"name": "deleted", "summary": "A device deleted",
         "payload": {"status": 200, "body": {"id": _DEVICE_ID, "object": "device",
                                             "deleted": True}, "correlation_id": "42"}},
        {"name": "error", "summary": "A validation error",
         "payload": {"status": 400, "correlation_id": "43", "body": {"error": {
             "type": "validation_error", "message": "Invalid upload settings",
             "details": [{"field": "upload.daily_data_limit_mb",
                          "error": "Must be between 0 and 10000 MB"}]}}}},
    ],
}


# ---- schemas --------------------------------------------------------------------------------


class _Names:
    """Component names of Structs: the class name, or, for two Structs named alike, the
    module's name in front (`DeviceCommand`, `RegistryCommand`)."""

    def __init__(self, components: dict[str, Any]) -> None:
        # msgspec names two Structs of the same name by their module path.
        self.renamed = {name: self._plain(name) for name in components}

    @staticmethod
    def _plain(name: str) -> str:
        if "." not in name:
            return name
        *_, module, struct = name.split(".")
        return module.capitalize() + struct

    def of(self, struct: type[Any]) -> str:
        return self.renamed.get(f"{struct.__module__}.{struct.__qualname__}", struct.__name__)

    def ref(self, struct: type[Any]) -> dict[str, str]:
        return {"$ref": _REF.format(name=self.of(struct))}


def _schemas(types: Sequence[Any]) -> tuple[dict[str, Any], _Names]:
    """JSON Schemas of ``types`` and every Struct they use, named as AsyncAPI allows."""
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    names = _Names(components)
    refs = {_REF.format(name=old): _REF.format(name=new) for old, new in names.renamed.items()}
    tidy = {names.renamed[name]: _tidy(schema, refs) for name, schema in components.items()}
    return dict(sorted(tidy.items())), names


def _tidy(value: Any, refs: dict[str, str]) -> Any:
    """AsyncAPI's schema dialect (JSON Schema draft 07): a discriminator is a property name,
    not OpenAPI's object, so msgspec's is left out (each tagged Struct pins its tag with an
    enum of one value); descriptions as Markdown, their first paragraph."""
    if isinstance(value, list):
        return [_tidy(item, refs) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if (key == "discriminator" and isinstance(item, dict)) or (key == "required"
                                                                   and item == []):
            continue
        if key == "$ref":
            out[key] = refs.get(item, item)
        elif key == "description" and isinstance(item, str):
            out[key] = _markdown(item)
        else:
            out[key] = _tidy(item, refs)
    return out


def _markdown(docstring: str) -> str:
    first = docstring.strip().split("\n\n")[0]
    return " ".join(first.replace("``", "`").split())


# ---- routes ---------------------------------------------------------------------------------


def _route_rows(routes: Sequence[Route[Any]], names: _Names) -> Iterator[str]:
    yield "| method | path | scope | takes | answers |"
    yield "|---|---|---|---|---|"
    for route in routes:
        key = (route.method, route.template)
        if key in _RAW_BODIES:
            struct, note = _RAW_BODIES[key]
            takes = f"body `{names.of(struct)}`: {note}"
        elif route.takes is None or route.source == "none":
            takes = "nothing (a body is ignored)"
        elif route.source == "query":
            takes = f"query `{names.of(route.takes)}`"
        elif route.takes is registry.Empty:
            takes = "no body, or `{}`"
        else:
            takes = f"body `{names.of(route.takes)}`"
        answer = RESPONSES.get(key)
        answers = (f"{answer[0]}: `{names.of(answer[1])}`" if answer
                   else "see docs/protocol.md §6")
        yield f"| {route.method} | `{route.template}` | `{route.scope}` | {takes} | {answers} |"


def _response_structs(routes: Sequence[Route[Any]]) -> list[type[msgspec.Struct]]:
    structs: list[type[msgspec.Struct]] = []
    for route in routes:
        answer = RESPONSES.get((route.method, route.template))
        if answer is not None and answer[1] not in structs:
            structs.append(answer[1])
    return structs


def _body_structs(routes: Sequence[Route[Any]]) -> list[type[Any]]:
    structs: list[type[Any]] = []
    for route in routes:
        raw = _RAW_BODIES.get((route.method, route.template))
        struct = raw[0] if raw else route.takes
        if struct is not None and struct not in structs:
            structs.append(struct)
    return structs


_REQUEST_TEXT = """\
A call to the device registry: publish it at QoS 1. The gateway answers on the reply topic:
the MQTT 5 Response Topic property (and echoes Correlation Data), or with MQTT 3.1.1 the
envelope's `reply_to` (and `correlation_id`). Reply topics must start with
`api/v1/replies/`. Every route needs an API key, in `authorization: Bearer KEY` or
`x-api-key: KEY`. `body` is the route's body, as named in the table; each Struct is in
`components.schemas`."""

_RESPONSE_TEXT = """\
The answer to a request: `status` is an HTTP status code; `body` is the route's answer
(table of the request message) or, on a `/v1` route, an error `ErrorBody` (400
`invalid_request` or `validation_error` with `details`, 401, 403, 404, 405, 409, 429, 500,
503). The Telemetron route answers its errors as a `TelemetronResult` with `success:
false`."""


def _envelopes(schemas: dict[str, Any], names: _Names, routes: Sequence[Route[Any]]) -> None:
    """The request and response envelopes, their `body` described route by route."""
    request = schemas["Request"]
    request["properties"]["body"] = {
        "description": "The route's body (see the request message's table); absent or null "
                       "means none.",
    }
    response = schemas["Response"]
    answers = [names.ref(struct) for struct in _response_structs(routes)]
    response["properties"]["body"] = {
        "description": "The route's answer, or an error.",
        "anyOf": [*answers, names.ref(registry.ErrorBody)],
    }
    response["properties"]["correlation_id"] = {
        "description": "The request's correlation id, when it had one.",
        "anyOf": [{"type": "string"}, {"type": "integer"}],
    }


# ---- the document ---------------------------------------------------------------------------


def _message(name: str, title: str, payload: str, text: str, *,
             content_type: str = "application/json", examples: str | None = None,
             **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name, "title": title, "contentType": content_type,
        "description": text, "payload": {"$ref": _REF.format(name=payload)},
    }
    if examples is not None:
        message["examples"] = EXAMPLES[examples]
    return message | extra


def _channel(address: str, title: str, text: str, messages: Sequence[str],
             **parameters: dict[str, Any]) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address, "title": title, "description": text,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
    }
    if parameters:
        channel["parameters"] = parameters
    return channel


def _operation(action: str, channel: str, text: str, messages: Sequence[str],
               **extra: Any) -> dict[str, Any]:
    return {
        "action": action, "channel": {"$ref": f"#/channels/{channel}"}, "summary": text,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in messages],
        "bindings": {"mqtt": dict(_MQTT_BINDING)},
    } | extra


_SERIAL = {"$ref": "#/components/parameters/serial"}

_INFO = """\
An asyncio service between an MQTT broker and PostgreSQL: device heartbeats in, commands
and settings out, and a device registry served over MQTT request/reply.

Operations are the gateway's view: it **receives** heartbeats and requests and **sends**
commands, settings updates, replies and events. A device does the opposite: it subscribes
to its `commands` and `settings` topics at QoS 1, then publishes heartbeats.

With `GATEWAY_TOPIC_PREFIX` set, every address is under that prefix (`acme/devices/...`).
All JSON is UTF-8; timestamps are ISO 8601 UTC to the millisecond with a `Z`, except the
heartbeat's `ts` (milliseconds since the Unix epoch). The whole protocol, with every rule
and error, is docs/protocol.md."""


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document, as plain data."""
    routes = ROUTES
    schemas, names = _schemas([
        device.Heartbeat, device.CommandBatch, device.SettingsPatch, device.SettingsFull,
        api.Request, api.Response, events.Event, registry.ErrorBody,
        *_body_structs(routes), *_response_structs(routes),
    ])
    _envelopes(schemas, names, routes)
    table = "\n".join(_route_rows(routes, names))
    messages = {
        "heartbeatJson": _message(
            "heartbeatJson", "Heartbeat (JSON)", "Heartbeat",
            "A device's health report. Every field is optional; null means absent. `ts` is "
            "the device clock in milliseconds and must grow with every heartbeat; "
            "`settings_version` is the settings version the device applied; `acks` answer "
            "commands. At most 64 KiB.", examples="heartbeat"),
        "heartbeatMsgpack": _message(
            "heartbeatMsgpack", "Heartbeat (MessagePack)", "Heartbeat",
            "The same heartbeat as a MessagePack map with string keys. With MQTT 5 the "
            "Content Type property decides the format; without one (always with MQTT "
            "3.1.1) a payload whose first non-blank byte is `{` is JSON, anything else "
            "MessagePack.", content_type="application/msgpack"),
        "commandBatch": _message(
            "commandBatch", "Commands", "CommandBatch",
            "The device's open commands (1 to 16, oldest first), sent after every applied "
            "heartbeat until acknowledged, expired or canceled. Delivery is at least once: "
            "the device de-duplicates by `id` and acknowledges in a heartbeat's `acks`.",
            examples="commandBatch"),
        "settingsPatch": _message(
            "settingsPatch", "Settings update (patch)", "SettingsPatch",
            "An RFC 7396 merge patch from the version the device reported (`base_version`) "
            "to `version`. The device applies it and reports `version` as "
            "`settings_version`; a device without `base_version` reports 0 instead.",
            examples="settingsPatch"),
        "settingsFull": _message(
            "settingsFull", "Settings update (full)", "SettingsFull",
            "The whole settings document, when the device reported 0, an unknown version, "
            "or one older than the newest 32.", examples="settingsFull"),
        "request": _message(
            "request", "Request", "Request", f"{_REQUEST_TEXT}\n\n{table}", examples="request",
            bindings={"mqtt": {
                "responseTopic": {"type": "string", "pattern": "^api/v1/replies/.+"},
                "correlationData": {"type": "string"},
                "bindingVersion": "0.2.0",
            }}),
        "response": _message("response", "Response", "Response", _RESPONSE_TEXT,
                             examples="response"),
        "event": _message(
            "event", "Event", "Event",
            "A change that committed: `data.object` is the device or the command after it. "
            "Delivery is at least once; de-duplicate by `id`, which sorts in commit order."),
    }
    channels = {
        "heartbeat": _channel(
            "devices/{serial}/heartbeat", "Heartbeats", "Device → gateway.",
            ["heartbeatJson", "heartbeatMsgpack"], serial=_SERIAL),
        "commands": _channel(
            "devices/{serial}/commands", "Commands", "Gateway → device.", ["commandBatch"],
            serial=_SERIAL),
        "settings": _channel(
            "devices/{serial}/settings", "Settings updates", "Gateway → device.",
            ["settingsPatch", "settingsFull"], serial=_SERIAL),
        "requests": _channel(
            "api/v1/requests", "Requests", "Backend → gateway.", ["request"]),
        "replies": _channel(
            "api/v1/replies/{client}", "Replies", "Gateway → backend, on the topic the "
            "request named.", ["response"],
            client={"description": "Chosen by the caller; one or more topic levels, no "
                                   "wildcard. At most 512 characters in all."}),
        "events": _channel(
            f"{events.TOPIC_PREFIX}{{type}}", "Events", "Gateway → backends.", ["event"],
            type={"description": "The event type.", "enum": list(events.EVENT_TYPES)}),
    }
    operations = {
        "receiveHeartbeat": _operation(
            "receive", "heartbeat", "Store a device's health; answer with its commands and "
            "settings.", ["heartbeatJson", "heartbeatMsgpack"]),
        "sendCommands": _operation(
            "send", "commands", "Deliver a device's open commands after its heartbeat.",
            ["commandBatch"]),
        "sendSettings": _operation(
            "send", "settings", "Bring a device's settings to the current version after "
            "its heartbeat.", ["settingsPatch", "settingsFull"]),
        "handleRequest": _operation(
            "receive", "requests", "Answer a registry call.", ["request"],
            reply={
                "address": {"location": "$message.payload#/reply_to",
                            "description": "The MQTT 5 Response Topic property, else the "
                                           "envelope's `reply_to`."},
                "channel": {"$ref": "#/channels/replies"},
                "messages": [{"$ref": "#/channels/replies/messages/response"}],
            }),
        "sendReply": _operation("send", "replies", "Answer a request.", ["response"]),
        "sendEvent": _operation("send", "events", "Announce a committed change.", ["event"]),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "MQTT device gateway",
            "version": __version__,
            "description": _INFO,
            "license": {"name": "Apache-2.0",
                        "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:1883", "protocol": "mqtt", "protocolVersion": "5",
                "description": "A local Mosquitto (MQTT 5 or 3.1.1); `mqtts` on 8883 for "
                               "TLS.",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "parameters": {"serial": {"description": "The device's serial number: 1 to 128 "
                                                     "characters of `A-Z a-z 0-9 . _ : -`."}},
            "schemas": schemas,
        },
    }


# ---- YAML -----------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style throughout; text of several lines as a literal block; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)
_HEADER = ("# The AsyncAPI document of the MQTT device gateway. Generated by\n"
           "# `gateway asyncapi` (python -m gateway.asyncapi) from the codecs; do not edit.\n")


def render() -> str:
    """The document as YAML, with a header saying how it is made."""
    body = yaml.dump(document(), Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     width=100, default_flow_style=False)
    return _HEADER + _strip_trailing(body)


def _strip_trailing(text: str) -> str:
    return re.sub(r"[ \t]+\n", "\n", text)


# ---- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", metavar="FILE", type=Path,
                        help="write the document to FILE instead of stdout")


async def run(args: argparse.Namespace) -> int:
    """`gateway asyncapi`: print (or write) the document."""
    return _write(args.output)


def _write(output: Path | None) -> int:
    text = render()
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway asyncapi",
        description="Print the AsyncAPI 3.0 document of every topic and payload (YAML).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return _write(args.output)


if __name__ == "__main__":
    sys.exit(main())
