"""A rate cap on Stripe calls: at most N a second, evenly spaced, counted.

``sync --from-stripe`` walks through every customer at its own pace
(STRIPE_SYNC_REQUESTS_PER_SECOND), whatever the fleet does: this caps one
process. Its ``pace`` hook (:mod:`service.stripe_sync`) awaits this cap, then a
place in the fleet's upstream budget (:mod:`service.upstream_budget`, SPEC §14),
before every HTTP exchange (retries included).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class RateCap:
    """Lets one call through every ``1 / per_second`` seconds; counts the calls.

    A token bucket of depth one: no burst above the cap, ever. Each caller
    reserves the next free slot before it sleeps, so concurrent callers are
    spaced out too and the order of arrival is kept.
    """

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.per_second = per_second
        self._interval = 1.0 / per_second
        self._clock = clock
        self._sleep = sleep
        self._next_slot = 0.0
        # Calls let through: every HTTP exchange with Stripe, retries included.
        self.calls = 0

    async def wait(self) -> None:
        """Return when the next call may go out (at once if the cap allows)."""
        now = self._clock()
        slot = max(now, self._next_slot)
        # Reserved before the sleep: no await between reading and moving the slot.
        self._next_slot = slot + self._interval
        self.calls += 1
        if slot > now:
            await self._sleep(slot - now)
