"""Whether the process is healthy: connected to the broker and to the database.

The process owns this state; ``/healthz`` and the ``gateway_*_connected`` gauges are read
from it, never the other way round.
"""

from __future__ import annotations

from gateway import metrics

_GAUGES = {"broker": metrics.MQTT_CONNECTED, "database": metrics.DATABASE_CONNECTED}


class Health:
    """Connection state, set by the edge and the database as it changes; each change is
    mirrored in its gauge."""

    broker: bool
    database: bool

    def __init__(self) -> None:
        self.broker = False
        self.database = False

    def __setattr__(self, name: str, up: bool) -> None:
        super().__setattr__(name, up)
        _GAUGES[name].set(int(up))

    @property
    def ok(self) -> bool:
        return self.broker and self.database
