"""The MQTT edge: the connection for requests, the broker's control API and publishing.

``async with Edge(...)`` connects once (or raises ``aiomqtt.MqttError``: the gateway fails
fast at start), then keeps the connection up until the context exits, reconnecting with
capped, jittered backoff (``gateway.reconnect``). Messages go to the handlers as they
arrive, on the event loop thread; each gets the message, its receive time and its
receipt, which ``done`` acknowledges once the work is done. Heartbeats come on a
connection of their own (``gateway.heartbeat_link``).

Sessions: a process alone (no share group) keeps a persistent session, so requests sent
while it restarts wait in the broker. In a share group the session ends with the
connection, so that a process that dies stops being given a share of the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiomqtt
import structlog
from gateway_codecs import api as api_wire
from gateway_codecs.dynsec import RESPONSE_TOPIC as CONTROL_RESPONSE_TOPIC
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import Config
from gateway.health import Health
from gateway.mqtt_client import Client, disconnect_reason, make_client
from gateway.publisher import Publisher
from gateway.reconnect import Peers, Reconnects, stop_keeper

log = structlog.get_logger("gateway.edge")

Handler = Callable[[aiomqtt.Message, float, int], None]  # message, received, receipt
ControlHandler = Callable[[aiomqtt.Message, float], None]

# The largest packet the gateway lets the broker send it (MQTT 5 Maximum Packet Size): the
# biggest envelope it still reads to answer 400 (REPLY_SCAN_BYTES) plus room for the topic
# and properties. A larger message is discarded by the broker, so a caller cannot make the
# gateway read a 256 MiB payload into memory whatever the broker's own limit.
REPLY_SCAN_BYTES = 16 * api_wire.MAX_REQUEST_BYTES
MAX_PACKET_BYTES = REPLY_SCAN_BYTES + 64 * 1024


class Edge:
    """Owns the request connection. Also the publisher's client (`publisher`)."""

    def __init__(self, config: Config, health: Health, peers: Peers) -> None:
        self._config = config
        self._health = health
        self.client_id = config.connection_id("requests")
        self._requests_topic = config.subscription("api/v1/requests")
        self._barrier_topic = config.topic(f"gateway/barrier/{self.client_id}")
        self._topics = [(self._requests_topic, 1), (self._barrier_topic, 1)]
        self._request_name = config.topic("api/v1/requests")
        self._on_request: Handler = _unhandled
        self._on_control: ControlHandler | None = None
        self._intake = True
        self._barrier: asyncio.Future[None] | None = None
        self.connected = asyncio.Event()
        self._client = self._make_client()
        # The client lives as long as the edge, so publishing works from the start.
        self.publisher = Publisher(self._client)
        self._task: asyncio.Task[None] | None = None
        self._reconnects = Reconnects(self.client_id, "requests", peers)

    def handle(self, *, requests: Handler, control: ControlHandler | None) -> None:
        """Who gets the messages; set before connecting. ``control`` receives the dynamic
        security plugin's responses: given only when that plugin is in use (the edge then
        subscribes to its response topic, unshared: each process awaits its own)."""
        self._on_request = requests
        self._on_control = control
        if control is not None:
            self._topics.append((CONTROL_RESPONSE_TOPIC, 1))

    def done(self, receipts: Iterable[int]) -> None:
        """The work of these messages is done: acknowledge them."""
        self._client.done(receipts)

    # ---- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Edge:
        await self._connect(quiet=True)
        self._task = asyncio.create_task(self._stay_connected(), name="mqtt-edge")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await stop_keeper(self._task)
        self._health.broker = False
        self.connected.clear()
        # A DISCONNECT ends the session cleanly; against a hung broker aiomqtt gives up
        # after its timeout and the edge stops anyway.
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.disconnect()

    def hold_intake(self) -> None:
        """Stop taking requests. One delivered from now on is neither handled nor
        acknowledged, so the broker keeps it for the next connection of the session."""
        self._intake = False

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a deadline for the whole drain
        """Stop being given requests, and return once every request the broker had
        already assigned to this process has arrived (True when within ``timeout``).

        After the UNSUBACK no new request is assigned here; what the broker had queued
        for this connection still arrives, in order, before a message published to its
        own barrier topic after that.
        """
        if not self.connected.is_set():
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._client.unsubscribe(self._requests_topic)
                self._barrier = asyncio.get_running_loop().create_future()
                await self._client.publish(self._barrier_topic, b"", qos=1)
                await self._barrier
        except (TimeoutError, aiomqtt.MqttError):
            return False
        return True

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
        self._reconnects.connected()
        if not quiet:  # the first connection is reported by `gateway.ready`
            endpoint = self._config.mqtt
            log.info("mqtt.connected", connection="requests", host=endpoint.host,
                     port=endpoint.port, client_id=self.client_id)

    async def _stay_connected(self) -> None:
        """Wait for the connection to drop, then reconnect, until cancelled."""
        task = asyncio.current_task()
        while True:
            try:
                # The routing queue never yields; iterating only waits for a disconnect.
                async for _ in self._client.messages:
                    pass
            except aiomqtt.MqttError as exc:
                _raise_if_cancelled(task, exc)
                self._health.broker = False
                self.connected.clear()
                self._reconnects.lost(disconnect_reason(exc), str(exc))
            while True:
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._client.disconnect()
                await self._reconnects.pause()
                try:
                    await self._connect()
                except aiomqtt.MqttError as exc:
                    _raise_if_cancelled(task, exc)
                    self._reconnects.failed(str(exc))
                    continue
                _raise_if_cancelled(task)
                break

    # ---- routing ------------------------------------------------------------------------

    def _route(self, message: aiomqtt.Message) -> None:
        received = time.time()
        receipt = self._client.receipt(message)
        topic = message.topic.value
        if topic == CONTROL_RESPONSE_TOPIC and self._on_control is not None:
            # Answers to this process's own calls are taken even while intake is held:
            # a request being drained may be waiting for one.
            self._on_control(message, received)
            self.done((receipt,))
        elif topic == self._barrier_topic:
            self.done((receipt,))
            if self._barrier is not None and not self._barrier.done():
                self._barrier.set_result(None)
        elif topic != self._request_name:
            self.done((receipt,))  # not for the gateway: nothing to do
        elif self._intake:
            self._on_request(message, received, receipt)
        # else held: never acknowledged, so the broker keeps it for the session's next
        # connection

    def _make_client(self) -> Client:
        endpoint = self._config.mqtt
        persistent = self._config.persistent_sessions
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_properties.SessionExpiryInterval = (
            self._config.session_expiry_seconds if persistent else 0
        )
        # Requests in flight at once: also what a crash of this process can lose.
        connect_properties.ReceiveMaximum = self._config.request_queue_max
        connect_properties.MaximumPacketSize = MAX_PACKET_BYTES
        return make_client(
            route=self._route,
            host=endpoint.host,
            port=endpoint.port,
            tls=endpoint.tls,
            username=endpoint.username,
            password=endpoint.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not persistent,
            properties=connect_properties,
            # No limit of the client's own until the broker's CONNACK gives its Receive
            # Maximum (mqtt_client): paho then sends each QoS 1 message at once and skips
            # its per-PUBACK walk over every message in flight (a tenth of the CPU while
            # events are being relayed).
            max_inflight_messages=0,
            max_queued_outgoing_messages=100_000,
            keepalive=self._config.mqtt_keepalive_seconds,
            timeout=10,
            # Without TCP_NODELAY, Nagle holds a reply back behind the PUBACK of its
            # request until the broker's delayed ACK (~40 ms on Linux) on every request.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )


def message_properties(message: aiomqtt.Message) -> dict[str, Any]:
    """The MQTT 5 properties the gateway reads: response topic, correlation data."""
    props = message.properties
    if props is None:
        return {}
    return {
        "response_topic": getattr(props, "ResponseTopic", None),
        "correlation_data": getattr(props, "CorrelationData", None),
    }


def _unhandled(message: aiomqtt.Message, received: float, receipt: int) -> None:
    raise RuntimeError("Edge.handle() was not called before connecting")


def _raise_if_cancelled(task: asyncio.Task[Any] | None, cause: BaseException | None = None) -> None:
    """Raise CancelledError if ``task`` was asked to stop, even when the request was lost.

    Python 3.11's asyncio.wait_for (which aiomqtt awaits in) swallows a cancellation that
    arrives as the awaited call completes; the request is still counted by the task, so
    the edge checks it rather than carry on (or reconnect) after a stop.
    """
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause
