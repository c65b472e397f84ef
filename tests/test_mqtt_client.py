"""The fence around aiomqtt's and paho's internals (gateway/mqtt_client.py)."""

from __future__ import annotations

from importlib import metadata

from gateway import mqtt_client


def test_the_installed_mqtt_libraries_are_the_versions_the_fence_was_written_for() -> None:
    """gateway/mqtt_client.py patches private parts of aiomqtt and paho-mqtt. Another
    version may have changed them silently: this fails, naming what to re-check."""
    installed = {name: metadata.version(name) for name in mqtt_client.WRITTEN_FOR}
    assert installed == mqtt_client.WRITTEN_FOR, (
        f"gateway/mqtt_client.py was written for {mqtt_client.WRITTEN_FOR}, but "
        f"{installed} is installed. Read every private attribute it uses against the new "
        "versions (and the test_paho_speedups tests), then update WRITTEN_FOR and the pins "
        "in pyproject.toml together."
    )


def test_nothing_outside_the_fence_touches_the_libraries_internals() -> None:
    """Only gateway/mqtt_client.py reaches into aiomqtt's or paho's private attributes."""
    from pathlib import Path

    root = Path(mqtt_client.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "mqtt_client.py":
            continue
        text = path.read_text()
        for needle in ("._client._", "_out_messages", "_out_packet", "._lock", "._connected",
                       "_packet_read", "_packet_write", "manual_ack_set", "loop_read"):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == []
