"""A check that asks the database at most once per ``max_age`` seconds, however often it is asked.

Readiness (``/readyz`` and ``portal_gateway_ready``) and the profile-drift gauge
are both read many times a second by probes and scrapes. Each caller after the
first within ``max_age`` gets the last answer, and callers that arrive while a
run is in progress wait for that run instead of starting another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

MAX_AGE_SECONDS = 1.0


class CachedCheck:
    """Runs its work at most once per ``max_age``; concurrent callers share the run."""

    def __init__(
        self, *, max_age: float = MAX_AGE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age = max_age
        self.clock = clock  # tests move time forward without sleeping
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()

    async def run_if_stale(self, work: Callable[[], Awaitable[None]]) -> None:
        """Await ``work()`` unless it ran less than ``max_age`` ago."""
        if self._fresh():
            return
        async with self._lock:
            # Whoever waited on the lock finds the answer of the run it waited for.
            if self._fresh():
                return
            await work()
            # The age counts from the answer: a slow (timed-out) check is not
            # repeated at once by the callers that queued behind it.
            self._checked_at = self.clock()

    def invalidate(self) -> None:
        """The next caller runs the work (this replica just changed what it reads)."""
        self._checked_at = None

    def _fresh(self) -> bool:
        return self._checked_at is not None and self.clock() - self._checked_at < self.max_age
