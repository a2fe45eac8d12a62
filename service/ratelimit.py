"""Per-principal token buckets, in memory on each replica.

A bucket holds up to one minute's allowance and refills continuously, so a
client with a limit of 600/min may burst 600 and then sustain 10/s. Limits
are per replica: behind N replicas a principal gets up to N times its limit.
"""

from __future__ import annotations

import math
import time

# Idle buckets are full again after a minute; drop them so memory stays bounded.
_IDLE_SECONDS = 120.0
_SWEEP_EVERY = 1024


class RateLimiter:
    """Token buckets keyed by principal."""

    def __init__(self) -> None:
        self._clock = time.monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._calls = 0

    def try_acquire(self, key: str, per_minute: int) -> float:
        """Take one token; return 0 if allowed, else the seconds until one is available."""
        now = self._clock()
        capacity = float(per_minute)
        rate = per_minute / 60.0
        tokens, last = self._buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sweep(now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate

    def _sweep(self, now: float) -> None:
        stale = [k for k, (_, last) in self._buckets.items() if now - last > _IDLE_SECONDS]
        for key in stale:
            del self._buckets[key]


def retry_after_seconds(wait: float) -> int:
    """Whole seconds for a Retry-After header, never 0."""
    return max(1, math.ceil(wait))
