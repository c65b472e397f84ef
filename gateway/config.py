"""The gateway's configuration: one frozen object, built at the entry point."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.errors import ConfigError
from gateway.storage.presence import OFFLINE_AFTER_SECONDS

__all__ = ["Config", "ConfigError", "MqttEndpoint", "from_os", "load", "redact_url"]


@dataclasses.dataclass(frozen=True, slots=True)
class MqttEndpoint:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None = dataclasses.field(repr=False)

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(
                f"MQTT URL must start with mqtt:// or mqtts://, got {redact_url(url)!r}"
            )
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"invalid port in MQTT URL {redact_url(url)!r}") from exc
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


_QUERY_PASSWORD = re.compile(r"(?i)((?:^|&)password=)[^&]*")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages.

    Both places a URL can hold one: the user info, and a ``password=`` query parameter
    (libpq and asyncpg read it).
    """
    parts = urlsplit(url)
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    if parts.password is None and query == parts.query:
        return url
    if parts.password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}")
    return parts._replace(query=query).geturl()


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/gateway"
    metrics_addr: str = "127.0.0.1:9108"
    topic_prefix: str = ""
    share_group: str | None = None
    log_format: str = "json"
    log_level: str = "info"
    # A stable client id and a persistent session let the broker keep QoS 1 messages for
    # the gateway while it reconnects. Empty: a random id and a clean session. In a share
    # group the session ends with the connection (see `persistent_sessions`).
    client_id: str = "gateway"
    session_expiry_seconds: int = 3600
    # The broker drops a connection silent for 1.5 times this: how soon it notices a
    # process whose host is gone (one that exits or is killed closes its sockets at once).
    mqtt_keepalive_seconds: int = 2
    # `gateway run --workers N`: N processes under a supervisor; `worker` is set in each.
    workers: int = 1
    worker: int | None = None
    # Names this process's connections when `client_id` is empty.
    instance: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Heartbeat pipeline. `inbox_max` bounds the buffer, and is also the heartbeat
    # connection's in-flight window (Receive Maximum, at most 65535): heartbeats are
    # acknowledged once committed, so the broker never sends more than the buffer holds.
    batch_max: int = 2000
    batch_wait_ms: float = 5.0
    inbox_max: int = 20_000
    heartbeat_sync_commit: bool = False
    # Request/reply.
    request_workers: int = 64
    request_queue_max: int = 4096
    # Database.
    db_pool_min: int = 2
    db_pool_max: int = 12
    db_timeout_seconds: float = 5.0
    # Seconds to finish accepted work after SIGTERM before giving up.
    drain_seconds: float = 10.0
    # Per-device broker credentials through Mosquitto's dynamic security plugin.
    dynsec: bool = False
    # Device credentials in PostgreSQL only, for a broker that reads them there (EMQX).
    database_credentials: bool = False
    # Periodic work, in seconds. Sweeps are claimed in the database, so each runs once per
    # period whatever the number of gateway processes.
    health_interval_seconds: float = 2.0
    health_recheck_seconds: float = 0.5  # while the database is down
    command_sweep_seconds: float = 5.0
    revocation_pass_seconds: float = 30.0
    history_prune_seconds: float = 3600.0
    # Presence and events (protocol §11, §12).
    offline_after_seconds: float = OFFLINE_AFTER_SECONDS
    events_retention_days: float = 7.0

    def __post_init__(self) -> None:
        MqttEndpoint.parse(self.mqtt_url)
        if not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("database URL must start with postgresql://")
        self.metrics_endpoint  # noqa: B018 - validates the address
        if self.log_format not in ("json", "console"):
            raise ConfigError("log format must be json or console")
        if self.share_group is not None and not _is_topic_level(self.share_group):
            raise ConfigError("share group must be one topic level without wildcards")
        if self.topic_prefix and ("+" in self.topic_prefix or "#" in self.topic_prefix):
            raise ConfigError("topic prefix must not contain wildcards")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.dynsec and self.database_credentials:
            raise ConfigError(
                "GATEWAY_DYNSEC and GATEWAY_DATABASE_CREDENTIALS exclude each other: use "
                "GATEWAY_DYNSEC with Mosquitto, GATEWAY_DATABASE_CREDENTIALS with a broker "
                "that reads device credentials from PostgreSQL (EMQX)")
        if not self.offline_after_seconds > 0:
            raise ConfigError("the offline threshold must be more than 0 seconds")
        if not self.events_retention_days > 0:
            raise ConfigError("the events retention must be more than 0 days")
        if not 0 <= self.mqtt_keepalive_seconds <= 65535:
            raise ConfigError("MQTT keepalive must be 0 to 65535 seconds")

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={_redacted(f.name, getattr(self, f.name))!r}"
            for f in dataclasses.fields(self)
        )
        return f"Config({fields})"

    @property
    def mqtt(self) -> MqttEndpoint:
        return MqttEndpoint.parse(self.mqtt_url)

    @property
    def metrics_endpoint(self) -> tuple[str, int]:
        host, sep, port = self.metrics_addr.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"metrics address must be HOST:PORT with a port of 0 to 65535, "
                f"got {self.metrics_addr!r}"
            )
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def persistent_sessions(self) -> bool:
        """A process alone keeps its broker sessions across reconnects; in a share group a
        session ends with its connection, so a dead process is given no more messages."""
        return bool(self.client_id) and self.share_group is None

    @property
    def presence_sweep_seconds(self) -> float:
        """How often silent devices are looked for: a sixth of the offline threshold,
        within 0.5 to 30 s, so a device.offline comes at most that late."""
        return min(30.0, max(0.5, self.offline_after_seconds / 6))

    @property
    def heartbeat_window(self) -> int:
        """The heartbeat connection's Receive Maximum."""
        return max(1, min(self.inbox_max, 65535))

    def connection_id(self, connection: str) -> str:
        """The MQTT client id of one of this process's connections: the client id itself
        for requests, with a suffix for the others."""
        base = self.client_id or f"gateway-{self.instance}"
        return base if connection == "requests" else f"{base}-{connection}"

    def topic(self, name: str) -> str:
        """``name`` under the configured prefix (``acme`` + ``devices/x`` → ``acme/devices/x``)."""
        if not self.topic_prefix:
            return name
        return f"{self.topic_prefix.rstrip('/')}/{name}"

    def subscription(self, name: str) -> str:
        topic = self.topic(name)
        return f"$share/{self.share_group}/{topic}" if self.share_group else topic


def _is_topic_level(value: str) -> bool:
    return bool(value) and not any(c in value for c in "/+#")


def _redacted(name: str, value: Any) -> Any:
    if isinstance(value, str) and name.endswith("_url"):
        return redact_url(value)
    return value


# Variables read from the environment; flags of the same name (dashes) override them.
ENV_FIELDS: Mapping[str, str] = {
    "GATEWAY_MQTT_URL": "mqtt_url",
    "GATEWAY_DATABASE_URL": "database_url",
    "GATEWAY_METRICS_ADDR": "metrics_addr",
    "GATEWAY_TOPIC_PREFIX": "topic_prefix",
    "GATEWAY_SHARE_GROUP": "share_group",
    "GATEWAY_LOG_FORMAT": "log_format",
    "GATEWAY_LOG_LEVEL": "log_level",
    "GATEWAY_CLIENT_ID": "client_id",
    "GATEWAY_DYNSEC": "dynsec",
    "GATEWAY_DATABASE_CREDENTIALS": "database_credentials",
    "GATEWAY_WORKERS": "workers",
    "GATEWAY_OFFLINE_AFTER_SECONDS": "offline_after_seconds",
    "GATEWAY_EVENTS_RETENTION_DAYS": "events_retention_days",
    # Tuning (docs/operations.md, Tuning); no flags.
    "GATEWAY_INBOX_MAX": "inbox_max",
    "GATEWAY_BATCH_MAX": "batch_max",
    "GATEWAY_DB_POOL_MAX": "db_pool_max",
    "GATEWAY_REQUEST_WORKERS": "request_workers",
    "GATEWAY_HEARTBEAT_SYNC_COMMIT": "heartbeat_sync_commit",
}

_BOOLEAN_FIELDS = frozenset(
    f.name for f in dataclasses.fields(Config) if isinstance(f.default, bool)
)
_INTEGER_FIELDS = frozenset(
    f.name for f in dataclasses.fields(Config)
    if isinstance(f.default, int) and not isinstance(f.default, bool)
)
_FLOAT_FIELDS = frozenset(
    f.name for f in dataclasses.fields(Config) if isinstance(f.default, float)
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _boolean(variable: str, value: str) -> bool:
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{variable} must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def _integer(variable: str, value: str) -> int:
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise ConfigError(f"{variable} must be a whole number, got {value!r}")
    return int(value)


def _number(variable: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{variable} must be a number, got {value!r}")
    return number


def load(environ: Mapping[str, str], overrides: Mapping[str, Any]) -> Config:
    """Build the Config from environment variables, then flags (flags win)."""
    values: dict[str, Any] = {}
    for variable, field in ENV_FIELDS.items():
        if environ.get(variable):
            values[field] = environ[variable]
            if field in _BOOLEAN_FIELDS:
                values[field] = _boolean(variable, environ[variable])
            elif field in _INTEGER_FIELDS:
                values[field] = _integer(variable, environ[variable])
            elif field in _FLOAT_FIELDS:
                values[field] = _number(variable, environ[variable])
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.setdefault("log_format", "console" if sys.stderr.isatty() else "json")
    return Config(**values)


def from_os(overrides: Mapping[str, Any] | None = None) -> Config:
    return load(os.environ, overrides or {})
