"""The ``gateway`` console script: run, db migrate, apikey create/list/revoke."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiomqtt
import asyncpg
import structlog

from gateway import auth, config, logs
from gateway.config import Config, ConfigError, redact_url
from gateway.errors import StorageUnavailable
from gateway.storage import Storage, migrate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--mqtt-url", help="broker URL (GATEWAY_MQTT_URL)")
    common.add_argument("--database-url", help="PostgreSQL URL (GATEWAY_DATABASE_URL)")
    common.add_argument("--metrics-addr", help="HOST:PORT for /metrics (GATEWAY_METRICS_ADDR)")
    common.add_argument("--topic-prefix", help="topic prefix (GATEWAY_TOPIC_PREFIX)")
    common.add_argument("--share-group", help="MQTT 5 shared subscription group")
    common.add_argument("--log-format", choices=("json", "console"))
    common.add_argument("--log-level", help="debug, info, warning, error")
    common.add_argument("--client-id", help="MQTT client id of the persistent session")
    common.add_argument("--dynsec", action="store_true", default=None,
                        help="issue device broker credentials with Mosquitto's dynamic "
                             "security plugin (GATEWAY_DYNSEC=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", parents=[common], help="run the gateway until SIGINT/SIGTERM")
    db = commands.add_parser("db", help="database commands").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("migrate", parents=[common], help="create the database and apply schema.sql")

    keys = commands.add_parser("apikey", help="API keys").add_subparsers(
        dest="apikey_command", required=True
    )
    create = keys.add_parser("create", parents=[common], help="create a key and print it")
    create.add_argument("--scope", action="append", required=True, choices=auth.SCOPES)
    create.add_argument("--name")
    keys.add_parser("list", parents=[common], help="list keys (never their secrets)")
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key by id")
    revoke.add_argument("key_id")
    return parser


_CONFIG_FLAGS = (
    "mqtt_url", "database_url", "metrics_addr", "topic_prefix", "share_group", "log_format",
    "log_level", "client_id", "dynsec",
)


async def _run(cfg: Config) -> int:
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

    async def action(storage: Storage) -> int:
        await storage.create_api_key(key.key_id, name, key.key_hash, sorted(set(scopes)))
        print(f"created {key.key_id} with scopes {','.join(sorted(set(scopes)))}; "
              "the key is shown once:")
        print(key.secret)
        return 0

    return await _with_storage(cfg, action)


async def _apikey_list(cfg: Config) -> int:
    async def action(storage: Storage) -> int:
        for row in await storage.list_api_keys():
            revoked = row["revoked_at"].isoformat() if row["revoked_at"] else "-"
            print(f"{row['id']}\t{row['name'] or '-'}\t{','.join(row['scopes'])}\t"
                  f"{row['created_at'].isoformat()}\t{revoked}")
        return 0

    return await _with_storage(cfg, action)


async def _apikey_revoke(cfg: Config, key_id: str) -> int:
    async def action(storage: Storage) -> int:
        if not await storage.revoke_api_key(key_id):
            print(f"gateway: no API key {key_id}", file=sys.stderr)
            return 1
        print(f"revoked {key_id}")
        return 0

    return await _with_storage(cfg, action)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config.from_os({name: getattr(args, name, None) for name in _CONFIG_FLAGS})
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(cfg.log_format, cfg.log_level)
    if args.command == "run":
        coroutine = _run(cfg)
    elif args.command == "db":
        coroutine = _migrate(cfg)
    elif args.apikey_command == "create":
        coroutine = _apikey_create(cfg, args.scope, args.name)
    elif args.apikey_command == "list":
        coroutine = _apikey_list(cfg)
    else:
        coroutine = _apikey_revoke(cfg, args.key_id)
    try:
        return _event_loop_run(coroutine)
    except StorageUnavailable as exc:
        print(f"gateway: database {redact_url(cfg.database_url)}: {exc}",
              file=sys.stderr)
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
