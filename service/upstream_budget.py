"""The upstream budget (SPEC §14): at most N calls to Stripe a second, for the fleet.

Stripe limits an account (100 operations a second live, 25 in test mode) and
answers 429 to everyone past it; the budget (``STRIPE_MAX_REQUESTS_PER_SECOND``,
see :attr:`~service.config.Settings.upstream_budget_per_second`) keeps a burst
of ours under it. It is the ``pace`` hook of :class:`~service.stripe.StripeClient`,
awaited before every HTTP exchange (retries included) of every caller: portal
sessions and the mapping API, the backfiller, and the ``sync``, ``resync`` and
``profiles`` commands.

The rule is a log of calls, kept in a Redis sorted set for the fleet (one Lua
script, one round trip per call) or in memory while a replica decides alone
(no ``REDIS_URL``, or Redis failing: then each replica keeps the whole budget
to itself). A call holds its place for :data:`HOLD_SECONDS`: a second, plus a
guard, because calls reach Stripe later than they leave us by a varying delay
and Stripe counts what arrives. No more than N places are ever held at once,
so no second (seen from here or, within the guard, from Stripe) has more than
N calls. A burst of N goes at once; the next calls reserve the earliest free
places, in order of arrival, and wait for them.

* A caller waits for its place up to its deadline, keeping
  :data:`MIN_ATTEMPT_SECONDS` for the call itself; if the earliest free place
  is later, it reserves nothing and gets ``503 upstream_unavailable`` with a
  ``Retry-After`` of when that place would have been.
* Background callers (backfills, the CLI tools) yield to portal sessions, by a
  simple rule: they never reserve ahead, and take a place only when it is free
  now, no session is waiting for one, and a quarter of the budget stays free
  for sessions. Otherwise they wait a little and ask again, up to their own
  deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from service.config import Settings
from service.errors import ServiceUnavailable
from service.metrics import Metrics
from service.shared_redis import KEY_PREFIX, SharedRedis

# Stripe counts per second; the guard covers calls that leave us evenly and
# arrive bunched up (a slow first connection, a busy event loop, the network).
WINDOW_SECONDS = 1.0
GUARD_SECONDS = 0.1
HOLD_SECONDS = WINDOW_SECONDS + GUARD_SECONDS
# A place that leaves the call less time than this before its deadline is none.
MIN_ATTEMPT_SECONDS = 0.25
# Background callers asking again: not busier than this, not lazier than that.
BACKGROUND_POLL_MIN_SECONDS = 0.01
BACKGROUND_POLL_MAX_SECONDS = 0.5


def background_reserve(per_second: int) -> int:
    """Places a background caller leaves free for portal sessions: a quarter."""
    return per_second // 4


@dataclass(frozen=True, slots=True)
class Answer:
    """Whether a place was taken, and the wait for it (or, refused, a hint)."""

    granted: bool
    wait: float


# KEYS[1]: the log, a sorted set of µs times (those ahead of now are reserved).
# ARGV: [1] N, [2] hold in µs, [3] the longest wait in µs, [4] 1 for a background
# caller, [5] its reserve, [6] a member unique to this call.
# Returns {1 if granted, the wait (or hint) in µs}. Redis's clock, not the
# replicas': a place must mean the same to all of them.
_LOG_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local limit = tonumber(ARGV[1])
local hold = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - hold)
local count = redis.call('ZCARD', KEYS[1])
local slot = now
if ARGV[4] == '1' then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > now then
    return {0, tonumber(last[2]) - now}
  end
  local room = limit - tonumber(ARGV[5])
  if count >= room then
    local nth = redis.call('ZRANGE', KEYS[1], -room, -room, 'WITHSCORES')
    return {0, tonumber(nth[2]) + hold - now}
  end
else
  if count >= limit then
    local nth = redis.call('ZRANGE', KEYS[1], -limit, -limit, 'WITHSCORES')
    slot = math.max(now, tonumber(nth[2]) + hold)
  end
  if slot - now > tonumber(ARGV[3]) then
    return {0, slot - now}
  end
end
redis.call('ZADD', KEYS[1], slot, ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.ceil((slot - now + hold) / 1000) + 1000)
return {1, slot - now}
"""


class LocalLog:
    """The same log and rule as the script, for one replica deciding alone."""

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._log: deque[float] = deque()  # places taken, in order; future ones reserved

    def take(self, max_wait: float, *, background: bool) -> Answer:
        now = self._clock()
        log, limit = self._log, self.per_second
        while log and log[0] <= now - HOLD_SECONDS:
            log.popleft()
        slot = now
        if background:
            if log and log[-1] > now:
                return Answer(False, log[-1] - now)
            room = limit - background_reserve(limit)
            if len(log) >= room:
                return Answer(False, log[-room] + HOLD_SECONDS - now)
        else:
            if len(log) >= limit:
                slot = max(now, log[-limit] + HOLD_SECONDS)
            if slot - now > max_wait:
                return Answer(False, slot - now)
        log.append(slot)
        return Answer(True, slot - now)


def budget_key(settings: Settings) -> str:
    """One log per Stripe account and mode, named by a digest of the key (never the key)."""
    key = settings.stripe_api_key.reveal() if settings.stripe_api_key else ""
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return f"{KEY_PREFIX}stripe-budget:{{{digest}}}"


class UpstreamBudget:
    """The ``pace`` hook: :meth:`wait` returns when a Stripe call may go out."""

    def __init__(
        self,
        per_second: int,
        redis: SharedRedis,
        metrics: Metrics | None,
        *,
        key: str,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.per_second = per_second
        self._redis = redis
        self._metrics = metrics
        self._key = key
        self._script = redis.script(_LOG_SCRIPT)
        self._sleep = sleep
        # The fallback: this replica's own log.
        self.local = LocalLog(per_second, clock)
        self._members = itertools.count()
        self._replica = uuid.uuid4().hex[:12]

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: SharedRedis, metrics: Metrics | None
    ) -> UpstreamBudget | None:
        """The budget the settings ask for; None when it is off."""
        per_second = settings.upstream_budget_per_second
        if per_second == 0:
            return None
        return cls(per_second, redis, metrics, key=budget_key(settings))

    async def wait(self, deadline: float, *, background: bool = False) -> None:
        """Wait for a place (``deadline`` in loop time); 503 if none comes in time."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = False
        while True:
            max_wait = deadline - loop.time() - MIN_ATTEMPT_SECONDS
            answer, backend = await self.take(max(0.0, max_wait), background=background)
            if answer.granted:
                if answer.wait > 0:
                    waited = True
                    await self._sleep(answer.wait)
                self._admitted(waited, loop.time() - started, backend)
                return
            if not background or max_wait <= 0:
                break
            # Background: ask again soon; a session is served first meanwhile.
            pause = min(max(answer.wait, BACKGROUND_POLL_MIN_SECONDS), BACKGROUND_POLL_MAX_SECONDS)
            if loop.time() + pause > deadline - MIN_ATTEMPT_SECONDS:
                break
            waited = True
            await self._sleep(pause)
        if self._metrics is not None:
            self._metrics.budget_waits.labels(outcome="refused").inc()
        raise ServiceUnavailable(
            "upstream_unavailable",
            "The Stripe request budget is spent; retry later.",
            headers={"Retry-After": str(max(1, math.ceil(answer.wait)))},
        )

    async def take(self, max_wait: float, *, background: bool) -> tuple[Answer, str]:
        """One question to the log (Redis's, else this replica's), and who answered it."""
        member = f"{self._replica}:{next(self._members)}"
        args = [
            self.per_second,
            int(HOLD_SECONDS * 1e6),
            int(max_wait * 1e6),
            1 if background else 0,
            background_reserve(self.per_second),
            member,
        ]
        reply = await self._redis.run(self._script, [self._key], args)
        if reply is None:
            return self.local.take(max_wait, background=background), "local"
        granted, wait_us = reply
        return Answer(bool(int(granted)), int(wait_us) / 1e6), "redis"

    def _admitted(self, waited: bool, seconds: float, backend: str) -> None:
        if self._metrics is None:
            return
        self._metrics.budget_waits.labels(outcome="waited" if waited else "immediate").inc()
        # The whole time in the budget, the round trip to Redis included.
        self._metrics.budget_wait.labels(backend=backend).observe(seconds)


@contextlib.asynccontextmanager
async def for_tool(settings: Settings) -> AsyncIterator[UpstreamBudget | None]:
    """The budget of a CLI command (``sync``, ``resync``, ``profiles``): the fleet's
    through ``REDIS_URL`` when set, and its own Redis client, closed on exit."""
    redis = SharedRedis.from_settings(settings, None)
    try:
        budget = UpstreamBudget.from_settings(settings, redis, None)
        if budget is not None and redis.configured:
            await redis.probe()
        yield budget
    finally:
        await redis.close()
