"""The per-client token bucket: a burst at once, then the rate, never more."""

from __future__ import annotations

import pytest

from domain.ratelimit import TokenBucket


def test_a_burst_goes_through_then_the_rate_and_the_wait_is_said():
    b = TokenBucket(rate=2.0, burst=3)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)  # one token comes back in 1/rate
    assert b.take(100.5) == 0.0
    assert b.take(100.5) > 0
    assert [b.take(110.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled, capped at burst
    assert b.take(110.0) > 0


def test_a_zero_rate_allows_only_the_burst():
    b = TokenBucket(rate=0.0, burst=1)
    assert b.take(0.0) == 0.0
    assert b.take(1e9) == float("inf")
