"""The gateway console script: run, db migrate, apikey create/list/revoke, and the registry
commands (devices, settings, commands, events, call), a client of a running gateway."""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import csv
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import aiomqtt
import asyncpg
import msgspec
import structlog
from gateway_codecs import registry
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from gateway import asyncapi, auth, config, demo, logs, simulator
from gateway.client import (
    ApiError,
    ConnectionLost,
    GatewayClient,
    RegisteredBatch,
    RequestTimeout,
    error_from,
)
from gateway.config import Config, ConfigError, redact_url
from gateway.errors import ProcessConflict, StorageUnavailable
from gateway.heartbeat_link import LinkError
from gateway.storage import Storage, migrate
from gateway.storage.database import iso
from gateway.storage.keys import ApiKey

DESCRIPTION = """\
An MQTT device gateway: device heartbeats into PostgreSQL, commands and settings out to
devices, and a device registry served to backends over MQTT request/reply.

Configuration comes from flags or GATEWAY_* environment variables; flags win."""

_ENV_OF = {field: variable for variable, field in config.ENV_FIELDS.items()}
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Config)}

# The flags of `gateway run`: (flag, Config field, metavar, help).
RUN_FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("--mqtt-url", "mqtt_url", "URL", "broker URL; mqtts:// for TLS; user:password@ allowed"),
    ("--database-url", "database_url", "URL", "PostgreSQL URL"),
    ("--metrics-addr", "metrics_addr", "HOST:PORT", "address of /metrics and /healthz"),
    ("--topic-prefix", "topic_prefix", "PREFIX", "prefix of every topic"),
    ("--share-group", "share_group", "GROUP",
     "MQTT 5 shared subscription group of several gateways"),
    ("--client-id", "client_id", "ID", "MQTT client id of the gateway's persistent session"),
    ("--log-format", "log_format", "", "log lines as json or console"),
    ("--log-level", "log_level", "LEVEL", "debug, info, warning or error"),
)


def _help(field: str, text: str) -> str:
    default = _DEFAULTS[field]
    shown = "unset" if default is None else (repr(default) if default == "" else default)
    if field == "log_format":
        shown = "console when stderr is a terminal, else json"
    return f"{text} (default: {shown}; env {_ENV_OF[field]})"


def _database_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that only talk to the database."""
    parser.add_argument("--database-url", dest="database_url",
                        help=_help("database_url", "PostgreSQL URL"), metavar="URL")
    parser.add_argument("--log-format", dest="log_format", choices=("json", "console"),
                        help=_help("log_format", "log lines as json or console"))
    parser.add_argument("--log-level", dest="log_level", metavar="LEVEL",
                        help=_help("log_level", "debug, info, warning or error"))


def _parser() -> argparse.ArgumentParser:
    """The console script's parser: one function per command group below, in the order
    ``gateway --help`` lists them. A new command is one more function and one line here;
    a command that answers through the registry sets ``handler`` (see `_client_main`)."""
    parser = argparse.ArgumentParser(
        prog="gateway", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_command(commands)
    _db_commands(commands)
    _apikey_commands(commands)
    client = _client_flags()
    _devices_commands(commands, client)
    _settings_commands(commands, client)
    _commands_commands(commands, client)
    _events_commands(commands, client)
    _call_command(commands, client)
    _tool_commands(commands)
    return parser


Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _run_command(commands: Subcommands) -> None:
    run = commands.add_parser("run", help="run the gateway until SIGINT or SIGTERM",
                              description="Run the gateway until SIGINT or SIGTERM, then "
                                          "drain accepted work and exit 0.")
    for flag, field, metavar, text in RUN_FLAGS:
        kwargs: dict[str, Any] = {"help": _help(field, text), "metavar": metavar}
        if field == "log_format":
            kwargs = {"help": _help(field, text), "choices": ("json", "console")}
        run.add_argument(flag, dest=field, **kwargs)
    run.add_argument("--workers", dest="workers", type=int, metavar="N",
                     help=_help("workers", "gateway processes under one supervisor; with "
                                           "more than 1 the share group defaults to "
                                           "'gateway'"))
    run.add_argument("--worker", dest="worker", type=int, help=argparse.SUPPRESS)
    run.add_argument("--offline-after-seconds", dest="offline_after_seconds", type=float,
                     metavar="SECONDS",
                     help=_help("offline_after_seconds", "a device without a heartbeat for "
                                                         "this long is offline"))
    run.add_argument("--events-retention-days", dest="events_retention_days", type=float,
                     metavar="DAYS",
                     help=_help("events_retention_days", "published events are kept this "
                                                         "long"))
    run.add_argument("--dynsec", action="store_true", default=None,
                     help="issue device broker credentials with Mosquitto's dynamic "
                          "security plugin (default: off; env GATEWAY_DYNSEC=1)")
    run.add_argument("--database-credentials", action="store_true", default=None,
                     help="issue device broker credentials into PostgreSQL only, for a "
                          "broker that authenticates devices from it, such as EMQX "
                          "(default: off; env GATEWAY_DATABASE_CREDENTIALS=1)")


def _db_commands(commands: Subcommands) -> None:
    db = commands.add_parser("db", help="database commands").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    migrate_cmd = db.add_parser("migrate", help="create the database if missing and apply "
                                "the schema; safe to run again")
    _database_flags(migrate_cmd)


def _apikey_commands(commands: Subcommands) -> None:
    keys = commands.add_parser("apikey", help="API keys for backends").add_subparsers(
        dest="apikey_command", required=True, metavar="COMMAND"
    )
    create = keys.add_parser("create", help="create a key and print it, alone, last")
    create.add_argument("--scope", action="append", required=True, choices=auth.SCOPES,
                        help="a scope of the key; repeat for several")
    create.add_argument("--name", help="a name to recognise the key by")
    _database_flags(create)
    listing = keys.add_parser("list", help="list keys: id, name, scopes, created, revoked "
                              "(never a secret)")
    _database_flags(listing)
    revoke = keys.add_parser("revoke", help="revoke a key; it stops working at once")
    revoke.add_argument("key", metavar="KEY_ID_OR_KEY",
                        help="the key id (first column of `gateway apikey list`) or the "
                             "whole key")
    _database_flags(revoke)


async def _run(cfg: Config) -> int:
    if cfg.workers > 1 and cfg.worker is None:
        from gateway.supervisor import Supervisor

        return await Supervisor(cfg).run()
    from gateway.app import serve

    await serve(cfg)
    return 0


async def _migrate(cfg: Config) -> int:
    created = await migrate(cfg.database_url)
    print(f"{'created database and ' if created else ''}applied schema to "
          f"{redact_url(cfg.database_url)}")
    return 0


async def _with_storage(cfg: Config, action: Callable[[Storage], Coroutine[Any, Any, int]]) -> int:
    async with Storage.open(cfg.database_url, timeout=cfg.db_timeout_seconds, min_size=1,
                            max_size=2) as storage:
        return await action(storage)


async def _apikey_create(cfg: Config, scopes: list[str], name: str | None) -> int:
    key = auth.new_key()
    chosen = sorted(set(scopes))

    async def action(storage: Storage) -> int:
        await storage.keys.create(key.key_id, name, key.key_hash, chosen)
        print(f"created {key.key_id} with scopes {','.join(chosen)}; the key is shown once:")
        print(key.secret)
        return 0

    return await _with_storage(cfg, action)


def key_lines(keys: Sequence[ApiKey], *, header: bool) -> list[str]:
    """`apikey list`: one tab-separated line per key, its id first; a header on request."""
    lines = ["ID\tNAME\tSCOPES\tCREATED\tREVOKED"] if header else []
    for key in keys:
        revoked = iso(key.revoked_at) if key.revoked_at else "-"
        lines.append(f"{key.id}\t{key.name or '-'}\t{','.join(key.scopes)}\t"
                     f"{iso(key.created_at)}\t{revoked}")
    return lines


async def _apikey_list(cfg: Config) -> int:
    async def action(storage: Storage) -> int:
        # A header for people; scripts reading a pipe get one line per key.
        for line in key_lines(await storage.keys.all(), header=sys.stdout.isatty()):
            print(line)
        return 0

    return await _with_storage(cfg, action)


async def _apikey_revoke(cfg: Config, key_id: str) -> int:
    async def action(storage: Storage) -> int:
        result = await storage.keys.revoke(key_id)
        if result is None:
            print(f"gateway: no API key {key_id}", file=sys.stderr)
            return 1
        key, newly = result
        if newly:
            print(f"revoked {key_id}")
        else:
            assert key.revoked_at is not None
            print(f"{key_id} was already revoked at {iso(key.revoked_at)}")
        return 0

    return await _with_storage(cfg, action)


def revoked_key_id(given: str) -> str | None:
    """The key id from a key id (``key_...``) or a whole key (``sk_live_...``)."""
    if given.startswith(auth.KEY_PREFIX):
        return auth.key_id_of(given)
    if given.startswith("key_") and given[4:].isascii() and given[4:].isalnum():
        return given
    return None


# ---- registry commands: a client of a running gateway, over MQTT ------------------------

CLIENT_DEFAULT_URL = "mqtt://127.0.0.1:1883"


class UsageError(Exception):
    """A command line that cannot be used (exit 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientOptions:
    """How the registry commands reach the gateway: flags, else GATEWAY_* variables."""

    mqtt_url: str
    topic_prefix: str
    api_key: str = dataclasses.field(repr=False)
    protocol: str
    timeout: float
    json: bool

    @classmethod
    def load(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> ClientOptions:
        api_key = args.api_key or environ.get("GATEWAY_API_KEY")
        if not api_key:
            raise UsageError("no API key: set GATEWAY_API_KEY or pass --api-key")
        if args.timeout <= 0:
            raise UsageError("--timeout must be more than 0 seconds")
        mqtt_url = args.mqtt_url or environ.get("GATEWAY_MQTT_URL") or CLIENT_DEFAULT_URL
        try:
            config.MqttEndpoint.parse(mqtt_url)
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
        prefix = args.topic_prefix
        if prefix is None:
            prefix = environ.get("GATEWAY_TOPIC_PREFIX", "")
        return cls(mqtt_url, prefix, api_key, args.protocol, args.timeout, args.json)


Handler = Callable[[GatewayClient, argparse.Namespace, "Output"], Coroutine[Any, Any, int]]


def _client_flags() -> argparse.ArgumentParser:
    """The flags every registry command takes, as a parent parser."""
    parent = argparse.ArgumentParser(add_help=False)
    flags = parent.add_argument_group("connection")
    flags.add_argument("--mqtt-url", metavar="URL",
                       help=f"the gateway's broker (default: {CLIENT_DEFAULT_URL}; env "
                            "GATEWAY_MQTT_URL)")
    flags.add_argument("--topic-prefix", metavar="PREFIX",
                       help="the gateway's topic prefix (default: ''; env "
                            "GATEWAY_TOPIC_PREFIX)")
    flags.add_argument("--api-key", metavar="KEY",
                       help="the API key (default: unset; env GATEWAY_API_KEY)")
    flags.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                       help="the MQTT version (default: 5)")
    flags.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                       help="seconds to wait for each answer (default: 10)")
    flags.add_argument("--json", action="store_true",
                       help="print the response body as JSON instead of a table")
    return parent


def _client_command(group: Subcommands, name: str, handler: Handler, help: str,
                    parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command = group.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                               parents=[parent])
    command.set_defaults(handler=handler)
    return command


def _group(commands: Subcommands, name: str, help: str) -> Subcommands:
    return commands.add_parser(name, help=help).add_subparsers(
        dest=f"{name}_command", required=True, metavar="COMMAND")


def _list_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--limit", type=_positive, default=20, metavar="N",
                         help="show at most N (default: 20)")
    command.add_argument("--all", action="store_true", help="show every one, page by page")
    command.add_argument("--starting-after", metavar="ID",
                         help="start after this one (the last id of a previous listing)")


def _devices_commands(commands: Subcommands, client: argparse.ArgumentParser) -> None:
    group = _group(commands, "devices", "the device registry (a running gateway)")
    listing = _client_command(group, "list", _devices_list, "list devices, newest first",
                              client)
    listing.add_argument("--status", choices=("bound", "unbound"))
    listing.add_argument("--end-user-id", metavar="ID")
    listing.add_argument("--serial-number", metavar="SERIAL")
    _list_flags(listing)
    _client_command(group, "get", _devices_get, "show a device", client).add_argument(
        "device_id", metavar="DEVICE_ID")
    register = _client_command(group, "register", _devices_register,
                               "register a device (again: it is shown unchanged)", client)
    register.add_argument("serial_number", metavar="SERIAL")
    register.add_argument("--device-type", metavar="TYPE")
    register.add_argument("--firmware-version", metavar="VERSION")
    register.add_argument("--metadata", type=_json_object, metavar="JSON",
                          help="a JSON object, or @FILE")
    imports = _client_command(
        group, "import", _devices_import,
        "register the devices of a CSV file (a serial_number column; device_type, "
        "firmware_version and metadata optional) or of JSON lines, in batches; safe to run "
        "again", client)
    imports.add_argument("file", metavar="FILE")
    imports.add_argument("--format", choices=("csv", "jsonl"),
                         help="the file's format (default: JSON lines when it starts with "
                              "'{', else CSV)")
    imports.add_argument("--batch-size", type=_positive, default=registry.MAX_BATCH,
                         metavar="N", help=f"devices per request (default: {registry.MAX_BATCH})")
    imports.add_argument("--concurrency", type=_positive, default=4, metavar="N",
                         help="requests in flight (default: 4)")
    bind = _client_command(group, "bind", _devices_action, "bind a device to an end user",
                           client)
    bind.add_argument("device_id", metavar="DEVICE_ID")
    bind.add_argument("end_user_id", metavar="END_USER_ID")
    for name, text in (("unbind", "unbind a device"),
                       ("reset", "unbind a device and queue a factory reset"),
                       ("delete", "delete a device (restore undoes it)"),
                       ("restore", "restore a deleted device"),
                       ("credentials", "issue or rotate a device's broker password (shown "
                                       "once)")):
        _client_command(group, name, _devices_action, text, client).add_argument(
            "device_id", metavar="DEVICE_ID")


def _settings_commands(commands: Subcommands, client: argparse.ArgumentParser) -> None:
    group = _group(commands, "settings", "a device's settings (a running gateway)")
    _client_command(group, "get", _settings_get, "show a device's settings",
                    client).add_argument("device_id", metavar="DEVICE_ID")
    for name, text in (("put", "replace a device's settings (omitted fields take their "
                               "defaults)"),
                       ("patch", "change a device's settings with a JSON merge patch")):
        write = _client_command(group, name, _settings_write, text, client)
        write.add_argument("device_id", metavar="DEVICE_ID")
        write.add_argument("document", type=_json_object, metavar="JSON",
                           help="a JSON object, or @FILE")
        write.add_argument("--if-match", type=int, metavar="VERSION",
                           help="only if the settings are at this version")


def _commands_commands(commands: Subcommands, client: argparse.ArgumentParser) -> None:
    group = _group(commands, "commands", "commands to devices (a running gateway)")
    send = _client_command(group, "send", _commands_send, "queue a command for a device",
                           client)
    send.add_argument("device_id", metavar="DEVICE_ID")
    send.add_argument("type", metavar="TYPE")
    send.add_argument("--params", type=_json_object, metavar="JSON",
                      help="the command's parameters: a JSON object, or @FILE")
    send.add_argument("--ttl", type=_positive, default=registry.DEFAULT_TTL_SECONDS,
                      metavar="SECONDS",
                      help=f"expiry (default: {registry.DEFAULT_TTL_SECONDS})")
    send.add_argument("--idempotency-key", metavar="KEY",
                      help="a key that makes sending again return the same command")
    listing = _client_command(group, "list", _commands_list,
                              "list a device's commands, newest first", client)
    listing.add_argument("device_id", metavar="DEVICE_ID")
    listing.add_argument("--status", choices=registry.COMMAND_STATUSES)
    _list_flags(listing)
    for name, text in (("get", "show a command"), ("cancel", "cancel an open command")):
        _client_command(group, name, _commands_action, text, client).add_argument(
            "command_id", metavar="COMMAND_ID")


def _events_commands(commands: Subcommands, client: argparse.ArgumentParser) -> None:
    group = _group(commands, "events", "what changed, as events (a running gateway)")
    listing = _client_command(group, "list", _events_list, "list events, oldest first",
                              client)
    listing.add_argument("--limit", type=_positive, metavar="N",
                         help="at most N (1 to 1000; default: 100)")
    follow = _client_command(group, "follow", _events_follow,
                             "print events as they happen, after catching up; Ctrl-C ends",
                             client)
    for command in (listing, follow):
        command.add_argument("--after", metavar="EVENT_ID",
                             help="only events after this one")
        command.add_argument("--type", metavar="TYPE", help="only events of this type")
        command.add_argument("--device-id", metavar="DEVICE_ID",
                             help="only events of this device")


def _call_command(commands: Subcommands, client: argparse.ArgumentParser) -> None:
    call = _client_command(commands, "call", _call,
                           "call any route: METHOD PATH [JSON_BODY]", client)
    call.add_argument("method", metavar="METHOD")
    call.add_argument("path", metavar="PATH", help="such as /v1/devices?limit=5")
    call.add_argument("body", nargs="?", type=_json_value, metavar="JSON_BODY",
                      help="the request body as JSON, or @FILE")
    call.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE",
                      help="a request header; repeat for several")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text!r}")
    return value


def _json_value(text: str) -> Any:
    """JSON given on the command line, or ``@FILE``: the JSON in that file."""
    try:
        if text.startswith("@"):
            with open(text[1:], "rb") as file:
                return msgspec.json.decode(file.read())
        return msgspec.json.decode(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from exc
    except msgspec.DecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc


def _json_object(text: str) -> dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


# ---- output ---------------------------------------------------------------------------------

# The columns of a listing, by the object its items are.
_COLUMNS = {
    "device": ("id", "serial_number", "device_type", "status", "end_user_id",
               "firmware_version", "battery_percent", "last_heartbeat_at"),
    "command": ("id", "device_id", "type", "status", "attempts", "created_at", "expires_at"),
    "event": ("id", "type", "device_id", "created_at"),
}


class Output:
    """What a command prints on stdout: the answer's body as JSON with ``--json``, else a
    table made with rich."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.console = Console(highlight=False)

    def show(self, answer: Any) -> None:
        body = msgspec.to_builtins(answer)
        if self.json:
            sys.stdout.write(msgspec.json.encode(body).decode() + "\n")
        elif isinstance(body, dict) and body.get("object") == "list" and isinstance(
                body.get("data"), list):
            self.console.print(_table(body["data"]))
        elif isinstance(body, dict):
            table = Table("field", "value", show_header=False)
            for name, value in _fields(body):
                table.add_row(name, _cell(value))
            self.console.print(table)
        else:
            self.console.print(_cell(body))


def _fields(body: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    """A document's fields by dotted path (settings), or an object's own (devices)."""
    for name, value in body.items():
        where = f"{path}{name}"
        if isinstance(value, dict) and (name == "settings" or path):
            yield from _fields(value, where + ".")
        else:
            yield where, value


def _table(items: list[Any]) -> Table:
    kind = items[0].get("object") if items and isinstance(items[0], dict) else None
    columns = _COLUMNS.get(kind or "") or tuple(
        name for name, value in (items[0].items() if items and isinstance(items[0], dict)
                                 else ()) if not isinstance(value, dict | list))
    table = Table(*(name.upper() for name in columns or ("value",)))
    for item in items:
        if isinstance(item, dict) and columns:
            table.add_row(*(_cell(item.get(name)) for name in columns))
        else:
            table.add_row(_cell(item))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def _error_line(exc: ApiError) -> str:
    """``404 not_found: No such object``, with any bad fields after the message."""
    line = f"{exc.status} {exc.type}: {exc.message}"
    if exc.details:
        line += " (" + "; ".join(f"{d['field']}: {d['error']}" for d in exc.details) + ")"
    return line


# ---- the commands -----------------------------------------------------------------------------


async def _listing(items: AsyncIterator[Any], args: argparse.Namespace) -> dict[str, Any]:
    """The first ``--limit`` items (every one with ``--all``) as a list body."""
    data: list[Any] = []
    has_more = False
    async for item in items:
        if not args.all and len(data) == args.limit:
            has_more = True
            break
        data.append(item)
    return {"object": "list", "data": data, "has_more": has_more}


async def _devices_list(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    out.show(await _listing(gw.devices.list(
        status=args.status, end_user_id=args.end_user_id, serial_number=args.serial_number,
        starting_after=args.starting_after, page_size=100 if args.all else args.limit + 1,
    ), args))
    return 0


async def _devices_get(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    out.show(await gw.devices.get(args.device_id))
    return 0


async def _devices_register(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    [result] = await gw.devices.register_many([registry.RegisterDevice(
        serial_number=args.serial_number, device_type=args.device_type,
        firmware_version=args.firmware_version, metadata=args.metadata)])
    if result.device is msgspec.UNSET:
        assert not isinstance(result.error, msgspec.UnsetType)
        raise error_from(result.status, registry.ErrorBody(result.error))
    if not out.json:
        out.console.print("registered" if result.status == 201 else "already registered")
    out.show(result.device)
    return 0


async def _devices_action(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    """bind, unbind, reset, delete, restore, credentials: one device, one answer."""
    action = args.devices_command
    if action == "bind":
        out.show(await gw.devices.bind(args.device_id, args.end_user_id))
    else:
        out.show(await getattr(gw.devices, action)(args.device_id))
    return 0


async def _settings_get(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    out.show(await gw.settings.get(args.device_id))
    return 0


async def _settings_write(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    write = gw.settings.put if args.settings_command == "put" else gw.settings.patch
    out.show(await write(args.device_id, args.document, if_match=args.if_match))
    return 0


async def _commands_send(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    out.show(await gw.commands.send(args.device_id, args.type, params=args.params,
                                    ttl_seconds=args.ttl,
                                    idempotency_key=args.idempotency_key))
    return 0


async def _commands_list(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    out.show(await _listing(gw.commands.list(
        args.device_id, status=args.status, starting_after=args.starting_after,
        page_size=100 if args.all else args.limit + 1), args))
    return 0


async def _commands_action(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    method = gw.commands.get if args.commands_command == "get" else gw.commands.cancel
    out.show(await method(args.command_id))
    return 0


async def _events_list(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    out.show(await gw.events.list(after=args.after, limit=args.limit, type=args.type,
                                  device_id=args.device_id))
    return 0


async def _events_follow(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    async for event in gw.events.follow(after=args.after, type=args.type,
                                        device_id=args.device_id):
        if out.json:
            out.show(event)
        else:
            out.console.print(f"{event.id}  {event.type:<24}  {event.device_id}  "
                              f"{event.created_at}")
        sys.stdout.flush()
    return 0


async def _call(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"a header is NAME:VALUE, not {header!r}")
        headers[name.strip()] = value.strip()
    status, body = await gw.call(args.method.upper(), args.path, args.body, headers=headers)
    if status >= 400:
        raise error_from(status, body)
    out.show(body)
    return 0


async def _devices_import(gw: GatewayClient, args: argparse.Namespace, out: Output) -> int:
    source = ImportFile.open(args.file, args.format)
    summary = ImportSummary()
    progress = Progress(
        TextColumn("registering"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
        TimeRemainingColumn(), console=Console(stderr=True),
    )
    try:
        with progress:
            task = progress.add_task("import", total=source.count())
            async for batch in gw.devices.register_batches(
                source.items(summary), batch_size=args.batch_size,
                concurrency=args.concurrency,
            ):
                summary.add(batch, source.lines)
                progress.advance(task, len(batch.results))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"gateway: interrupted after {summary.done:,} devices; registering is "
              "idempotent: run the same command again to finish", file=sys.stderr)
        raise
    summary.print(out)
    return 1 if summary.failed else 0


class _RateColumn(ProgressColumn):
    """Devices a second, as rich estimates it."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} devices/s" if task.speed else "")


@dataclasses.dataclass
class ImportFile:
    """A file of devices to import: CSV with a header, or JSON lines.

    `items` yields each device's body (what `POST /v1/devices` takes) and records the
    line it came from in ``lines`` (by item index); rows that are not a device body at
    all (a JSON line that is not an object) are counted as failed there and then.
    """

    CSV_COLUMNS: ClassVar[tuple[str, ...]] = (
        "serial_number", "device_type", "firmware_version", "metadata")

    path: str
    format: str
    lines: array.array[int] = dataclasses.field(default_factory=lambda: array.array("Q"))

    @classmethod
    def open(cls, path: str, given: str | None) -> ImportFile:
        try:
            with open(path, encoding="utf-8-sig") as file:
                head = file.read(4096)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path} is not UTF-8 text") from exc
        found = given or ("jsonl" if head.lstrip().startswith("{") else "csv")
        if found == "csv":
            header = next(csv.reader([head.splitlines()[0] if head else ""]), [])
            columns = [name.strip() for name in header]
            unknown = sorted(set(columns) - set(cls.CSV_COLUMNS))
            if "serial_number" not in columns or unknown:
                raise UsageError(
                    f"{path}: a CSV file needs a header with a serial_number column, and "
                    f"may have {', '.join(cls.CSV_COLUMNS[1:])}"
                    + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        return cls(path, found)

    def count(self) -> int:
        """How many devices the file holds (for the progress bar)."""
        return sum(1 for _, row in self._records() if row is not None)

    def _records(self) -> Iterator[tuple[int, Any]]:
        """(line number, the row as a mapping, or None for one that is not an object)."""
        with open(self.path, encoding="utf-8-sig", newline="") as file:
            if self.format == "csv":
                reader = csv.DictReader(file)
                for row in reader:
                    if any(value for value in row.values()):
                        yield reader.line_num, row
                return
            for number, line in enumerate(file, 1):
                if line.strip():
                    try:
                        document = msgspec.json.decode(line)
                    except msgspec.DecodeError:
                        document = None
                    yield number, document if isinstance(document, dict) else None

    def items(self, summary: ImportSummary) -> Iterator[dict[str, Any]]:
        for line, row in self._records():
            if row is None:
                summary.fail(line, None, "not a JSON object")
                continue
            self.lines.append(line)
            yield self._body(row) if self.format == "csv" else row

    @staticmethod
    def _body(row: Mapping[str, str | None]) -> dict[str, Any]:
        """A CSV row as a registration body: empty cells left out, metadata as JSON (text
        that is not JSON is sent as it is, and refused by the gateway as not an object)."""
        body: dict[str, Any] = {name.strip(): value for name, value in row.items()
                                if name is not None and value not in (None, "")}
        if "metadata" in body:
            with contextlib.suppress(msgspec.DecodeError):
                body["metadata"] = msgspec.json.decode(body["metadata"])
        return body


@dataclasses.dataclass
class ImportSummary:
    """What an import did: counts, and the failures with their reasons."""

    KEEP: ClassVar[int] = 1000  # failures kept with their reason; the rest are counted

    created: int = 0
    registered: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> int:
        return self.created + self.registered + self.failed

    def fail(self, line: int, serial: Any, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < self.KEEP:
            self.failures.append({"line": line, "serial_number": serial, "reason": reason})

    def add(self, batch: RegisteredBatch, lines: array.array[int]) -> None:
        for offset, (item, result) in enumerate(zip(batch.items, batch.results, strict=True)):
            if result.status == 201:
                self.created += 1
            elif result.status == 200:
                self.registered += 1
            else:
                assert not isinstance(result.error, msgspec.UnsetType)
                serial = item.get("serial_number") if isinstance(item, Mapping) else None
                self.fail(lines[batch.start + offset], serial, _error_line(error_from(
                    result.status, registry.ErrorBody(result.error))))

    def print(self, out: Output) -> None:
        if out.json:
            out.show({"created": self.created, "already_registered": self.registered,
                      "failed": self.failed, "failures": self.failures})
            return
        table = Table("", "devices", show_header=False)
        table.add_row("created", f"{self.created:,}")
        table.add_row("already registered", f"{self.registered:,}")
        table.add_row("failed", f"{self.failed:,}")
        out.console.print(table)
        for failure in self.failures[:20]:
            out.console.print(f"line {failure['line']} ({failure['serial_number'] or '-'}): "
                              f"{failure['reason']}")
        if self.failed > 20:
            out.console.print(f"... and {self.failed - 20:,} more failures (--json lists "
                              f"{min(self.failed, self.KEEP):,})")


async def _with_client(options: ClientOptions, args: argparse.Namespace) -> int:
    async with GatewayClient(options.mqtt_url, api_key=options.api_key,
                             topic_prefix=options.topic_prefix, protocol=options.protocol,
                             timeout=options.timeout) as gw:
        handler: Handler = args.handler
        return await handler(gw, args, Output(options.json))


def _client_main(args: argparse.Namespace) -> int:
    """Run a registry command: exit 0, 1 with one line on stderr for an error answer (or
    no answer), 2 for a command line that cannot be used."""
    try:
        options = ClientOptions.load(args, os.environ)
        return _event_loop_run(_with_client(options, args))
    except UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(_error_line(exc), file=sys.stderr)
    except RequestTimeout as exc:
        print(f"gateway: {exc}: is a gateway running on {redact_url(options.mqtt_url)} "
              f"with topic prefix {options.topic_prefix!r}?", file=sys.stderr)
    except ConnectionLost as exc:
        print(f"gateway: broker {redact_url(options.mqtt_url)}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "handler", None) is not None:
        return _client_main(args)
    if getattr(args, "tool", None) is not None:
        return _tool_main(args)
    flags = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(Config)}
    try:
        cfg = config.from_os(flags)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(cfg.log_format, cfg.log_level)
    if cfg.worker is not None:
        structlog.contextvars.bind_contextvars(worker=cfg.worker)
    if args.command == "run":
        coroutine = _run(cfg)
    elif args.command == "db":
        coroutine = _migrate(cfg)
    elif args.apikey_command == "create":
        coroutine = _apikey_create(cfg, args.scope, args.name)
    elif args.apikey_command == "list":
        coroutine = _apikey_list(cfg)
    else:
        key_id = revoked_key_id(args.key)
        if key_id is None:
            print("gateway: apikey revoke takes a key id (key_...) or a whole key "
                  f"(sk_live_...), not {args.key[:40]!r}", file=sys.stderr)
            return 2
        coroutine = _apikey_revoke(cfg, key_id)
    try:
        return _event_loop_run(coroutine)
    except StorageUnavailable as exc:
        print(f"gateway: database {redact_url(cfg.database_url)}: {exc}", file=sys.stderr)
    except ProcessConflict as exc:
        print(f"gateway: refused to start: {exc}", file=sys.stderr)
    except (aiomqtt.MqttError, LinkError) as exc:
        print(f"gateway: broker unreachable at {redact_url(cfg.mqtt_url)}: {exc}",
              file=sys.stderr)
    except asyncpg.UndefinedTableError:
        print(f"gateway: no gateway schema in {redact_url(cfg.database_url)}; "
              "run `gateway db migrate`", file=sys.stderr)
    except OSError as exc:  # e.g. the metrics address is already taken
        print(f"gateway: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 0
    structlog.get_logger("gateway").debug("gateway.exit", code=1)
    return 1


# Tools with their own options, run as they are (``tool``, see `main`).
TOOLS: tuple[tuple[str, Any, str], ...] = (
    ("simulate", simulator, "a fleet of simulated devices, until Ctrl-C"),
    ("demo", demo, "the whole stack on this machine, until Ctrl-C"),
    ("asyncapi", asyncapi, "print the AsyncAPI 3.0 document of every topic and payload"),
)


def _tool_commands(commands: Subcommands) -> None:
    for name, module, text in TOOLS:
        tool = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        module.add_arguments(tool)
        tool.set_defaults(tool=module.run)


def _tool_main(args: argparse.Namespace) -> int:
    """A tool: library warnings to stderr, stdout left to the tool."""
    logs.configure("console", "warning")
    try:
        code: int = _event_loop_run(args.tool(args))
    except KeyboardInterrupt:
        return 130
    return code


def _event_loop_run(coroutine: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


if __name__ == "__main__":
    sys.exit(main())
