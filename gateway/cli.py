"""The gateway console script: run, db migrate, apikey create/list/revoke."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiomqtt
import asyncpg
import structlog

from gateway import auth, config, logs
from gateway.config import Config, ConfigError, redact_url
from gateway.errors import ProcessConflict, StorageUnavailable
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
    parser = argparse.ArgumentParser(
        prog="gateway", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    run.add_argument("--dynsec", action="store_true", default=None,
                     help="issue device broker credentials with Mosquitto's dynamic "
                          "security plugin (default: off; env GATEWAY_DYNSEC=1)")

    db = commands.add_parser("db", help="database commands").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    migrate_cmd = db.add_parser("migrate", help="create the database if missing and apply "
                                "the schema; safe to run again")
    _database_flags(migrate_cmd)

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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    except aiomqtt.MqttError as exc:
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


def _event_loop_run(coroutine: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


if __name__ == "__main__":
    sys.exit(main())
