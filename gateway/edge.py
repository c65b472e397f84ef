"""The MQTT edge: the broker connection, its subscriptions, reconnects, routing by topic.

``async with Edge(...)`` connects once (or raises ``aiomqtt.MqttError``: the gateway fails
fast at start), then keeps the connection up until the context exits, reconnecting with
capped, jittered backoff. Messages go to the handlers as they arrive, on the event loop
thread; each handler gets the message and its receive time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog
from gateway_codecs import api as api_wire
from gateway_codecs.dynsec import RESPONSE_TOPIC as CONTROL_RESPONSE_TOPIC
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics
from gateway.config import Config
from gateway.health import Health
from gateway.mqtt_client import Client, disconnect_reason, make_client
from gateway.publisher import Publisher

log = structlog.get_logger("gateway.edge")

Handler = Callable[[aiomqtt.Message, float], None]

# The largest packet the gateway lets the broker send it (MQTT 5 Maximum Packet Size): the
# biggest envelope it still reads to answer 400 (REPLY_SCAN_BYTES) plus room for the topic
# and properties. A larger message is discarded by the broker, so a device cannot make the
# gateway read a 256 MiB payload into memory whatever the broker's own limit.
REPLY_SCAN_BYTES = 16 * api_wire.MAX_REQUEST_BYTES
MAX_PACKET_BYTES = REPLY_SCAN_BYTES + 64 * 1024
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# MQTT 5 reason code of a DISCONNECT sent because another client connected with our id.
SESSION_TAKEN_OVER = 142
# Connections the broker closes this soon after they were made count as short-lived;
# this many in a row is reported as a client id taken over.
SHORT_LIVED_SECONDS = 2.0
TAKEOVER_SUSPECTED_AFTER = 3


class Edge:
    """Owns the broker connection. Also the publisher's client (`publisher`)."""

    def __init__(self, config: Config, health: Health) -> None:
        self._config = config
        self._health = health
        self._topics = [(config.subscription("devices/+/heartbeat"), 1),
                        (config.subscription("api/v1/requests"), 1)]
        self._request_topic = config.topic("api/v1/requests")
        self._on_heartbeat: Handler = _unhandled
        self._on_request: Handler = _unhandled
        self._on_control: Handler | None = None
        self._intake = True
        self.connected = asyncio.Event()
        self._client = self._make_client()
        # The client lives as long as the edge, so publishing works from the start.
        self.publisher = Publisher(self._client)
        self._task: asyncio.Task[None] | None = None

    def handle(self, *, heartbeats: Handler, requests: Handler, control: Handler | None) -> None:
        """Who gets the messages; set before connecting. ``control`` receives the dynamic
        security plugin's responses: given only when that plugin is in use (the edge then
        subscribes to its response topic, unshared: each process awaits its own)."""
        self._on_heartbeat = heartbeats
        self._on_request = requests
        self._on_control = control
        if control is not None:
            self._topics.append((CONTROL_RESPONSE_TOPIC, 1))

    # ---- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Edge:
        await self._connect(quiet=True)
        self._task = asyncio.create_task(self._stay_connected(), name="mqtt-edge")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._health.broker = False
        self.connected.clear()
        # A DISCONNECT ends the session cleanly; against a hung broker aiomqtt gives up
        # after its timeout and the edge stops anyway.
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.disconnect()

    def hold_intake(self) -> None:
        """Stop taking messages. One delivered from now on is neither routed nor
        acknowledged, so the broker keeps it for the next connection of the session."""
        self._intake = False
        self._client.hold_acks(True)

    async def _connect(self, *, quiet: bool = False) -> None:
        await self._client.connect()
        try:
            granted = await self._client.subscribe(self._topics)
        except BaseException:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.disconnect()
            raise
        for (topic, _), code in zip(self._topics, granted, strict=False):
            if getattr(code, "is_failure", False):
                # The broker's ACLs refuse it (dynamic security roles).
                log.error("mqtt.subscribe_refused", topic=topic, reason=str(code))
        self._health.broker = True
        self.connected.set()
        if not quiet:  # the first connection is reported by `gateway.ready`
            endpoint = self._config.mqtt
            log.info("mqtt.connected", host=endpoint.host, port=endpoint.port,
                     client_id=self._config.client_id)

    async def _stay_connected(self) -> None:
        """Wait for the connection to drop, then reconnect, until cancelled.

        The backoff starts over only after a connection that lasted: one the broker keeps
        closing at once (another client with the same id, say) is retried ever more slowly.
        """
        task = asyncio.current_task()
        delay = BACKOFF_FIRST_SECONDS
        short_lived = 0
        while True:
            connected_at = time.monotonic()
            try:
                # The routing queue never yields; iterating only waits for a disconnect.
                async for _ in self._client.messages:
                    pass
            except aiomqtt.MqttError as exc:
                _raise_if_cancelled(task, exc)
                lasted = time.monotonic() - connected_at
                short_lived = short_lived + 1 if lasted < SHORT_LIVED_SECONDS else 0
                if short_lived == 0:
                    delay = BACKOFF_FIRST_SECONDS
                self._disconnected(exc, short_lived)
            while True:
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._client.disconnect()
                wait = random.uniform(delay / 2, delay)
                log.warning("mqtt.reconnecting", in_seconds=round(wait, 2))
                await asyncio.sleep(wait)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                try:
                    await self._connect()
                except aiomqtt.MqttError as exc:
                    _raise_if_cancelled(task, exc)
                    metrics.MQTT_RECONNECTS.inc()
                    log.warning("mqtt.connect_failed", error=str(exc))
                    continue
                _raise_if_cancelled(task)
                break

    def _disconnected(self, exc: aiomqtt.MqttError, short_lived: int) -> None:
        self._health.broker = False
        self.connected.clear()
        metrics.MQTT_RECONNECTS.inc()
        taken_over = disconnect_reason(exc) == SESSION_TAKEN_OVER
        if taken_over or short_lived >= TAKEOVER_SUSPECTED_AFTER:
            # Mosquitto 2.0 closes the socket without saying why; a connection it closes
            # again and again right after it was made is the same symptom.
            log.error(
                "mqtt.session_taken_over", client_id=self._config.client_id,
                cause="another MQTT client connected with the same client id" if taken_over
                else f"the broker closed {short_lived} connections in a row within "
                     f"{SHORT_LIVED_SECONDS:g} s: most likely another MQTT client uses the "
                     "same client id",
                fix="give every gateway process its own GATEWAY_CLIENT_ID "
                    "(or run them as `gateway run --workers N`)",
            )
        else:
            log.warning("mqtt.disconnected", error=str(exc))

    # ---- routing ------------------------------------------------------------------------

    def _route(self, message: aiomqtt.Message) -> None:
        received = time.time()
        topic = message.topic.value
        if topic == CONTROL_RESPONSE_TOPIC and self._on_control is not None:
            # Answers to this process's own calls are taken even while intake is held:
            # a request being drained may be waiting for one.
            self._on_control(message, received)
            if not self._intake:
                self._client.ack(message)
        elif not self._intake:
            return
        elif topic == self._request_topic:
            self._on_request(message, received)
        else:
            self._on_heartbeat(message, received)

    def _make_client(self) -> Client:
        endpoint = self._config.mqtt
        persistent = bool(self._config.client_id)
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            connect_properties.SessionExpiryInterval = self._config.session_expiry_seconds
        connect_properties.ReceiveMaximum = 65535
        connect_properties.MaximumPacketSize = MAX_PACKET_BYTES
        return make_client(
            route=self._route,
            host=endpoint.host,
            port=endpoint.port,
            tls=endpoint.tls,
            username=endpoint.username,
            password=endpoint.password,
            identifier=self._config.client_id or None,
            protocol=aiomqtt.ProtocolVersion.V5,
            # A persistent session: the broker keeps QoS 1 messages while we reconnect.
            clean_start=not persistent,
            properties=connect_properties,
            max_inflight_messages=1000,
            max_queued_outgoing_messages=100_000,
            keepalive=30,
            timeout=10,
            # Without TCP_NODELAY, Nagle holds a reply back behind the PUBACK of its
            # request until the broker's delayed ACK (~40 ms on Linux) on every request.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )


def message_properties(message: aiomqtt.Message) -> dict[str, Any]:
    """The MQTT 5 properties the gateway reads: response topic, correlation data, type."""
    props = message.properties
    if props is None:
        return {}
    return {
        "response_topic": getattr(props, "ResponseTopic", None),
        "correlation_data": getattr(props, "CorrelationData", None),
        "content_type": getattr(props, "ContentType", None),
    }


def _raise_if_cancelled(task: asyncio.Task[Any] | None, cause: BaseException | None = None) -> None:
    """Raise CancelledError if ``task`` was asked to stop, even when the request was lost.

    Python 3.11's asyncio.wait_for (which aiomqtt awaits in) swallows a cancellation that
    arrives as the awaited call completes; the request is still counted by the task, so
    the edge checks it rather than carry on (or reconnect) after a stop.
    """
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


def _unhandled(message: aiomqtt.Message, received: float) -> None:
    raise RuntimeError("Edge.handle() was not called before connecting")
