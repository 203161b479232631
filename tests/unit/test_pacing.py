"""Token-bucket pacing: bursts go at once, then the rate holds, per key."""

from __future__ import annotations

import asyncio
import time

from core.pacing import Pacer


def test_a_burst_goes_at_once_then_posts_are_spaced_at_the_rate() -> None:
    pacer = Pacer(rate=10, burst=3)
    delays = [pacer.delay("C1") for _ in range(6)]
    assert delays[:3] == [0.0, 0.0, 0.0]
    # each later post waits one more tenth of a second than the one before it
    for i, delay in enumerate(delays[3:], start=1):
        assert abs(delay - i / 10) < 0.02


def test_keys_are_paced_apart_and_zero_rate_is_off() -> None:
    pacer = Pacer(rate=1, burst=1)
    assert pacer.delay("C1") == 0.0
    assert pacer.delay("C2") == 0.0
    assert pacer.delay("C1") > 0.9
    off = Pacer(rate=0, burst=1)
    assert [off.delay("C1") for _ in range(100)] == [0.0] * 100


def test_idle_buckets_are_forgotten() -> None:
    pacer = Pacer(rate=1, burst=1, keep=2)
    for key in ("a", "b", "c"):
        pacer.delay(key)
    assert pacer.delay("a") == 0.0  # "a" was dropped as the least recently used


def test_wait_sleeps_for_the_reserved_slot() -> None:
    pacer = Pacer(rate=20, burst=1)

    async def run() -> float:
        start = time.monotonic()
        for _ in range(3):
            await pacer.wait("C1")
        return time.monotonic() - start

    assert asyncio.run(run()) >= 0.09
