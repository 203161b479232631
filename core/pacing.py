"""Outbound pacing: token buckets that make posts wait their turn instead of drawing 429s.

Platforms cap how fast a bot may post (Slack about one message a second per channel, Telegram
one a second per chat and 30 a second overall). A `Pacer` keeps one bucket per key (a channel,
a chat) and `wait(key)` returns when that key may post again. Buckets refill continuously, so a
short burst goes out at once and a long one settles at the rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict


class Bucket:
    """`rate` posts a second on average, up to `burst` at once."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take a token; return how long to wait before using it (0 when one was ready)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Pacer:
    """A bucket per key; `rate <= 0` turns pacing off. Idle buckets are forgotten (LRU)."""

    def __init__(self, rate: float, burst: int, keep: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.keep = keep
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def delay(self, key: str) -> float:
        """Reserve the next slot for `key`; return the seconds until it comes."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(self.rate, self.burst)
            if len(self._buckets) > self.keep:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()

    async def wait(self, key: str) -> None:
        pause = self.delay(key)
        if pause > 0:
            await asyncio.sleep(pause)
