"""Prometheus metrics, declared once, and the /metrics and /healthz endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

HEARTBEATS_RECEIVED = Counter(
    "gateway_heartbeats_received_total", "Heartbeat messages received from the broker."
)
# Reasons: too_large, malformed, invalid, future_ts, unknown_device, deleted_device,
# overflow (dropped because the inbox was full), bad_topic, write_error (PostgreSQL refused
# the row; the rest of its batch still applies).
HEARTBEATS_REJECTED = Counter(
    "gateway_heartbeats_rejected_total", "Heartbeats rejected, by reason.", ["reason"]
)
HEARTBEATS_APPLIED = Counter(
    "gateway_heartbeats_applied_total", "Heartbeats whose health was written."
)
HEARTBEATS_STALE = Counter(
    "gateway_heartbeats_stale_total",
    "Heartbeats not newer than the stored ts: health kept, acks processed.",
)
HEARTBEATS_SUPERSEDED = Counter(
    "gateway_heartbeats_superseded_total",
    "Buffered heartbeats replaced by a newer one of the same device before being written "
    "(received = applied + stale + superseded + rejected).",
)
HEARTBEAT_LAG = Histogram(
    "gateway_heartbeat_lag_seconds",
    "From receiving a heartbeat to committing its batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_SIZE = Histogram(
    "gateway_heartbeat_batch_size",
    "Heartbeats per database batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
INBOX_DEPTH = Gauge(
    "gateway_inbox_depth",
    "Heartbeats buffered and not yet written (the batch in hand not included).",
)
INTAKE_PAUSED = Gauge(
    "gateway_heartbeat_intake_paused",
    "1 while the heartbeat connection is not read because the buffer is full "
    "(backpressure: the broker holds what follows).",
)
HEARTBEATS_IN_FLIGHT = Gauge(
    "gateway_heartbeats_unacknowledged",
    "Heartbeats received and not acknowledged to the broker yet (at most the buffer's "
    "bound on a broker that honours Receive Maximum).",
)
COMMANDS_DELIVERED = Counter(
    "gateway_commands_delivered_total", "Commands published to devices (each delivery)."
)
SETTINGS_UPDATES_SENT = Counter(
    "gateway_settings_updates_sent_total", "Settings updates published, by kind.", ["kind"]
)
REQUESTS = Counter(
    "gateway_requests_total", "Requests answered, by route template and status.",
    ["route", "status"],
)
REQUEST_DURATION = Histogram(
    "gateway_request_duration_seconds", "Request handling time, by route template.", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
REQUESTS_DROPPED = Counter(
    "gateway_requests_dropped_total",
    "Requests dropped unanswered, by reason (no_reply_topic, bad_reply_topic, overflow, "
    "error).",
    ["reason"],
)
MQTT_CONNECTED = Gauge("gateway_mqtt_connected", "1 while connected to the broker.")
DATABASE_CONNECTED = Gauge("gateway_database_connected", "1 while PostgreSQL answers.")
MQTT_RECONNECTS = Counter(
    "gateway_mqtt_reconnects_total", "Broker connection attempts that failed."
)
PUBLISH_FAILURES = Counter(
    "gateway_publish_failures_total", "Publishes that could not be handed to the broker."
)
COMMANDS_EXPIRED = Counter(
    "gateway_commands_expired_total", "Commands moved to expired by the sweep."
)
DEVICES = Gauge(
    "gateway_devices",
    "Live devices by connectivity (online, offline, unknown), as the last presence sweep "
    "counted them; every process reports the same fleet.",
    ["connectivity"],
)
DEVICES_OFFLINE = Counter(
    "gateway_devices_marked_offline_total", "Devices the presence sweep found silent."
)
EVENTS_PUBLISHED = Counter(
    "gateway_events_published_total",
    "Events published and acknowledged by the broker (a republication counts again).",
    ["type"],
)
OUTBOX_BACKLOG = Gauge(
    "gateway_outbox_backlog", "Events committed and not yet published (whole deployment)."
)

DEVICE_CREDENTIALS_ISSUED = Counter(
    "gateway_device_credentials_issued_total",
    "Device broker credentials issued or rotated (dynamic security).",
)
DEVICE_CREDENTIALS_REVOKED = Counter(
    "gateway_device_credentials_revoked_total",
    "Device broker credentials revoked at the broker (delete, factory reset).",
)
# Reasons: unavailable (not connected or no answer), refused (an error answer),
# bad_response (an undecodable message on the response topic).
DYNSEC_ERRORS = Counter(
    "gateway_dynsec_errors_total", "Failed dynamic security control calls, by reason.",
    ["reason"],
)
REVOCATIONS_QUEUED = Gauge(
    "gateway_revocations_queued", "Devices queued for a credentials revocation check."
)


def heartbeat_totals() -> dict[str, int]:
    """This process's heartbeat counts so far (received = applied + stale + superseded +
    rejected, once all are handled)."""
    def value(name: str, **labels: str) -> int:
        return int(REGISTRY.get_sample_value(name, labels) or 0)

    rejected = sum(int(sample.value) for family in HEARTBEATS_REJECTED.collect()
                   for sample in family.samples if sample.name.endswith("_total"))
    return {
        "heartbeats_received": value("gateway_heartbeats_received_total"),
        "heartbeats_applied": value("gateway_heartbeats_applied_total"),
        "heartbeats_stale": value("gateway_heartbeats_stale_total"),
        "heartbeats_superseded": value("gateway_heartbeats_superseded_total"),
        "heartbeats_rejected": rejected,
    }


Exposition = Callable[[], Awaitable[bytes]]
Healthy = Callable[[], Awaitable[bool]]


async def exposition() -> bytes:
    """This process's metrics in the text format."""
    return generate_latest()


async def _handle(
    exposition: Exposition, healthy: Healthy,
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
) -> None:
    try:
        request_line = await asyncio.wait_for(reader.readline(), timeout=5)
        while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
            pass
        parts = request_line.decode("latin-1").split()
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
        if path == "/metrics":
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, await exposition()
        elif path == "/healthz":
            ok = await healthy()
            status = "200 OK" if ok else "503 Service Unavailable"
            ctype, body = "text/plain; charset=utf-8", b"ok\n" if ok else b"unavailable\n"
        else:
            status, ctype, body = "404 Not Found", "text/plain; charset=utf-8", b"not found\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body
        )
        await writer.drain()
    except (TimeoutError, ConnectionError, UnicodeDecodeError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve(
    host: str, port: int, exposition: Exposition, healthy: Healthy
) -> AsyncIterator[asyncio.Server]:
    """Serve /metrics (``exposition()``) and /healthz (200 while ``healthy()``) until the
    context exits."""
    server = await asyncio.start_server(
        functools.partial(_handle, exposition, healthy), host, port
    )
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
