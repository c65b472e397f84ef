"""The one module that touches aiomqtt's and paho's private internals.

`make_client` builds an aiomqtt client with every tweak below applied and returns it as a
`Client`, whose public methods are all the rest of the gateway uses. The tweaks were
written for exactly the versions in `WRITTEN_FOR` (pinned in ``pyproject.toml``);
``tests/test_mqtt_client.py`` fails with a clear message when the installed ones differ.

- **Reading in runs** (`read_all_ready`): paho reads one packet per readable event, with
  a ``recv()`` per header byte; here a run of up to 32 per event, parsed from one
  ``recv()``. Under request load paho's reading was four tenths of the gateway's CPU.
- **PUBACKs in one write** (`coalesce_acks`): paho writes each queued packet with its own
  ``send()``; runs of PUBACKs are merged into one.
- **Reconnecting** (`Client.__aenter__`, `Client.__aexit__`): after an unexpected
  disconnect aiomqtt keeps the previous connection's resolved CONNACK future, so entering
  again would return before the new CONNACK; and when its DISCONNECT cannot be written it
  raises out of ``__aexit__`` with its lock still held, so every later ``async with``
  would fail as "reentrant".
- **Publishing without waiting** (`Client.publish_nowait`): aiomqtt's ``publish`` awaits
  each PUBACK; paho's queues the message and returns at once.
- **Keepalive on time** (`Client._misc_loop`): aiomqtt lets paho check its keepalive
  once a second, so a PINGREQ could go out up to a second late; with a short keepalive
  (the broker drops a client silent for 1.5 times it) that is a spurious disconnect.
  The check runs four times a second.
- **Acknowledging when done** (`Client.receipt`, `Client.done`): paho's manual
  acknowledgement, in arrival order (``gateway.acks``).
- **Publishing with a confirmation** (`Client.publish_confirmed`): aiomqtt's ``publish``
  returns on any PUBACK, also one whose MQTT 5 reason code refuses the message (a broker's
  ACL answers "not authorized" so); here such a PUBACK is an error.
- **The broker's packet limit** (`Client.max_packet_size`, `Client.publish_size`): the
  MQTT 5 CONNACK may carry the broker's Maximum Packet Size; a PUBLISH over it makes the
  broker close the connection, so publishers check a message's size against it first.
- **The broker's Receive Maximum** (`Client._on_connect`): paho ignores it and sends as
  many QoS 1 messages as its own limit allows; a broker that enforces it (EMQX) closes
  the connection of a client that sends more. Each CONNACK's value becomes paho's limit;
  without one (or at 65,535) there is none, since paho walks every message in flight on
  each PUBACK while a limit is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from gateway.acks import NOTHING, AckWindow

WRITTEN_FOR = {"aiomqtt": "2.5.1", "paho-mqtt": "2.2.0"}
RECEIVE_MAXIMUM_DEFAULT = 65535  # MQTT 5: what a CONNACK without one means

# Reading more per event saved no more CPU and let the heartbeat writer's database round
# trips wait behind long runs (p99 lag over 2 s at 10,000/s with 256).
READ_RUN = 32
RECV_BYTES = 64 * 1024
ACK_RUN = 1024
MISC_INTERVAL_SECONDS = 0.25


class PublishRefused(aiomqtt.MqttError):
    """The broker acknowledged a QoS 1 message with a failure reason code."""


class Client(aiomqtt.Client):
    """An aiomqtt client with the tweaks above; use only its public methods."""

    window: AckWindow
    _confirmations: dict[int, asyncio.Future[None]]
    # The broker's Maximum Packet Size from this connection's CONNACK; None: no limit
    # given (MQTT 3.1.1, or a broker without one), or not connected yet.
    max_packet_size: int | None = None

    async def __aenter__(self) -> Client:
        # A fresh future makes `async with` wait for this connection's CONNACK.
        if self._connected.done():
            self._connected = asyncio.get_running_loop().create_future()
        self.window.reset()
        await super().__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError:
            if self._lock.locked():
                self._lock.release()
            raise

    async def connect(self) -> None:
        """Connect (and wait for the CONNACK); ``aiomqtt.MqttError`` when it fails."""
        await self.__aenter__()

    async def disconnect(self) -> None:
        """Disconnect if connected; errors are the caller's to ignore."""
        await self.__aexit__(None, None, None)

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110 - paho's timer, as aiomqtt runs it
            await asyncio.sleep(MISC_INTERVAL_SECONDS)

    def publish_nowait(
        self, topic: str, payload: bytes, properties: Properties | None = None
    ) -> bool:
        """Queue a QoS 1 publish; False when paho refuses it (its queue is full).

        Without a connection paho keeps the message and sends it once connected; it also
        resends unacknowledged ones after a reconnect of the same session.
        """
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)

    async def publish_confirmed(
        self, messages: Iterable[tuple[str, bytes]], timeout: float  # noqa: ASYNC109 - the wait for these PUBACKs
    ) -> None:
        """Publish (topic, payload) messages at QoS 1, in order, and wait for every PUBACK;
        ``aiomqtt.MqttError`` when one cannot be queued, a PUBACK refuses one
        (`PublishRefused`), or not all came within ``timeout``."""
        loop = asyncio.get_running_loop()
        waiting: dict[int, asyncio.Future[None]] = {}
        try:
            for topic, payload in messages:
                info = self._client.publish(topic, payload, qos=1)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
                # PUBACKs are read on this event loop, so none can come before this line.
                waiting[info.mid] = self._confirmations[info.mid] = loop.create_future()
            async with asyncio.timeout(timeout):
                for confirmed in waiting.values():
                    await confirmed
        except TimeoutError as exc:
            raise aiomqtt.MqttError(f"no PUBACK within {timeout} s") from exc
        finally:
            for mid, confirmed in waiting.items():
                self._confirmations.pop(mid, None)
                if confirmed.done() and not confirmed.cancelled():
                    confirmed.exception()  # retrieved: the first failure is raised above
                else:
                    confirmed.cancel()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any = None) -> None:
        # Each CONNACK states the limit afresh: a broker restarted with another
        # max_packet_size, or another broker behind the same address, applies from here.
        limit = getattr(properties, "MaximumPacketSize", None)
        self.max_packet_size = limit if isinstance(limit, int) and limit > 0 else None
        window = getattr(properties, "ReceiveMaximum", None)
        self._client._max_inflight_messages = (
            window if isinstance(window, int) and 0 < window < RECEIVE_MAXIMUM_DEFAULT else 0
        )
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def publish_size(
        self, topic: str, payload: bytes, properties: Properties | None = None, qos: int = 1
    ) -> int:
        """Bytes of the PUBLISH packet paho writes for this message on this connection."""
        return publish_packet_size(topic, payload, properties, qos=qos,
                                   v5=self._client.protocol == paho.MQTTv5)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        confirmed = self._confirmations.pop(mid, None)
        if confirmed is not None and not confirmed.done():
            if getattr(reason_code, "is_failure", False):
                confirmed.set_exception(PublishRefused(f"the broker refused it: {reason_code}"))
            else:
                confirmed.set_result(None)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def unacknowledged(self) -> int:
        """QoS 1 messages handed to paho and not yet acknowledged by the broker."""
        return len(self._client._out_messages)

    def receipt(self, message: aiomqtt.Message) -> int:
        """The message's receipt, to pass to `done` once its work is done."""
        return self.window.received(message.mid) if message.qos else NOTHING

    def done(self, receipts: Iterable[int]) -> None:
        """Acknowledge these messages (in arrival order: earlier ones not done wait)."""
        for packet_id in self.window.done(receipts):
            self._client.ack(packet_id, 1)


def publish_packet_size(
    topic: str, payload: bytes, properties: Properties | None = None, *, qos: int = 1,
    v5: bool = True,
) -> int:
    """The size of a PUBLISH packet as paho's ``_send_publish`` lays it out, which is what
    a broker's maximum packet size counts (MQTT 5.0 3.3, 3.1.1 3.3): the fixed header byte,
    the remaining length (1 to 4 bytes), the topic (2 + its UTF-8 bytes), the packet id
    (QoS 1 and 2), the properties (MQTT 5; their length alone when there are none) and the
    payload."""
    remaining = 2 + len(topic.encode()) + len(payload) + (2 if qos else 0)
    if v5:
        remaining += 1 if properties is None else len(properties.pack())  # type: ignore[no-untyped-call]
    return 1 + _varint_size(remaining) + remaining


def _varint_size(value: int) -> int:
    """Bytes of an MQTT Variable Byte Integer (the remaining length)."""
    size = 1
    while value >= 128:
        value //= 128
        size += 1
    return size


def disconnect_reason(exc: BaseException) -> int | None:
    """The MQTT reason code of the broker's DISCONNECT behind ``exc``, if it sent one.

    aiomqtt's message iterator raises a plain ``MqttError`` whose cause carries the code.
    """
    while exc is not None:
        code = getattr(exc, "rc", None)
        value = getattr(code, "value", code)
        if isinstance(value, int):
            return value
        exc = exc.__cause__  # type: ignore[assignment]
    return None


def make_client(
    *,
    route: Callable[[aiomqtt.Message], None],
    host: str,
    port: int,
    tls: bool,
    **options: Any,
) -> Client:
    """A `Client` whose messages go to ``route`` as they arrive, on the event loop thread.

    aiomqtt's ``async for message in client.messages`` costs a task and an
    ``asyncio.wait`` per message and tops out near 8,000 msg/s on a small machine; instead
    aiomqtt is given a queue whose ``put_nowait`` calls ``route``. ``options`` are
    aiomqtt's.
    """
    queue = _RoutingQueue()
    queue.route = route
    client = Client(
        host, port,
        queue_type=lambda maxsize: queue,  # type: ignore[arg-type]
        tls_context=ssl.create_default_context() if tls else None,
        **options,
    )
    client.window = AckWindow()
    client._confirmations = {}
    client._client.manual_ack_set(True)
    read_all_ready(client._client)
    coalesce_acks(client._client)
    return client


class _RoutingQueue(asyncio.Queue[aiomqtt.Message]):
    """The queue aiomqtt puts messages into; it routes them instead of storing them."""

    route: Callable[[aiomqtt.Message], None]

    def put_nowait(self, item: aiomqtt.Message) -> None:
        self.route(item)


def read_all_ready(client: paho.Client, most: int = READ_RUN) -> None:
    """Have paho read up to ``most`` packets per readable event instead of one, from a
    buffer filled by one ``recv()`` of up to `RECV_BYTES` instead of three or four
    system calls per packet.

    aiomqtt calls paho's ``loop_read()`` once per readable event, and paho reads a single
    packet there: the fixed header byte, each remaining-length byte and the rest, each
    with its own ``recv()``. Here paho's reads are served from what one ``recv()``
    brought. Packets still buffered after a run of ``most`` are not announced by the
    socket again, so their reading is scheduled on the event loop (when one runs).
    """
    sock_recv = client._sock_recv
    buffered = b""
    at = 0
    source: object = None  # the socket ``buffered`` came from: a new one starts afresh

    def buffered_recv(bufsize: int) -> bytes:
        nonlocal buffered, at, source
        if source is not client._sock:
            buffered, at, source = b"", 0, client._sock
        if at >= len(buffered):
            buffered, at = sock_recv(RECV_BYTES), 0  # BlockingIOError when empty
            if not buffered:
                return buffered  # the connection was closed
        chunk = buffered[at:at + bufsize]
        at += len(chunk)
        return chunk

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        for _ in range(most):
            if client._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = client._packet_read()
            if rc > 0:
                return client._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        else:
            if at < len(buffered) and source is client._sock:
                with contextlib.suppress(RuntimeError):  # no event loop: the caller reads on
                    asyncio.get_running_loop().call_soon(loop_read)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._sock_recv = buffered_recv  # type: ignore[method-assign]
    client.loop_read = loop_read  # type: ignore[method-assign]


def coalesce_acks(client: paho.Client, most: int = ACK_RUN) -> None:
    """Send runs of queued PUBACKs in one ``send()`` instead of one system call each.

    Before each write, every run of consecutive unsent PUBACKs in paho's queue is merged
    into one packet (of at most ``most``). The bytes on the wire and their order are the
    same, and paho's partial-write bookkeeping (``pos``, ``to_process``) applies to a
    merged packet as to any other; PUBACKs carry no completion callback.
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
