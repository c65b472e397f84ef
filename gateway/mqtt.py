"""The MQTT edge: owns the broker connection, reconnects, and routes messages by topic.

aiomqtt's ``async for message in client.messages`` costs a task and an ``asyncio.wait``
per message and tops out near 8,000 msg/s on a small machine. Instead the edge hands
aiomqtt a queue (``queue_type``) whose ``put_nowait`` routes each message straight to the
heartbeat pipeline or the request workers, on the event loop thread, with no task per
message. The message iterator then only serves to notice a disconnection.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from gateway_codecs import api as api_wire
from gateway_codecs.dynsec import RESPONSE_TOPIC as CONTROL_RESPONSE_TOPIC
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics
from gateway.config import Config

log = structlog.get_logger("gateway.mqtt")

Handler = Callable[[aiomqtt.Message, float], None]

# The largest packet the gateway lets the broker send it (MQTT 5 Maximum Packet Size): the
# biggest envelope it still reads to answer 400 (rpc.REPLY_SCAN_BYTES) plus room for the
# topic and properties. A larger message is discarded by the broker, so a device cannot
# make the gateway read a 256 MiB payload into memory whatever the broker's own limit.
MAX_PACKET_BYTES = 16 * api_wire.MAX_REQUEST_BYTES + 64 * 1024


class _RoutingQueue(asyncio.Queue[aiomqtt.Message]):
    """The queue aiomqtt puts messages into; it routes them instead of storing them."""

    route: Handler

    def put_nowait(self, item: aiomqtt.Message) -> None:
        self.route(item, time.time())


def read_all_ready(client: paho.Client, most: int = 32) -> None:
    """Have paho read up to ``most`` packets per readable event instead of one.

    aiomqtt calls paho's ``loop_read()`` once per readable event, and paho reads a single
    packet there (more only while QoS 1 publishes of its own are unacknowledged): a burst
    of heartbeats cost an event-loop wakeup and a reader callback per message, and their
    PUBACKs were queued, and written, one at a time. Reading a run of packets per event,
    and writing their PUBACKs together (`coalesce_acks`), took about 15% off the gateway's
    CPU per heartbeat and 20% off Mosquitto's at 4,000 to 12,000 heartbeats/s. The bound
    keeps the heartbeat writer's database round trips from waiting behind a long run: at
    256 the p99 receive-to-commit lag at 10,000/s went from ~0.2 s to over 2 s; at 32 it
    costs ~0.1 s. The loop is paho's own with a larger bound.
    """

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        for _ in range(most):
            if client._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = client._packet_read()
            if rc > 0:
                return client._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client.loop_read = loop_read  # type: ignore[method-assign]


def coalesce_acks(client: paho.Client, most: int = 1024) -> None:
    """Send runs of queued PUBACKs in one ``send()`` instead of one system call each.

    paho queues a 4-byte PUBACK per QoS 1 message received and writes its queue one
    packet per ``send()``: at 8,000 heartbeats a second that was about a tenth of the
    gateway's CPU. Before each write, every run of consecutive unsent PUBACKs in the
    queue is merged into one packet (of at most ``most``). The bytes on the wire and their
    order are the same, and paho's partial-write bookkeeping (``pos``, ``to_process``)
    applies to a merged packet as to any other; PUBACKs carry no completion callback.
    """
    queue = client._out_packet
    write = client._packet_write

    def packet_write() -> MQTTErrorCode:
        if len(queue) > 1:
            merged: list[Any] = []
            run: list[Any] = []
            for packet in queue:
                if _unsent_puback(packet) and len(run) < most:
                    run.append(packet)
                    continue
                _flush_run(run, merged)
                if _unsent_puback(packet):
                    run.append(packet)
                else:
                    merged.append(packet)
            _flush_run(run, merged)
            if len(merged) < len(queue):
                queue.clear()
                queue.extend(merged)
        return write()

    client._packet_write = packet_write  # type: ignore[method-assign]


def _flush_run(run: list[Any], into: list[Any]) -> None:
    if len(run) > 1:
        joined = b"".join(packet["packet"] for packet in run)
        # mid 0 (no real packet id) keeps a merged packet out of later merges.
        into.append({"command": paho.PUBACK, "mid": 0, "qos": 1, "pos": 0,
                     "to_process": len(joined), "packet": joined, "info": None})
    else:
        into.extend(run)
    run.clear()


def _unsent_puback(packet: Any) -> bool:
    return bool(
        (packet["command"] & 0xF0) == paho.PUBACK and packet["pos"] == 0 and packet["mid"]
    )


class Publisher:
    """The one place that publishes. QoS 1, non-blocking, bounded by paho's out queue.

    aiomqtt's ``publish`` awaits each PUBACK; replies to thousands of heartbeats a second
    would need a task each. The underlying paho client's ``publish`` queues the message and
    returns at once; paho keeps unacknowledged QoS 1 messages and resends them after a
    reconnect of the same session.
    """

    def __init__(self) -> None:
        self._client: aiomqtt.Client | None = None
        self.connected = False

    def attach(self, client: aiomqtt.Client) -> None:
        self._client = client

    def unacknowledged(self) -> int:
        """QoS 1 messages handed to paho and not yet acknowledged by the broker."""
        if self._client is None:
            return 0
        return len(self._client._client._out_messages)

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None) -> bool:
        if self._client is None:
            metrics.PUBLISH_FAILURES.inc()
            return False
        paho_client: paho.Client = self._client._client
        info = paho_client.publish(topic, payload, qos=1, properties=properties)
        # NO_CONN still queues a QoS 1 message for the next connection of this session.
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            metrics.PUBLISH_FAILURES.inc()
            return False
        return True


def reply_properties(correlation_data: bytes | None) -> Properties | None:
    if correlation_data is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.CorrelationData = correlation_data
    return properties


class Edge:
    """Connects, subscribes, and reconnects with capped, jittered backoff until stopped."""

    def __init__(
        self,
        config: Config,
        publisher: Publisher,
        on_heartbeat: Handler,
        on_request: Handler,
        on_control: Handler | None = None,
    ) -> None:
        """``on_control`` receives the dynamic security plugin's responses; given only
        when that plugin is in use (the edge then subscribes to its response topic)."""
        self._config = config
        self._publisher = publisher
        self._heartbeat_topic = config.subscription("devices/+/heartbeat")
        self._request_topic = config.subscription("api/v1/requests")
        self._request_name = config.topic("api/v1/requests")
        self._on_heartbeat = on_heartbeat
        self._on_request = on_request
        self._on_control = on_control
        self.connected = asyncio.Event()
        self._intake = True
        self._client = self._make_client()
        # The client object lives as long as the edge, so the publisher can take messages
        # from the start: paho queues them until a connection is up, instead of a reply
        # to a message that arrives before the SUBACK being dropped.
        publisher.attach(self._client)

    def hold_intake(self, hold: bool = True) -> None:
        """Stop (or resume) taking messages. A message delivered while intake is held is
        neither routed nor acknowledged, so the broker keeps it in the persistent session
        and delivers it again on the next connection: nothing is accepted and then lost."""
        self._intake = not hold
        self._client._client.manual_ack_set(hold)

    def _route(self, message: aiomqtt.Message, received: float) -> None:
        topic = message.topic.value
        if topic == CONTROL_RESPONSE_TOPIC and self._on_control is not None:
            # Answers to this process's own calls are taken even while intake is held:
            # a request being drained may be waiting for one.
            self._on_control(message, received)
            if not self._intake:
                self._client._client.ack(message.mid, message.qos)
        elif not self._intake:
            return
        elif topic == self._request_name:
            self._on_request(message, received)
        else:
            self._on_heartbeat(message, received)

    def _make_client(self) -> aiomqtt.Client:
        endpoint = self._config.mqtt
        queue = _RoutingQueue()
        queue.route = self._route
        persistent = bool(self._config.client_id)
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            connect_properties.SessionExpiryInterval = self._config.session_expiry_seconds
        connect_properties.ReceiveMaximum = 65535
        connect_properties.MaximumPacketSize = MAX_PACKET_BYTES
        client = aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            username=endpoint.username,
            password=endpoint.password,
            identifier=self._config.client_id or None,
            protocol=aiomqtt.ProtocolVersion.V5,
            # A persistent session: the broker keeps QoS 1 messages while we reconnect.
            clean_start=not persistent,
            properties=connect_properties,
            queue_type=lambda maxsize: queue,  # type: ignore[arg-type]
            tls_context=ssl.create_default_context() if endpoint.tls else None,
            max_inflight_messages=1000,
            max_queued_outgoing_messages=100_000,
            keepalive=30,
            timeout=10,
            # Without TCP_NODELAY, Nagle holds a reply back behind the PUBACK of its
            # request until the broker's delayed ACK (~40 ms on Linux) on every request.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        # Speed: bursts are read, and acknowledged, a socketful at a time.
        read_all_ready(client._client)
        coalesce_acks(client._client)
        return client

    async def connect_once(self) -> None:
        """Connect once, or raise ``aiomqtt.MqttError`` (used to fail fast at start).

        A persistent session starts delivering what it queued at once; intake is held
        meanwhile so those messages wait for `run`'s connection instead of being acked
        here and handled twice (or answered before the publisher is connected).
        """
        self.hold_intake()
        try:
            async with self._client:
                pass
        finally:
            self.hold_intake(False)

    async def run(self) -> None:
        """Stay connected until cancelled."""
        delay = 0.5
        task = asyncio.current_task()
        while True:
            _raise_if_cancelled(task)
            try:
                # aiomqtt 2.5.1 keeps the previous connection's resolved CONNACK future
                # after an unexpected disconnect, so re-entering would return before the
                # new CONNACK and subscribe on a session the broker has not set up yet.
                # A fresh future makes `async with` wait for this connection's CONNACK.
                if self._client._connected.done():
                    self._client._connected = asyncio.get_running_loop().create_future()
                async with self._client as client:
                    topics = [(self._heartbeat_topic, 1), (self._request_topic, 1)]
                    if self._on_control is not None:
                        # Not shared: each gateway process awaits its own answers.
                        topics.append((CONTROL_RESPONSE_TOPIC, 1))
                    granted = await client.subscribe(topics)
                    for (topic, _), code in zip(topics, granted, strict=False):
                        if getattr(code, "is_failure", False):
                            # The broker's ACLs refuse it (dynamic security roles).
                            log.error("mqtt.subscribe_refused", topic=topic, reason=str(code))
                    _raise_if_cancelled(task)
                    self._publisher.attach(client)
                    metrics.MQTT_CONNECTED.set(1)
                    self.connected.set()
                    log.info("mqtt.connected", host=self._config.mqtt.host,
                             port=self._config.mqtt.port)
                    delay = 0.5
                    # The routing queue never yields; iterating only waits for a disconnect.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                # aiomqtt 2.5.1's exit raises MqttError when the DISCONNECT it sends is not
                # through within its timeout (a hung broker, full socket buffers), and
                # then leaves its lock held: every later `async with` would fail as
                # "reentrant" and the edge would never connect again.
                if self._client._lock.locked():
                    self._client._lock.release()
                # Cancelled inside `async with`, that same error replaces the cancellation:
                # it must still stop the edge, not start another connection (a shutdown
                # that never ends).
                _raise_if_cancelled(task, exc)
                metrics.MQTT_CONNECTED.set(0)
                metrics.MQTT_RECONNECTS.inc()
                self.connected.clear()
                wait = random.uniform(delay / 2, delay)
                log.warning("mqtt.reconnecting", error=str(exc), in_seconds=round(wait, 2))
                await asyncio.sleep(wait)
                delay = min(delay * 2, 30.0)
            finally:
                metrics.MQTT_CONNECTED.set(0)
                self.connected.clear()


def _raise_if_cancelled(task: asyncio.Task[Any] | None, cause: BaseException | None = None) -> None:
    """Raise CancelledError if ``task`` was asked to stop, even when the request was lost.

    Python 3.11's asyncio.wait_for (which aiomqtt awaits in) swallows a cancellation that
    arrives as the awaited call completes; the request is still counted by the task, so
    the edge checks it rather than carry on (or reconnect) after a stop.
    """
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


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
