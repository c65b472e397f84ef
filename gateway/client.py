"""A Python client of the gateway's device registry, over MQTT request/reply.

::

    async with GatewayClient("mqtt://127.0.0.1:1883", api_key=KEY) as gw:
        device = await gw.devices.register("SN-2025-001234", device_type="bota_pin_v1")
        async for device in gw.devices.list(status="bound"):
            print(device.serial_number)

One MQTT connection carries every call. With MQTT 5 (the default) a request names its reply
topic in the Response Topic property and its correlation id in Correlation Data; with
``protocol="3.1.1"`` both go in the envelope (``reply_to``, ``correlation_id``). Replies
arrive on a topic of the client's own under ``{prefix}/api/v1/replies/`` and are matched
to their calls by correlation id, so hundreds of calls can be in flight at once.

The typed methods (``gw.devices``, ``gw.settings``, ``gw.commands``, ``gw.events``) take
and return the Structs of ``gateway_codecs`` and raise an `ApiError` subclass for an error
answer (`NotFound`, `Conflict`, `Unavailable`, ...: the gateway's own classes, with
``status``, ``type``, ``message`` and ``details``). `GatewayClient.call` reaches any route
and returns ``(status, body)`` without raising for error statuses. A call that gets no
answer within its timeout raises `RequestTimeout`; a lost connection, `ConnectionLost`
(the client does not reconnect: open a new one). Calls that are safe to repeat (reads,
deletes, registrations, settings writes with ``if_match``, commands with an idempotency
key) are retried, with jittered exponential backoff, after a time-out or a 503.

The protocol is docs/protocol.md §5 and §6; this module is described in docs/client.md.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import copy
import itertools
import math
import random
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

import aiomqtt
import msgspec
from gateway_codecs import api as envelope
from gateway_codecs import registry as wire
from gateway_codecs.events import TOPIC_PREFIX as EVENTS_TOPIC
from gateway_codecs.events import Event, EventList, EventType
from gateway_codecs.settings import Settings
from msgspec import UNSET, UnsetType
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttEndpoint
from gateway.errors import (
    ApiError,
    AuthenticationFailed,
    Conflict,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unavailable,
    ValidationFailed,
)

__all__ = [
    "ApiError", "AuthenticationFailed", "Conflict", "ConnectionLost", "GatewayClient",
    "GatewayError", "InternalError", "InvalidRequest", "MethodNotAllowed", "NotFound",
    "PermissionDenied", "RateLimited", "RegisteredBatch", "RequestTimeout", "Unavailable",
    "ValidationFailed",
]

T = TypeVar("T")
Item = TypeVar("Item", bound="_HasId")

# Error answers, by their type, as the gateway's own exception classes.
_ERRORS: dict[str, type[ApiError]] = {cls.type: cls for cls in (
    InvalidRequest, ValidationFailed, AuthenticationFailed, PermissionDenied, NotFound,
    MethodNotAllowed, Conflict, RateLimited, InternalError, Unavailable,
)}
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE"})
# A batch's reply holds every device object (about 1 KiB with its settings) and echoes
# what each item sent. The default budget keeps replies within 1 MiB, a common broker
# max_packet_size (deploy/mosquitto/ allows 4 MiB).
DEFAULT_MAX_REPLY_BYTES = 1_000_000
_REPLY_BYTES_PER_ITEM = 1_100
_REQUEST_BUDGET = envelope.MAX_REQUEST_BYTES - 4096  # room for the envelope around the body
_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

_response = msgspec.json.Decoder(envelope.Response)
_event = msgspec.json.Decoder(Event)
_encode = msgspec.json.Encoder().encode


class RequestTimeout(GatewayError, TimeoutError):
    """No answer within the call's timeout (after any retries)."""


class ConnectionLost(GatewayError, ConnectionError):
    """The broker connection is gone, or the client is closed; open a new client."""


def error_from(status: int, body: Any) -> ApiError:
    """The exception for an error answer: its class by the error's type; an error the
    client does not know is an `ApiError` with the status and type it came with."""
    try:
        error = msgspec.convert(body, wire.ErrorBody).error
    except msgspec.ValidationError:
        message = body.get("message") if isinstance(body, dict) else None
        error = wire.Error(type="unknown", message=str(message or f"status {status}"))
    cls = _ERRORS.get(error.type, ApiError)
    details = None if isinstance(error.details, UnsetType) else builtins.list(error.details)
    exc = cls(error.message, details)
    if (exc.status, exc.type) != (status, error.type):
        exc.status, exc.type = status, error.type
    return exc


def _protocol(protocol: int | str) -> aiomqtt.ProtocolVersion:
    if str(protocol) in ("5", "5.0"):
        return aiomqtt.ProtocolVersion.V5
    if str(protocol) in ("3.1.1", "311", "4"):
        return aiomqtt.ProtocolVersion.V311
    raise ValueError(f"protocol must be 5 or '3.1.1', not {protocol!r}")


def _under(prefix: str, name: str) -> str:
    """``name`` under the topic prefix, as the gateway puts it (docs/protocol.md §1)."""
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


class _Live:
    """The events a `follow` has not taken yet; ``gap`` when some had to be dropped."""

    def __init__(self, topic_filter: str, maxsize: int) -> None:
        self.filter = topic_filter
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.gap = False

    def put(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.gap = True  # the follower catches up through GET /v1/events


class _Routed(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue, handing each message to ``route`` as it arrives instead
    of keeping it: aiomqtt's ``messages`` iterator costs a task per message."""

    def __init__(self, route: Callable[[aiomqtt.Message], None]) -> None:
        super().__init__()
        self._route = route

    def put_nowait(self, item: aiomqtt.Message) -> None:
        self._route(item)


class _Connection:
    """The MQTT connection of a client: opens it and subscribes to the reply topic, sends
    request envelopes, and hands each answer to the call waiting for it (by correlation
    id) and each live event to the follows that want it."""

    def __init__(self, url: str, protocol: aiomqtt.ProtocolVersion, timeout: float,
                 topic_prefix: str, reply_topic: str, client_id: str | None) -> None:
        self.protocol = protocol
        self.timeout = timeout
        self.topic_prefix = topic_prefix
        self.reply_topic = reply_topic
        self.request_topic = _under(topic_prefix, "api/v1/requests")
        # Replies nobody waits for (late ones, after their call timed out) go here.
        self.on_unmatched: Callable[[aiomqtt.Message], None] = lambda message: None
        self.mqtt: aiomqtt.Client | None = None
        self._url = url
        self._client_id = client_id
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[tuple[envelope.Response, aiomqtt.Message]]] = {}
        self._correlations = itertools.count(1)
        self._live: builtins.list[_Live] = []
        self._subscribed: collections.Counter[str] = collections.Counter()
        self._closed: ConnectionLost | None = None
        self._properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self._properties.ResponseTopic = reply_topic

    def connected(self) -> aiomqtt.Client:
        if self.mqtt is None:
            raise ConnectionLost("the client is not connected (use `async with`)")
        return self.mqtt

    async def open(self) -> None:
        endpoint = MqttEndpoint.parse(self._url)
        routed = _Routed(self._route)
        mqtt = aiomqtt.Client(
            endpoint.host, endpoint.port, username=endpoint.username,
            password=endpoint.password, protocol=self.protocol,
            identifier=self._client_id or f"gateway-client-{uuid.uuid4().hex[:12]}",
            queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", lambda maxsize: routed),
            tls_context=ssl.create_default_context() if endpoint.tls else None,
            timeout=self.timeout, max_inflight_messages=1000,
            # Without it Nagle holds each request behind the previous one's PUBACK.
            socket_options=_NODELAY,
        )
        mqtt.pending_calls_threshold = 1_000_000  # hundreds in flight are the point
        try:
            await mqtt.__aenter__()
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"cannot connect to the broker: {exc}") from exc
        self.mqtt = mqtt
        try:
            await mqtt.subscribe(self.reply_topic, qos=1)
        except BaseException:
            await mqtt.__aexit__(None, None, None)
            raise
        self._reader = asyncio.create_task(self.read(), name="gateway-client-reader")

    async def close(self) -> None:
        reader, mqtt, self._reader = self._reader, self.mqtt, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader
        self._fail(ConnectionLost("the client is closed"))
        if mqtt is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await mqtt.__aexit__(None, None, None)

    async def read(self) -> None:
        """Hand each incoming message to the call or the follow waiting for it, until
        the connection ends. ``async with`` runs this itself (its messages are handed
        over as they arrive, and this only waits for the end); a client made with
        `GatewayClient.attach` needs its owner to run it."""
        try:
            async for message in self.connected().messages:
                self._route(message)
        except aiomqtt.MqttError as exc:
            self._fail(ConnectionLost(f"the broker connection was lost: {exc}"))
            raise

    def _route(self, message: aiomqtt.Message) -> None:
        """Resolve the call waiting for ``message``, or queue it for a follow. Runs in
        paho's callback: it never raises (that would end the connection)."""
        payload = message.payload if isinstance(message.payload, bytes) else b""
        live = [follower for follower in self._live if message.topic.matches(follower.filter)]
        if live:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                event = _event.decode(payload)
                for follower in live:
                    follower.put(event)
            return
        try:
            reply = _response.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._unmatched(message)
            return
        correlation: Any = reply.correlation_id
        if correlation is None and message.properties is not None:
            data = getattr(message.properties, "CorrelationData", None)
            correlation = data.decode(errors="replace") if data is not None else None
        future = self._waiting.pop(str(correlation), None)
        if future is None or future.done():
            self._unmatched(message)
        else:
            future.set_result((reply, message))

    def _unmatched(self, message: aiomqtt.Message) -> None:
        with contextlib.suppress(Exception):  # a hook's failure must not end the connection
            self.on_unmatched(message)

    def _fail(self, reason: ConnectionLost) -> None:
        self._closed = reason
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionLost(str(reason)))
        self._waiting.clear()

    async def request(self, request: envelope.Request,
                      timeout: float | None) -> envelope.Response:  # noqa: ASYNC109
        """Send ``request`` with a new correlation id, its reply topic and correlation as
        the protocol carries them, and wait for its answer."""
        correlation = str(next(self._correlations))
        properties = None
        if self.protocol == aiomqtt.ProtocolVersion.V5:
            # A copy of a made one: making Properties costs 30 µs, a copy 2 µs.
            properties = copy.copy(self._properties)
            properties.CorrelationData = correlation.encode()
        else:
            request.reply_to, request.correlation_id = self.reply_topic, correlation
        reply, _ = await self.send_raw(_encode(request), correlation, properties=properties,
                                       timeout=timeout)
        return reply

    async def send_raw(
        self,
        payload: bytes,
        correlation: str,
        *,
        properties: Properties | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - this call's limit
    ) -> tuple[envelope.Response, aiomqtt.Message]:
        """Publish ``payload`` as a request and wait for the reply that carries
        ``correlation`` (in its envelope, or as Correlation Data). For envelopes built by
        hand, such as malformed ones in tests; `GatewayClient.call` builds them."""
        if self._closed is not None:
            raise ConnectionLost(str(self._closed))
        future: asyncio.Future[tuple[envelope.Response, aiomqtt.Message]] = (
            asyncio.get_running_loop().create_future())
        self._waiting[correlation] = future
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                # aiomqtt's own publish time-out (an MqttError) stays out of the way.
                await self.connected().publish(self.request_topic, payload, qos=1,
                                               properties=properties, timeout=math.inf)
                return await future
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer within {limit:g} s") from exc
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"the broker connection was lost: {exc}") from exc
        finally:
            self._waiting.pop(correlation, None)

    @contextlib.asynccontextmanager
    async def follow(self, name: str, maxsize: int = 10_000) -> AsyncIterator[_Live]:
        """Live messages on ``name`` (a filter under the prefix) while the context lasts."""
        live = _Live(_under(self.topic_prefix, name), maxsize)
        self._live.append(live)
        try:
            if not self._subscribed[live.filter]:
                await self.connected().subscribe(live.filter, qos=1)
            self._subscribed[live.filter] += 1
            yield live
        finally:
            self._live.remove(live)
            self._subscribed[live.filter] -= 1
            if self._subscribed[live.filter] <= 0 and self._closed is None:
                del self._subscribed[live.filter]
                with contextlib.suppress(aiomqtt.MqttError):
                    await self.connected().unsubscribe(live.filter)


class GatewayClient:
    """A backend's connection to the gateway; ``async with`` opens and closes it.

    ``mqtt_url`` is ``mqtt://`` or ``mqtts://`` (TLS), user and password allowed.
    ``topic_prefix`` is the gateway's ``GATEWAY_TOPIC_PREFIX``. ``timeout`` bounds each
    attempt of each call (seconds); ``retries`` is how many times an idempotent call is
    repeated after a time-out or a 503. ``reply_topic`` defaults to a new topic under
    ``{prefix}/api/v1/replies/``; give one where the broker allows a backend only its own
    (``api/v1/replies/{service}/...``).
    """

    def __init__(
        self,
        mqtt_url: str = "mqtt://127.0.0.1:1883",
        *,
        api_key: str | None = None,
        topic_prefix: str = "",
        protocol: int | str = 5,
        timeout: float = 10.0,
        retries: int = 3,
        reply_topic: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.retries = retries
        self.devices = DevicesApi(self)
        self.settings = SettingsApi(self)
        self.commands = CommandsApi(self)
        self.events = EventsApi(self)
        self._connection = _Connection(
            mqtt_url, _protocol(protocol), timeout, topic_prefix,
            reply_topic or _under(topic_prefix,
                                  f"{envelope.REPLY_PREFIX}client-{uuid.uuid4().hex[:12]}"),
            client_id,
        )
        # Routing incoming messages, and raw requests: the connection's own.
        self.read = self._connection.read
        self.send_raw = self._connection.send_raw

    @classmethod
    def attach(cls, mqtt: aiomqtt.Client, *, reply_topic: str, **options: Any) -> GatewayClient:
        """A client over a connection the caller has opened and subscribed to
        ``reply_topic``; the caller runs `read` (``async with`` is not used)."""
        client = cls(reply_topic=reply_topic, **options)
        client._connection.mqtt = mqtt
        return client

    @property
    def mqtt(self) -> aiomqtt.Client:
        """The MQTT connection (aiomqtt), for what the typed methods do not cover."""
        return self._connection.connected()

    @property
    def reply_topic(self) -> str:
        return self._connection.reply_topic

    @property
    def on_unmatched(self) -> Callable[[aiomqtt.Message], None]:
        """Called with each reply no call waits for (one that came after its time-out)."""
        return self._connection.on_unmatched

    @on_unmatched.setter
    def on_unmatched(self, hook: Callable[[aiomqtt.Message], None]) -> None:
        self._connection.on_unmatched = hook

    async def __aenter__(self) -> GatewayClient:
        await self._connection.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._connection.close()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - this call's limit
        idempotent: bool | None = None,
    ) -> tuple[int, Any]:
        """Call any route: ``(status, body)``, the body as decoded JSON, for every status.

        Retried after a time-out or a 503 when ``idempotent`` (by default: GET, HEAD and
        DELETE). Raises `RequestTimeout` or `ConnectionLost` when there is no answer.
        """
        if idempotent is None:
            idempotent = method.upper() in _IDEMPOTENT_METHODS
        reply = await self._request(method, path, body, query, headers, timeout=timeout,
                                    idempotent=idempotent)
        return reply.status, reply.body

    async def _request(
        self,
        method: str,
        path: str,
        body: Any,
        query: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        *,
        timeout: float | None,  # noqa: ASYNC109 - each attempt's limit
        idempotent: bool,
    ) -> envelope.Response:
        all_headers = dict(headers or {})
        if self.api_key is not None and not any(
            name.lower() in ("authorization", "x-api-key") for name in all_headers
        ):
            all_headers["authorization"] = f"Bearer {self.api_key}"
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            request = envelope.Request(method=method, path=path, query=dict(query or {}),
                                       headers=all_headers, body=body)
            last = attempt == attempts - 1
            try:
                reply = await self._connection.request(request, timeout)
            except RequestTimeout as exc:
                if last:
                    tries = f" ({attempts} attempts)" if attempts > 1 else ""
                    raise RequestTimeout(f"{exc}{tries}") from exc
            else:
                if reply.status != Unavailable.status or last:
                    return reply
            await asyncio.sleep(min(4.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _typed(
        self,
        type_: type[T],
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        idempotent: bool,
    ) -> T:
        """The answer as ``type_``, or the `ApiError` of an error answer."""
        reply = await self._request(method, path, body, query, headers, timeout=None,
                                    idempotent=idempotent)
        if reply.status >= 400:
            raise error_from(reply.status, reply.body)
        return msgspec.convert(reply.body, type_)

    async def _pages(
        self, page: type[_Page[Item]], path: str, query: Mapping[str, str | None],
        cursor: str,
    ) -> AsyncIterator[Item]:
        """Every item of a list route, page after page, ``cursor`` naming the last id."""
        params = {name: value for name, value in query.items() if value is not None}
        while True:
            listing = await self._typed(page, "GET", path, query=params, idempotent=True)
            for item in listing.data:
                yield item
            if not listing.has_more or not listing.data:
                return
            params[cursor] = listing.data[-1].id


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


class _Page(Protocol[Item]):
    @property
    def data(self) -> builtins.list[Item]: ...

    @property
    def has_more(self) -> bool: ...


def _limit(page_size: int) -> str:
    return str(max(1, min(page_size, 100)))


# ---- the routes, by what they concern ------------------------------------------------------


class _Routes:
    """The routes of one kind, called through ``client``."""

    def __init__(self, client: GatewayClient) -> None:
        self._gateway = client


DeviceItem = wire.RegisterDevice | Mapping[str, Any] | str


@dataclass(frozen=True, slots=True)
class RegisteredBatch:
    """One batch of `DevicesApi.register_batches`: its items as given, from index
    ``start`` of the input, and their outcomes in the same order."""

    start: int
    items: builtins.list[DeviceItem]
    results: builtins.list[wire.Registration]


class DevicesApi(_Routes):
    """``gw.devices``: the device routes (docs/protocol.md §6 and §10)."""

    async def register(
        self,
        serial_number: str,
        *,
        device_type: str | None = None,
        firmware_version: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> wire.Device:
        """``POST /v1/devices``: the new device, or the one already registered with this
        serial, unchanged. Conflict when the serial belongs to a deleted device."""
        body = wire.RegisterDevice(serial_number=serial_number, device_type=device_type,
                                   firmware_version=firmware_version, metadata=metadata)
        return await self._gateway._typed(wire.Device, "POST", "/v1/devices", body,
                                          idempotent=True)

    async def register_many(
        self, devices: Iterable[DeviceItem], **options: Any
    ) -> builtins.list[wire.Registration]:
        """Register every device through ``POST /v1/devices/batch``: one outcome per
        item, in input order (``status`` 201, 200, 400 or 409, with ``device`` or
        ``error``). Options as `register_batches`."""
        results: dict[int, builtins.list[wire.Registration]] = {}
        async for batch in self.register_batches(devices, **options):
            results[batch.start] = batch.results
        return [result for start in sorted(results) for result in results[start]]

    async def register_batches(
        self,
        devices: Iterable[DeviceItem],
        *,
        concurrency: int = 4,
        batch_size: int = wire.MAX_BATCH,
        max_reply_bytes: int | None = DEFAULT_MAX_REPLY_BYTES,
    ) -> AsyncIterator[RegisteredBatch]:
        """Register ``devices`` (Structs, bodies as mappings, or serial numbers) in
        batches, ``concurrency`` of them in flight, each yielded when answered (not
        necessarily in order). The input is read as the batches go, so it may be a
        generator over a file of any size.

        A batch holds at most ``batch_size`` items, stays within the gateway's 256 KiB
        request limit, and, unless ``max_reply_bytes`` is None, within that estimated
        reply size (about 1.1 KiB per device, the broker's max_packet_size being the
        limit). Registration is idempotent: a batch is retried after a time-out or a
        503, and its devices registered by a first attempt then read 200. A serial given
        twice in one batch is 201 then 200; in two batches in flight together, either
        may be the 201 (``concurrency=1`` keeps the input's order).
        """
        chunks = _chunks(devices, batch_size, max_reply_bytes)
        running: set[asyncio.Task[RegisteredBatch]] = set()
        try:
            while True:
                for start, items, encoded in itertools.islice(chunks,
                                                              concurrency - len(running)):
                    running.add(asyncio.create_task(self._batch(start, items, encoded),
                                                    name=f"register-batch-{start}"))
                if not running:
                    return
                done, running = await asyncio.wait(running,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda task: task.result().start):
                    yield task.result()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _batch(self, start: int, items: builtins.list[DeviceItem],
                     encoded: builtins.list[msgspec.Raw]) -> RegisteredBatch:
        listing = await self._gateway._typed(
            wire.RegistrationList, "POST", "/v1/devices/batch", {"devices": encoded},
            idempotent=True,
        )
        return RegisteredBatch(start, items, listing.data)

    async def get(self, device_id: str) -> wire.Device:
        """``GET /v1/devices/{id}``; NotFound when unknown or deleted."""
        return await self._gateway._typed(wire.Device, "GET", f"/v1/devices/{device_id}",
                                          idempotent=True)

    def list(
        self,
        *,
        status: Literal["bound", "unbound"] | None = None,
        end_user_id: str | None = None,
        serial_number: str | None = None,
        starting_after: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[wire.Device]:
        """Every device (after the device ``starting_after``), newest first, fetched
        ``page_size`` at a time (at most 100), each next page after the last device of
        the one before; the filters as ``GET /v1/devices`` has them."""
        query = {"limit": _limit(page_size), "status": status, "end_user_id": end_user_id,
                 "serial_number": serial_number, "starting_after": starting_after}
        return self._gateway._pages(wire.DeviceList, "/v1/devices", query, "starting_after")

    async def update(
        self,
        device_id: str,
        *,
        firmware_version: str | UnsetType | None = UNSET,
        metadata: dict[str, Any] | UnsetType | None = UNSET,
    ) -> wire.Device:
        """``PATCH /v1/devices/{id}``: ``metadata`` is a merge patch; None clears."""
        body = wire.PatchDevice(firmware_version=firmware_version, metadata=metadata)
        return await self._device("PATCH", device_id, "", body)

    async def delete(self, device_id: str) -> wire.DeletedDevice:
        """``DELETE /v1/devices/{id}``: soft-delete; `restore` undoes it."""
        return await self._gateway._typed(wire.DeletedDevice, "DELETE",
                                          f"/v1/devices/{device_id}", idempotent=True)

    async def restore(self, device_id: str) -> wire.Device:
        """``POST /v1/devices/{id}/restore``: the device as it was before the delete."""
        return await self._device("POST", device_id, "/restore")

    async def bind(self, device_id: str, end_user_id: str) -> wire.Device:
        """``POST /v1/devices/{id}/bind``; Conflict when bound to another end user."""
        return await self._device("POST", device_id, "/bind",
                                  wire.BindDevice(end_user_id=end_user_id))

    async def unbind(self, device_id: str) -> wire.Device:
        """``POST /v1/devices/{id}/unbind``."""
        return await self._device("POST", device_id, "/unbind")

    async def reset(self, device_id: str) -> wire.Device:
        """``POST /v1/devices/{id}/reset``: unbound, and a factory_reset queued."""
        return await self._device("POST", device_id, "/reset")

    async def credentials(self, device_id: str) -> wire.DeviceCredentials:
        """``POST /v1/devices/{id}/credentials``: the device's broker password, shown in
        this answer only (Conflict without the broker's dynamic security)."""
        return await self._gateway._typed(wire.DeviceCredentials, "POST",
                                          f"/v1/devices/{device_id}/credentials",
                                          idempotent=False)

    async def _device(self, method: str, device_id: str, action: str,
                      body: msgspec.Struct | None = None) -> wire.Device:
        return await self._gateway._typed(wire.Device, method,
                                          f"/v1/devices/{device_id}{action}", body,
                                          idempotent=False)


def _chunks(
    devices: Iterable[DeviceItem], batch_size: int, max_reply_bytes: int | None
) -> Iterator[tuple[int, builtins.list[DeviceItem], builtins.list[msgspec.Raw]]]:
    """(start, items, encoded items): batches within the item, request and reply limits."""
    items: builtins.list[DeviceItem] = []
    encoded: builtins.list[msgspec.Raw] = []
    start = request = reply = 0
    reply_budget = math.inf if max_reply_bytes is None else max_reply_bytes
    for index, item in enumerate(devices):
        one = _encode(wire.RegisterDevice(serial_number=item) if isinstance(item, str)
                      else item)
        if items and (len(items) >= batch_size or request + len(one) + 1 > _REQUEST_BUDGET
                      or reply + len(one) + _REPLY_BYTES_PER_ITEM > reply_budget):
            yield start, items, encoded
            items, encoded, start, request, reply = [], [], index, 0, 0
        items.append(item)
        encoded.append(msgspec.Raw(one))
        request += len(one) + 1
        reply += len(one) + _REPLY_BYTES_PER_ITEM
    if items:
        yield start, items, encoded


class SettingsApi(_Routes):
    """``gw.settings``: a device's settings document (docs/protocol.md §6 and §7)."""

    async def get(self, device_id: str) -> wire.DeviceSettings:
        """``GET /v1/devices/{id}/settings``, with the version the device applied."""
        return await self._gateway._typed(wire.DeviceSettings, "GET", self._path(device_id),
                                          idempotent=True)

    async def put(
        self, device_id: str, settings: Settings | Mapping[str, Any], *,
        if_match: int | None = None,
    ) -> wire.DeviceSettings:
        """``PUT``: replace the whole document (omitted fields take their defaults).
        With ``if_match`` (the expected version) a mismatch is a Conflict, and the call
        is retried after a time-out or a 503."""
        return await self._write("PUT", device_id, settings, if_match)

    async def patch(
        self, device_id: str, patch: Mapping[str, Any], *, if_match: int | None = None,
    ) -> wire.DeviceSettings:
        """``PATCH``: an RFC 7396 merge patch; None resets a field to its default."""
        return await self._write("PATCH", device_id, patch, if_match)

    async def _write(self, method: str, device_id: str, body: Any,
                     if_match: int | None) -> wire.DeviceSettings:
        headers = {} if if_match is None else {"if-match": str(if_match)}
        return await self._gateway._typed(
            wire.DeviceSettings, method, self._path(device_id), body, headers=headers,
            idempotent=method == "PUT" and if_match is not None,
        )

    @staticmethod
    def _path(device_id: str) -> str:
        return f"/v1/devices/{device_id}/settings"


class CommandsApi(_Routes):
    """``gw.commands``: commands to devices (docs/protocol.md §3 and §6)."""

    async def send(
        self,
        device_id: str,
        type: str,
        *,
        params: dict[str, Any] | None = None,
        ttl_seconds: int = wire.DEFAULT_TTL_SECONDS,
        idempotency_key: str | None = None,
    ) -> wire.Command:
        """``POST /v1/devices/{id}/commands``. With an ``idempotency_key`` a repeat
        returns the same command, so the call is retried after a time-out or a 503."""
        body = wire.CreateCommand(type=type, params=params, ttl_seconds=ttl_seconds,
                                  idempotency_key=idempotency_key)
        return await self._gateway._typed(wire.Command, "POST",
                                          f"/v1/devices/{device_id}/commands", body,
                                          idempotent=idempotency_key is not None)

    def list(
        self, device_id: str, *, status: wire.CommandStatus | None = None,
        starting_after: str | None = None, page_size: int = 100,
    ) -> AsyncIterator[wire.Command]:
        """Every command of the device (after ``starting_after``), newest first, page
        after page."""
        query = {"limit": _limit(page_size), "status": status,
                 "starting_after": starting_after}
        return self._gateway._pages(wire.CommandList, f"/v1/devices/{device_id}/commands",
                                    query, "starting_after")

    async def get(self, command_id: str) -> wire.Command:
        """``GET /v1/commands/{id}``."""
        return await self._gateway._typed(wire.Command, "GET", f"/v1/commands/{command_id}",
                                          idempotent=True)

    async def cancel(self, command_id: str) -> wire.Command:
        """``POST /v1/commands/{id}/cancel``; Conflict when it is already terminal."""
        return await self._gateway._typed(wire.Command, "POST",
                                          f"/v1/commands/{command_id}/cancel",
                                          idempotent=False)


class EventsApi(_Routes):
    """``gw.events``: what changed, as events (docs/protocol.md §12)."""

    async def list(
        self,
        *,
        after: str | None = None,
        limit: int | None = None,
        type: EventType | None = None,
        device_id: str | None = None,
    ) -> EventList:
        """``GET /v1/events``: one page, oldest first, of the events after ``after``."""
        query = {"after": after, "limit": None if limit is None else str(limit),
                 "type": type, "device_id": device_id}
        return await self._gateway._typed(
            EventList, "GET", "/v1/events",
            query={name: value for name, value in query.items() if value is not None},
            idempotent=True,
        )

    async def follow(
        self,
        *,
        after: str | None = None,
        type: EventType | None = None,
        device_id: str | None = None,
        page_size: int = 1000,
    ) -> AsyncIterator[Event]:
        """Every event after ``after`` (from the oldest kept when None), then each new
        one as it happens, for ever; each event once (by id).

        It subscribes to ``events/v1/#`` (or ``events/v1/{type}``) first, pages through
        ``GET /v1/events`` to catch up, then yields the live events. Should live events
        come faster than they are taken (10,000 waiting), it catches up through the
        route again.
        """
        seen = _RecentIds()
        async with self._gateway._connection.follow(EVENTS_TOPIC + (type or "#")) as live:
            cursor = after
            while True:
                query = {"after": cursor, "limit": str(page_size), "type": type,
                         "device_id": device_id}
                async for event in self._gateway._pages(EventList, "/v1/events", query,
                                                        "after"):
                    cursor = event.id
                    if seen.add(event.id):
                        yield event
                while not live.gap:
                    event = await live.queue.get()
                    if (device_id is None or event.device_id == device_id) and seen.add(
                        event.id
                    ):
                        yield event
                live.gap = False


class _RecentIds:
    """The ids seen lately (the newest ``size``): what `follow` de-duplicates by."""

    def __init__(self, size: int = 100_000) -> None:
        self._order: collections.deque[str] = collections.deque()
        self._ids: set[str] = set()
        self._size = size

    def add(self, event_id: str) -> bool:
        """True the first time ``event_id`` is seen."""
        if event_id in self._ids:
            return False
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        return True
