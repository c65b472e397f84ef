"""Request/reply over MQTT: envelopes in, a bounded pool of workers, replies out.

MQTT 5 callers name the reply topic in the Response Topic property (and may send
Correlation Data, echoed back as a property); MQTT 3.1.1 callers put ``reply_to`` and
``correlation_id`` in the envelope. Replies only ever go to topics under
``api/v1/replies/`` (after the topic prefix) without wildcards.

An answer larger than the broker's maximum packet size (its MQTT 5 CONNACK says) is not
published: the broker would close the connection and the request, redelivered, would do it
again. The caller gets a small 500 ``internal_error`` saying so instead (a write was applied).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import msgspec
import structlog
from gateway_codecs import api as wire
from gateway_codecs.registry import TelemetronResult

from gateway import auth, metrics
from gateway.config import Config
from gateway.dynsec import DeviceAccess
from gateway.edge import REPLY_SCAN_BYTES, message_properties
from gateway.errors import (
    ApiError,
    InternalError,
    InvalidRequest,
    StorageUnavailable,
    TelemetronError,
    Unavailable,
)
from gateway.logs import RateLimitedLog
from gateway.publisher import Publisher, correlation_properties
from gateway.routes import ROUTER, TELEMETRON_PREFIX, Context, decode_input
from gateway.storage import Storage

log = structlog.get_logger("gateway.rpc")


@dataclass(slots=True)
class Incoming:
    payload: bytes
    reply_to: str | None
    correlation_data: bytes | None
    received: float
    receipt: int  # acknowledged once answered (or dropped)


class Requests:
    """Accepts request messages from the edge and answers them with a worker pool."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        publisher: Publisher,
        done: Callable[[Iterable[int]], None],
        access: DeviceAccess | None = None,
    ) -> None:
        """``done`` acknowledges a request message once it is answered or dropped."""
        self._config = config
        self._done = done
        self._access = access  # device broker credentials; None without dynamic security
        self._storage = storage
        self._publisher = publisher
        self._keys = auth.KeyCache(storage.keys, config.database_url)
        self._reply_prefix = config.topic(wire.REPLY_PREFIX)
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(config.request_queue_max)
        self._busy = 0
        self._dropped_log = RateLimitedLog()

    async def watch_keys(self) -> None:
        """Keep the API key cache in step with PostgreSQL (a background loop)."""
        await self._keys.run()

    @property
    def in_flight(self) -> int:
        return self._queue.qsize() + self._busy

    def accept(self, message: aiomqtt.Message, received: float, receipt: int) -> None:
        props = message_properties(message)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        incoming = Incoming(
            payload, props.get("response_topic"), props.get("correlation_data"), received,
            receipt,
        )
        try:
            self._queue.put_nowait(incoming)
        except asyncio.QueueFull:
            # Not reached while the queue's bound is the connection's in-flight window.
            self._dropped("overflow", "the request queue is full")
            self._done((receipt,))

    async def worker(self) -> None:
        while True:
            incoming = await self._queue.get()
            self._busy += 1
            try:
                # Shielded: a shutdown lets the request in hand finish and be answered.
                await asyncio.shield(self._answer(incoming))
            finally:
                self._busy -= 1
                # An idle worker must not keep its last request alive: 64 workers each
                # holding a multi-MiB payload is how memory grows under hostile input.
                del incoming

    async def _answer(self, incoming: Incoming) -> None:
        try:
            await self.handle(incoming)
        except Exception:
            # `handle` answers every error it expects; anything else is a bug, and one
            # request must not take the worker, and with it the gateway, down.
            log.exception("request.crashed")
            metrics.REQUESTS_DROPPED.labels("error").inc()
        finally:
            self._done((incoming.receipt,))

    async def drain(self, deadline: float) -> None:
        while self.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll at shutdown
            await asyncio.sleep(0.02)

    def _valid_reply_topic(self, topic: str) -> bool:
        return (
            topic.startswith(self._reply_prefix)
            and len(topic) > len(self._reply_prefix)
            and len(topic) <= 512
            and not any(c in topic for c in "+#\x00")
        )

    def _dropped(self, reason: str, why: str, **fields: Any) -> None:
        metrics.REQUESTS_DROPPED.labels(reason).inc()
        allowed, suppressed = self._dropped_log.allow()
        if allowed:
            log.warning("request.dropped", reason=reason, why=why, suppressed=suppressed,
                        **fields)

    async def handle(self, incoming: Incoming) -> None:
        document: Any = None
        correlation: str | int | None = None
        reply_to = incoming.reply_to
        if len(incoming.payload) <= REPLY_SCAN_BYTES:
            document, envelope_reply_to, correlation = wire.reply_fields(incoming.payload)
            reply_to = reply_to or envelope_reply_to
        if correlation is None and incoming.correlation_data is not None:
            try:
                correlation = incoming.correlation_data.decode()
            except UnicodeDecodeError:
                correlation = None
        if reply_to is None:
            why = ("no Response Topic property and no readable reply_to in the envelope"
                   if document is not None or len(incoming.payload) <= REPLY_SCAN_BYTES
                   else f"the envelope exceeds {REPLY_SCAN_BYTES // 1024} KiB")
            self._dropped("no_reply_topic", why, size=len(incoming.payload))
            return
        if not self._valid_reply_topic(reply_to):
            self._dropped("bad_reply_topic", f"reply topics start with {self._reply_prefix}",
                          reply_to=reply_to[:200])
            return

        started = time.perf_counter()
        route = "unmatched"
        structlog.contextvars.bind_contextvars(correlation_id=correlation)
        try:
            if len(incoming.payload) > wire.MAX_REQUEST_BYTES:
                raise InvalidRequest(
                    f"The request exceeds {wire.MAX_REQUEST_BYTES // 1024} KiB"
                )
            request = _parse(document)
            route = ROUTER.template(request.method, request.path)
            structlog.contextvars.bind_contextvars(method=request.method, route=route)
            status, body = await self._dispatch(request)
        except ApiError as exc:
            status, body = exc.status, _error_body(exc, document)
        except StorageUnavailable:
            unavailable = Unavailable("The database is unavailable; retry later")
            status, body = unavailable.status, _error_body(unavailable, document)
        except Exception:
            log.exception("request.failed")
            internal = InternalError("Internal error")
            status, body = internal.status, _error_body(internal, document)
        finally:
            structlog.contextvars.clear_contextvars()
        elapsed = time.perf_counter() - started
        payload = wire.encode_response(wire.Response(status, body, correlation))
        properties = correlation_properties(incoming.correlation_data)
        size = self._publisher.oversize(reply_to, payload, properties)
        if size is not None:
            # Publishing it would make the broker close the connection, and the request,
            # redelivered, would do so again: the caller gets a small error instead.
            limit = self._publisher.max_packet_size
            log.warning("request.reply_too_large", route=route, status=status, size=size,
                        limit=limit)
            too_large = InternalError(_too_large_message(status, size, limit))
            status = too_large.status
            payload = wire.encode_response(
                wire.Response(status, _error_body(too_large, document), correlation))
            if self._publisher.oversize(reply_to, payload, properties) is not None:
                # Only when the reply topic and Correlation Data alone nearly fill it.
                self._dropped("reply_too_large", "even an error answer exceeds the broker's "
                              "maximum packet size", size=size, limit=limit)
                return
        elif status >= 500:
            log.warning("request.answered", route=route, status=status)
        metrics.REQUESTS.labels(route, str(status)).inc()
        metrics.REQUEST_DURATION.labels(route).observe(elapsed)
        self._publisher.publish(reply_to, payload, properties, size_checked=True)

    async def _dispatch(self, request: wire.Request) -> tuple[int, msgspec.Struct]:
        principal = await auth.authenticate(self._keys, request.headers)
        route, params = ROUTER.match(request.method, request.path)
        auth.require(principal, route.scope)
        body = decode_input(route, request)
        return await route.handler(Context(self._storage, request, params, self._access), body)


def _parse(document: Any) -> wire.Request:
    if document is None:
        raise InvalidRequest("The request is not valid JSON")
    try:
        return wire.parse_request(document)
    except wire.EnvelopeError as exc:
        raise InvalidRequest(str(exc)) from exc


def _too_large_message(status: int, size: int, limit: int | None) -> str:
    """Why an answer was replaced by an error: it would exceed the broker's limit."""
    if status < 400:
        return (f"The response ({size} bytes) is larger than the broker accepts ({limit} "
                "bytes); the request was applied; ask for fewer items")
    return (f"The error response ({size} bytes, status {status}) is larger than the broker "
            f"accepts ({limit} bytes); the request changed nothing")


def _error_body(exc: ApiError, document: Any) -> msgspec.Struct:
    """The error in the registry's shape, or in the Telemetron route's own."""
    path = document.get("path") if isinstance(document, dict) else None
    if isinstance(exc, TelemetronError) or (
        isinstance(path, str) and path.startswith(TELEMETRON_PREFIX)
    ):
        return TelemetronResult(success=False, message=exc.message)
    return exc.body()
