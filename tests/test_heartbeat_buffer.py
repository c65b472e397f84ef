"""The heartbeat buffer on its own (gateway/heartbeat_buffer.py): no broker, no database.

Supersession and folding (docs/protocol.md §2: the ts guard, acks of a late heartbeat
still processed) and the bound on entries.
"""

from __future__ import annotations

from gateway_codecs.device import Ack, Heartbeat

from gateway.heartbeat_buffer import HeartbeatBuffer, Pending


def entry(ts: int | None, *, received: float = 0.0, acks: list[Ack] | None = None,
          **fields: object) -> Pending:
    return Pending(Heartbeat(ts=ts, acks=acks, **fields), received)  # type: ignore[arg-type]


def test_a_newer_heartbeat_with_every_field_of_an_older_one_replaces_it() -> None:
    buffer = HeartbeatBuffer(limit=10)
    buffer.add("SN1", entry(1, received=1.0, battery_percent=5,
                            acks=[Ack("cmd_a", "succeeded")]))
    buffer.add("SN1", entry(2, received=2.0, battery_percent=6, signal_strength_dbm=-50))
    assert buffer.depth == 1
    (kept,) = buffer.take(10)["SN1"]
    assert kept.heartbeat.ts == 2 and kept.heartbeat.battery_percent == 6
    assert [ack.id for ack in kept.acks] == ["cmd_a"]  # the replaced one's acks still count
    assert kept.first_received == 1.0  # the lag is measured from the oldest


def test_a_newer_heartbeat_missing_a_field_keeps_its_own_slot() -> None:
    """Applying only the newer one would lose the older one's battery: both stay, in order."""
    buffer = HeartbeatBuffer(limit=10)
    buffer.add("SN1", entry(1, battery_percent=5))
    buffer.add("SN1", entry(2, signal_strength_dbm=-50))
    assert buffer.depth == 2
    assert [p.heartbeat.ts for p in buffer.take(10)["SN1"]] == [1, 2]


def test_a_late_heartbeat_only_adds_its_acks() -> None:
    buffer = HeartbeatBuffer(limit=10)
    buffer.add("SN1", entry(5, battery_percent=50))
    buffer.add("SN1", entry(3, battery_percent=30, acks=[Ack("cmd_late", "failed")]))
    (kept,) = buffer.take(10)["SN1"]
    assert kept.heartbeat.battery_percent == 50
    assert [ack.id for ack in kept.acks] == ["cmd_late"]


def test_heartbeats_without_ts_supersede_each_other_but_not_timed_ones() -> None:
    buffer = HeartbeatBuffer(limit=10)
    buffer.add("SN1", entry(None, battery_percent=1))
    buffer.add("SN1", entry(None, battery_percent=2))
    assert buffer.depth == 1
    buffer.add("SN1", entry(7, battery_percent=3))
    assert buffer.depth == 2


def test_the_bound_refuses_new_slots_but_still_folds_into_existing_ones() -> None:
    buffer = HeartbeatBuffer(limit=2)
    assert buffer.add("SN1", entry(1, battery_percent=1))
    assert buffer.add("SN2", entry(1, battery_percent=1))
    assert buffer.full
    assert not buffer.add("SN3", entry(1, battery_percent=1))
    assert buffer.add("SN1", entry(2, battery_percent=2))  # supersedes: no new slot
    assert buffer.depth == 2


def test_the_batch_in_hand_counts_against_the_bound_until_done() -> None:
    buffer = HeartbeatBuffer(limit=2)
    buffer.add("SN1", entry(1, battery_percent=1))
    buffer.add("SN2", entry(1, battery_percent=1))
    batch = buffer.take(10)
    assert buffer.depth == 0 and buffer.full
    assert not buffer.add("SN3", entry(1, battery_percent=1))
    buffer.done()
    assert buffer.add("SN3", entry(1, battery_percent=1))
    assert len(batch) == 2


def test_a_requeued_batch_goes_in_front_and_newer_arrivals_fold_into_it() -> None:
    buffer = HeartbeatBuffer(limit=10)
    buffer.add("SN1", entry(1, battery_percent=1))
    buffer.add("SN2", entry(1, battery_percent=1))
    batch = buffer.take(10)
    buffer.add("SN3", entry(1, battery_percent=1))
    buffer.add("SN1", entry(2, battery_percent=2))
    buffer.requeue(batch)
    assert buffer.depth == 3
    again = buffer.take(10)
    assert list(again) == ["SN1", "SN2", "SN3"]
    assert [p.heartbeat.ts for p in again["SN1"]] == [2]


def test_take_returns_the_oldest_devices_first_and_clears_readiness_when_empty() -> None:
    buffer = HeartbeatBuffer(limit=10)
    for serial in ("A", "B", "C"):
        buffer.add(serial, entry(1, battery_percent=1))
    assert buffer.ready.is_set()
    assert list(buffer.take(2)) == ["A", "B"]
    assert buffer.ready.is_set()
    assert list(buffer.take(2)) == ["C"]
    assert not buffer.ready.is_set() and not buffer
