"""The one place that publishes: QoS 1, without waiting, bounded by paho's queue (or
waiting for the PUBACK, for the events relay).

Replies to thousands of heartbeats a second cannot each await a PUBACK, so messages are
queued on the client and sent as the socket allows. Publishing works from the start, also
before the first connection: the client keeps what it cannot send yet.

A message over the broker's maximum packet size (from the connection's CONNACK) is never
handed to the client: the broker would close the connection for it, and paho would send it
again after every reconnect. Request/reply checks its answers first (`fits`) and answers an
error instead (`oversize`); anything else over it is refused and counted as a publish
failure.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics
from gateway.logs import RateLimitedLog
from gateway.mqtt_client import Client

log = structlog.get_logger("gateway.publisher")


class Publisher:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._too_large_log = RateLimitedLog()

    @property
    def max_packet_size(self) -> int | None:
        """The broker's maximum packet size on the current connection (None: no limit)."""
        return self._client.max_packet_size

    def oversize(self, topic: str, payload: bytes,
                 properties: Properties | None = None) -> int | None:
        """The size in bytes of this message's QoS 1 PUBLISH when it is larger than the
        broker accepts; None when it fits (always, when the broker states no limit)."""
        limit = self._client.max_packet_size
        if limit is None:
            return None
        size = self._client.publish_size(topic, payload, properties)
        return size if size > limit else None

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None, *,
                size_checked: bool = False) -> bool:
        """Queue a QoS 1 message; False (and counted) when it could not be queued or is
        larger than the broker accepts. ``size_checked``: the caller has asked
        `oversize` already."""
        size = None if size_checked else self.oversize(topic, payload, properties)
        if size is not None:
            metrics.PUBLISH_FAILURES.inc()
            allowed, suppressed = self._too_large_log.allow()
            if allowed:
                log.warning("publish.too_large", topic=topic[:200], size=size,
                            limit=self._client.max_packet_size, suppressed=suppressed)
            return False
        if self._client.publish_nowait(topic, payload, properties):
            return True
        metrics.PUBLISH_FAILURES.inc()
        return False

    async def publish_acknowledged(
        self, messages: Iterable[tuple[str, bytes]], timeout: float  # noqa: ASYNC109 - the wait for these PUBACKs
    ) -> None:
        """Publish (topic, payload) messages at QoS 1, in order, and return once the broker
        accepted all of them; ``aiomqtt.MqttError`` when one cannot be sent, the broker
        refuses one, or not every PUBACK came within ``timeout``."""
        await self._client.publish_confirmed(messages, timeout)

    def unacknowledged(self) -> int:
        """Messages published and not yet acknowledged by the broker."""
        return self._client.unacknowledged()


def correlation_properties(correlation_data: bytes | None) -> Properties | None:
    """The MQTT 5 properties of a reply: the request's Correlation Data, echoed."""
    if correlation_data is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.CorrelationData = correlation_data
    return properties
