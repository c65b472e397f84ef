"""The heartbeat link: a connection of its own that only receives device heartbeats.

Why a connection of its own, spoken without a client library:

- **Backpressure without starving requests.** A heartbeat is acknowledged only once it is
  committed (see ``gateway.acks``). With the broker's in-flight window (our Receive
  Maximum) full, the broker stops sending heartbeats and keeps them; requests, on the
  edge's own connection, still flow.
- **Cost.** Receiving is most of the gateway's work per heartbeat. paho reads a packet with
  three or four ``recv()`` calls and builds property objects for every message; here a
  socketful of packets is parsed in one pass over the bytes, and their PUBACKs go out in
  one write.

``async with HeartbeatLink(...)`` connects once (or raises ``LinkError``), then stays
connected, reconnecting with backoff, until the context exits. Each PUBLISH is handed to
``on_publish(topic, payload, content_type, receipt, received)`` on the event loop thread;
``done(receipts)`` acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import structlog

from gateway import metrics
from gateway import mqtt_packets as packets
from gateway.acks import NOTHING, AckWindow
from gateway.config import MqttEndpoint
from gateway.reconnect import Peers, Reconnects, stop_keeper

log = structlog.get_logger("gateway.heartbeat_link")

OnPublish = Callable[[str, bytes, "str | None", int, float], None]
CONNECT_TIMEOUT_SECONDS = 10.0
# The largest packet the broker may send this link: larger heartbeats than 64 KiB are read
# and counted as too_large; past this the broker discards them unseen.
MAXIMUM_PACKET_BYTES = 4 * 1024 * 1024 + 64 * 1024


class LinkError(Exception):
    """The link could not connect, or the broker refused what it asked."""

    def __init__(self, message: str, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class _Protocol(asyncio.Protocol):
    """One connection: parses what arrives, keeps the futures of what was asked."""

    def __init__(self, link: HeartbeatLink) -> None:
        self._link = link
        self.transport: asyncio.Transport | None = None
        self._rest = b""
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[tuple[int, packets.Properties, bool]] = loop.create_future()
        self.closed: asyncio.Future[int | None] = loop.create_future()  # DISCONNECT reason
        self.answers: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self.last_in = time.monotonic()
        self.paused = False
        self._reason: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        futures: list[asyncio.Future[Any]] = [self.connack, *self.answers.values()]
        for future in futures:
            if not future.done():
                future.set_exception(LinkError("connection lost", self._reason))
        if not self.closed.done():
            self.closed.set_result(self._reason)

    def data_received(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        self.last_in = time.monotonic()
        self._parse(data)

    def resume(self) -> None:
        """Read again after `pause`: first what was left unparsed, then the socket."""
        if not self.paused:
            return
        self.paused = False
        metrics.INTAKE_PAUSED.set(0)
        self.last_in = time.monotonic()
        rest, self._rest = self._rest, b""
        self._parse(rest)
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _parse(self, data: bytes) -> None:
        now = time.time()
        view = memoryview(data)
        size = len(data)
        at = 0
        link = self._link
        publishes = 0
        try:
            while at + 2 <= size and not self.paused:
                found = packets.frame(view, at, size)
                if found is None:
                    break
                body, end = found
                first = data[at]
                if first & 0xF0 == packets.PUBLISH:
                    publishes += self._publish(first, view, body, end, now)
                    if not link.accepting():
                        # Backpressure: the buffer is full. Stop reading until it has
                        # room; the broker keeps the rest (`HeartbeatLink.resume`).
                        self.paused = True
                        metrics.INTAKE_PAUSED.set(1)
                        if self.transport is not None:
                            self.transport.pause_reading()
                else:
                    self._control(first, bytes(view[body:end]))
                at = end
        except (packets.ProtocolError, IndexError, ValueError) as exc:
            log.error("heartbeat_link.protocol_error", error=str(exc))
            assert self.transport is not None
            self.transport.abort()
            return
        finally:
            metrics.HEARTBEATS_RECEIVED.inc(publishes)
        self._rest = data[at:] if at < size else b""

    def _publish(self, first: int, view: memoryview, at: int, end: int, now: float) -> bool:
        topic_end = at + 2 + (view[at] << 8 | view[at + 1])
        topic = bytes(view[at + 2:topic_end]).decode("utf-8", "replace")
        at = topic_end
        receipt = NOTHING
        if first & 0x06:
            packet_id = view[at] << 8 | view[at + 1]
            at += 2
            receipt = self._link.window.received(packet_id)
        content_type = None
        if view[at] == 0:  # no properties, the usual case
            at += 1
        else:
            props, at = packets.properties(view, at)
            content_type = props.content_type
        return self._link.deliver(topic, bytes(view[at:end]), content_type, receipt, now)

    def _control(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == packets.CONNACK:
            reason = body[1] if len(body) > 1 else 0
            props, _ = packets.properties(body, 2) if len(body) > 2 else (packets.Properties(), 0)
            if not self.connack.done():
                self.connack.set_result((reason, props, bool(body[0] & 1)))
        elif kind in (packets.SUBACK, packets.UNSUBACK, packets.PUBACK):
            packet_id = int.from_bytes(body[:2], "big")
            future = self.answers.pop((kind, packet_id), None)
            if future is not None and not future.done():
                future.set_result(body)
        elif kind == packets.DISCONNECT:
            self._reason = body[0] if body else 0
        # PINGRESP: nothing to do; it counts as traffic (last_in).

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._link.last_out = time.monotonic()

    async def ask(self, kind: int, packet_id: int, packet: bytes, timeout: float) -> bytes:  # noqa: ASYNC109 - each answer has its own deadline
        """Send ``packet`` and wait for the answer of ``kind`` to ``packet_id``."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.answers[(kind, packet_id)] = future
        self.write(packet)
        async with asyncio.timeout(timeout):
            return await future


class HeartbeatLink:
    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        client_id: str,
        topic: str,
        barrier_topic: str,
        persistent: bool,
        session_expiry: int,
        receive_maximum: int,
        keepalive: int,
        on_publish: OnPublish,
        peers: Peers,
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        """``topic``: the (maybe shared) heartbeat subscription. ``barrier_topic``: a topic
        of this link's own, for `drain`. ``persistent``: keep the session (and what the
        broker holds for it) across reconnects; otherwise it ends with the connection.
        ``accepting()`` is False while the receiver can take no more: the link then stops
        reading until `resume` is called. The broker's in-flight window (our Receive
        Maximum) should already stop it, but Mosquitto before 2.0.12 stops counting that
        window right once acknowledgements flow."""
        self._endpoint = endpoint
        self.client_id = client_id
        self._topic = topic
        self._barrier_topic = barrier_topic
        self._persistent = persistent
        self._session_expiry = session_expiry if persistent else 0
        self._receive_maximum = receive_maximum
        self._keepalive = keepalive
        self._on_publish = on_publish
        self.accepting = accepting
        self.window = AckWindow()
        self.connected = asyncio.Event()
        self.last_out = time.monotonic()
        self._protocol: _Protocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._packet_ids = 0
        self._barrier: asyncio.Future[None] | None = None
        self._held = False
        self._reconnects = Reconnects(client_id, "heartbeats", peers)

    # ---- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> HeartbeatLink:
        await self._connect()
        self._task = asyncio.create_task(self._stay_connected(), name="heartbeat-link")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await stop_keeper(self._task)
        protocol, self._protocol = self._protocol, None
        self.connected.clear()
        if protocol is not None and protocol.transport is not None:
            protocol.write(packets.DISCONNECT_PACKET)
            protocol.transport.close()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        endpoint = self._endpoint
        tls = ssl.create_default_context() if endpoint.tls else None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self), endpoint.host, endpoint.port, ssl=tls,
                )
                protocol.write(packets.connect(
                    self.client_id, keepalive=self._keepalive,
                    clean_start=not self._persistent, session_expiry=self._session_expiry,
                    receive_maximum=self._receive_maximum,
                    maximum_packet_size=MAXIMUM_PACKET_BYTES,
                    username=endpoint.username, password=endpoint.password,
                ))
                self.window.reset()
                self._protocol = protocol
                reason, props, _ = await protocol.connack
                if reason >= 0x80:
                    raise LinkError(f"the broker refused the connection: "
                                    f"{packets.reason_text(reason)}", reason)
                if props.server_keep_alive is not None:
                    self._keepalive = props.server_keep_alive
                await self._subscribe(protocol, [self._topic, self._barrier_topic])
        except (OSError, TimeoutError, LinkError) as exc:
            if self._protocol is not None and self._protocol.transport is not None:
                self._protocol.transport.abort()
            self._protocol = None
            if isinstance(exc, LinkError):
                raise
            raise LinkError(f"cannot connect to {endpoint.host}:{endpoint.port}: "
                            f"{str(exc) or type(exc).__name__}") from exc
        self._reconnects.connected()
        metrics.INTAKE_PAUSED.set(0)
        self.connected.set()

    async def _subscribe(self, protocol: _Protocol, topics: list[str]) -> None:
        packet_id = self._next_packet_id()
        suback = await protocol.ask(packets.SUBACK, packet_id,
                                    packets.subscribe(packet_id, topics), CONNECT_TIMEOUT_SECONDS)
        _, at = packets.properties(suback, 2)
        for topic, code in zip(topics, suback[at:], strict=False):
            if code >= 0x80:
                # The broker's ACLs refuse it (dynamic security roles), for one.
                log.error("mqtt.subscribe_refused", topic=topic,
                          reason=packets.reason_text(code))

    async def _stay_connected(self) -> None:
        while True:
            protocol = self._protocol
            assert protocol is not None
            reason = await self._watch(protocol)
            self.connected.clear()
            self._reconnects.lost(reason, "connection lost" if reason is None
                                  else packets.reason_text(reason))
            while True:
                await self._reconnects.pause()
                try:
                    await self._connect()
                except LinkError as exc:
                    self._reconnects.failed(str(exc))
                    continue
                log.info("mqtt.connected", connection="heartbeats", client_id=self.client_id)
                break

    async def _watch(self, protocol: _Protocol) -> int | None:
        """Keep the connection alive until it closes; the broker's DISCONNECT reason."""
        tick = min(1.0, self._keepalive / 4) if self._keepalive else 1.0
        while not protocol.closed.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await asyncio.shield(protocol.closed)
            now = time.monotonic()
            if not self._keepalive or protocol.closed.done():
                continue
            if now - self.last_out >= self._keepalive / 2:
                protocol.write(packets.PINGREQ_PACKET)
            if protocol.paused:
                protocol.last_in = now  # not reading, on purpose: no news is expected
            elif now - protocol.last_in > self._keepalive * 1.5 and protocol.transport:
                log.warning("heartbeat_link.silent", seconds=round(now - protocol.last_in, 1))
                protocol.transport.abort()
        return protocol.closed.result()

    def _next_packet_id(self) -> int:
        self._packet_ids = self._packet_ids % 0xFFFF + 1
        return self._packet_ids

    # ---- messages -----------------------------------------------------------------------

    def hold(self) -> None:
        """Take no more heartbeats: what arrives from now on is not acknowledged, so the
        broker keeps it for the session's next connection."""
        self._held = True

    def deliver(self, topic: str, payload: bytes, content_type: str | None, receipt: int,
                received: float) -> bool:
        """Hand a message on; True when it was a heartbeat taken in."""
        if self._held:
            return False
        if topic == self._barrier_topic:
            self.done((receipt,))
            if self._barrier is not None and not self._barrier.done():
                self._barrier.set_result(None)
            return False
        self._on_publish(topic, payload, content_type, receipt, received)
        return True

    def done(self, receipts: Iterable[int]) -> None:
        """The work of these messages is done: acknowledge them (in arrival order)."""
        due = self.window.done(receipts)
        metrics.HEARTBEATS_IN_FLIGHT.set(len(self.window))
        if due and self._protocol is not None:
            self._protocol.write(packets.pubacks(due))
            if self._protocol.paused:
                self.resume()

    def resume(self) -> None:
        """The receiver has room again: read on, if reading was paused."""
        if self._protocol is not None and self.accepting():
            self._protocol.resume()

    @property
    def paused(self) -> bool:
        return self._protocol is not None and self._protocol.paused

    @property
    def unacknowledged(self) -> int:
        return len(self.window)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a deadline for the whole drain
        """Stop receiving heartbeats, and return once everything the broker had already
        assigned to this link has arrived. True when it got that far in ``timeout``.

        After the UNSUBACK no new heartbeat is assigned to this link; what the broker had
        queued for it still arrives, in order, before a message published to the link's
        own barrier topic after that.
        """
        protocol = self._protocol
        if protocol is None or not self.connected.is_set():
            return False
        try:
            async with asyncio.timeout(timeout):
                packet_id = self._next_packet_id()
                await protocol.ask(packets.UNSUBACK, packet_id,
                                   packets.unsubscribe(packet_id, [self._topic]), timeout)
                self._barrier = asyncio.get_running_loop().create_future()
                packet_id = self._next_packet_id()
                await protocol.ask(packets.PUBACK, packet_id,
                                   packets.publish(self._barrier_topic, packet_id, b""), timeout)
                await self._barrier
        except (TimeoutError, LinkError):
            return False
        return True
