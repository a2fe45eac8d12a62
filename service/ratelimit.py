"""Per-principal token buckets, in memory on each replica.

A bucket holds up to one minute's allowance and refills continuously, so a
client with a limit of 600/min may burst 600 and then sustain 10/s. Limits
are per replica: behind N replicas a principal gets up to N times its limit.

It also decides which refusals get an audit row: the first of each minute per
principal (SPEC §6), so hammering past a limit can't turn into a flood of
database writes. Every refusal is still logged and counted by the pipeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Idle buckets are full again after a minute; drop them so memory stays bounded.
_IDLE_SECONDS = 120.0
_SWEEP_EVERY = 1024
# At most one rate_limited audit row per principal per this many seconds.
REFUSAL_ROW_WINDOW_SECONDS = 60.0


class RateLimiter:
    """Token buckets keyed by principal."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        # key -> when the refusal window with its one audit row opened
        self._refusal_windows: dict[str, float] = {}
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

    def first_refusal_of_window(self, key: str) -> bool:
        """Whether this refusal of ``key`` is the first of its window, the one with a row.

        A window opens with a refusal and lasts REFUSAL_ROW_WINDOW_SECONDS. The
        check and the update happen without yielding to the event loop, so of
        concurrent refusals exactly one is first.
        """
        now = self._clock()
        opened = self._refusal_windows.get(key)
        if opened is not None and now - opened < REFUSAL_ROW_WINDOW_SECONDS:
            return False
        self._refusal_windows[key] = now
        return True

    def _sweep(self, now: float) -> None:
        stale = [k for k, (_, last) in self._buckets.items() if now - last > _IDLE_SECONDS]
        for key in stale:
            del self._buckets[key]
        # A refusal window only opens on a refused try_acquire, so this stays as
        # bounded as the buckets.
        closed = [
            k
            for k, opened in self._refusal_windows.items()
            if now - opened >= REFUSAL_ROW_WINDOW_SECONDS
        ]
        for key in closed:
            del self._refusal_windows[key]


def retry_after_seconds(wait: float) -> int:
    """Whole seconds for a Retry-After header, never 0."""
    return max(1, math.ceil(wait))
