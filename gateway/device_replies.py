"""What a written heartbeat batch sends back: each device's commands and settings update.

Per device only the last applied heartbeat of the batch is answered (it has the freshest
view). Heartbeats of unknown or deleted devices are counted as rejected here, where the
database has said so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway_codecs import device as wire
from gateway_codecs import settings as settings_schema

from gateway import metrics
from gateway.config import Config
from gateway.ingest import Rejections
from gateway.publisher import Publisher
from gateway.storage.commands import Finished
from gateway.storage.heartbeats import Outcome, Written


class DeviceReplies:
    def __init__(
        self,
        config: Config,
        publisher: Publisher,
        reject: Rejections,
        on_finished: Callable[[Iterable[Finished]], None],
    ) -> None:
        """``on_finished`` hears of the commands the batch's acks finished."""
        self._config = config
        self._publisher = publisher
        self._reject = reject
        self._on_finished = on_finished

    def written(self, written: Written) -> None:
        metrics.HEARTBEATS_APPLIED.inc(written.applied)
        replies: dict[str, Outcome] = {}
        stale = 0
        for outcome in written.outcomes:
            if outcome.device_id is None:
                self._reject("unknown_device", outcome.serial, "no device has this serial number")
            elif outcome.deleted:
                self._reject("deleted_device", outcome.serial, "the device is deleted")
            elif not outcome.applied:
                stale += 1
            else:
                replies[outcome.serial] = outcome
        metrics.HEARTBEATS_STALE.inc(stale)
        for serial, outcome in replies.items():
            if outcome.commands:
                self._send_commands(serial, outcome.commands)
            if outcome.settings_version is not None:
                self._send_settings(serial, outcome)
        if written.finished:
            self._on_finished(written.finished)

    def _send_commands(self, serial: str, commands: list[wire.Command]) -> None:
        payload = wire.encode(wire.CommandBatch(commands))
        if self._publisher.publish(self._config.topic(f"devices/{serial}/commands"), payload):
            metrics.COMMANDS_DELIVERED.inc(len(commands))

    def _send_settings(self, serial: str, outcome: Outcome) -> None:
        current = outcome.current_settings
        assert current is not None and outcome.settings_version is not None
        update: wire.SettingsPatch | wire.SettingsFull
        if outcome.base_settings is not None and outcome.reported_version:
            update = wire.SettingsPatch(
                version=outcome.settings_version,
                base_version=outcome.reported_version,
                patch=settings_schema.merge_patch_diff(outcome.base_settings, current),
            )
            kind = "patch"
        else:
            update = wire.SettingsFull(version=outcome.settings_version, base_version=None,
                                       settings=current)
            kind = "full"
        topic = self._config.topic(f"devices/{serial}/settings")
        if self._publisher.publish(topic, wire.encode(update)):
            metrics.SETTINGS_UPDATES_SENT.labels(kind).inc()
