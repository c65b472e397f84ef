"""Whether the process is healthy: connected to the broker and to the database.

The process owns this state; ``/healthz`` and the ``gateway_*_connected`` gauges are read
from it, never the other way round.
"""

from __future__ import annotations

from gateway import metrics


class Health:
    """Connection state, set by the edge and the database as it changes."""

    def __init__(self) -> None:
        self._broker = False
        self._database = False

    @property
    def broker(self) -> bool:
        return self._broker

    @broker.setter
    def broker(self, up: bool) -> None:
        self._broker = up
        metrics.MQTT_CONNECTED.set(int(up))

    @property
    def database(self) -> bool:
        return self._database

    @database.setter
    def database(self, up: bool) -> None:
        self._database = up
        metrics.DATABASE_CONNECTED.set(int(up))

    @property
    def ok(self) -> bool:
        return self._broker and self._database
