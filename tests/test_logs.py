"""The rate limit on log lines that device traffic or an outage could repeat endlessly."""

from __future__ import annotations

import time

from gateway.logs import RateLimitedLog


def test_a_burst_gets_through_then_the_rest_is_counted_and_reported() -> None:
    limit = RateLimitedLog(burst=2, period=0.3)
    assert [limit.allow() for _ in range(5)] == [
        (True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    time.sleep(0.35)  # the period passing is what is tested
    # The first line of the next period says how many were left out.
    assert limit.allow() == (True, 3)
    assert limit.allow() == (True, 0)
    assert limit.allow() == (False, 0)
