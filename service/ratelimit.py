"""Per-principal token buckets: shared by the fleet in Redis, or per replica.

A bucket holds up to one minute's allowance and refills continuously, so a
client with a limit of 600/min may burst 600 and then sustain 10/s.

* With ``REDIS_URL`` (SPEC §14), :class:`SharedRateLimiter` keeps each bucket
  in Redis: one Lua script, one round trip per request, atomic, so N replicas
  give a principal its limit once, not N times.
* Without it, or while Redis fails (:mod:`service.shared_redis`), each replica
  decides alone with its in-memory :class:`RateLimiter`: behind N replicas a
  principal then gets up to N times its limit. Its local buckets start full
  when Redis goes away, so an outage forgives a little; nobody is refused
  because of Redis.

It also decides which refusals get an audit row: the first of each minute per
principal (SPEC §6), so hammering past a limit can't turn into a flood of
database writes. Every refusal is still logged and counted by the pipeline.
With Redis that window is fleet-wide too (the same script, the same round
trip: one row per principal and minute for the whole fleet); deciding alone,
it is per replica.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.metrics import Metrics
from service.shared_redis import KEY_PREFIX, SharedRedis

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


@dataclass(frozen=True, slots=True)
class Verdict:
    """One rate-limit decision."""

    # 0: allowed; else the seconds until the bucket holds a token again.
    wait: float
    # A refusal that opens its window: the one that gets an audit row.
    first_refusal: bool = False


# KEYS[1]: the principal's bucket, a hash {tokens, at (µs)}; KEYS[2]: its refusal
# window. ARGV[1]: the limit per minute; ARGV[2]: the refusal window in ms.
# Redis's clock, not the replicas': they may disagree, the bucket must not.
# Returns {wait in µs (0: allowed), 1 if this refusal opens its window}.
_BUCKET_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local capacity = tonumber(ARGV[1])
local per_us = capacity / 60000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
else
  tokens = math.min(capacity, tokens + math.max(0, now - at) * per_us)
end
local allowed = tokens >= 1
if allowed then
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
-- Idle for a minute, a bucket is full again: the key may go.
redis.call('PEXPIRE', KEYS[1], 61000)
if allowed then
  return {0, 0}
end
local wait = math.ceil((1 - tokens) / per_us)
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', tonumber(ARGV[2])) then
  return {wait, 1}
end
return {wait, 0}
"""


def bucket_keys(key: str) -> list[str]:
    """The Redis keys of a principal's bucket and refusal window.

    A digest, not the principal itself: an end user's ``sub`` can be long and
    hold anything, and Redis needs to know no user id. The braces make both keys
    one hash slot, so the script also runs on a Redis Cluster.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    base = f"{KEY_PREFIX}ratelimit:{{{digest}}}"
    return [base, base + ":refused"]


class SharedRateLimiter:
    """Token buckets in Redis for the fleet, or this replica's own; see the module."""

    def __init__(
        self, redis: SharedRedis, metrics: Metrics | None, local: RateLimiter | None = None
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self._script = redis.script(_BUCKET_SCRIPT)
        # The fallback, and the only limiter without REDIS_URL.
        self.local = local or RateLimiter()
        # (backend, result) -> its counter: labels() costs a lock and a key per call.
        self._counted: dict[tuple[str, str], Any] = {}

    async def acquire(self, key: str, per_minute: int) -> Verdict:
        """Take one token of ``key``'s bucket (``per_minute`` allowance): a :class:`Verdict`.

        ``key`` names the principal (``client:…``, ``user:…``) or anything else
        limited the same way (``ip:…``).
        """
        window_ms = int(REFUSAL_ROW_WINDOW_SECONDS * 1000)
        answer = await self._redis.run(self._script, bucket_keys(key), [per_minute, window_ms])
        if answer is not None:
            wait_us, first = answer
            verdict = Verdict(int(wait_us) / 1e6, bool(int(first)))
            backend = "redis"
        else:
            wait = self.local.try_acquire(key, per_minute)
            verdict = Verdict(wait, wait > 0 and self.local.first_refusal_of_window(key))
            backend = "local"
        if self._metrics is not None:
            labels = (backend, "refused" if verdict.wait > 0 else "allowed")
            counter = self._counted.get(labels)
            if counter is None:
                counter = self._metrics.rate_limit_decisions.labels(*labels)
                self._counted[labels] = counter
            counter.inc()
        return verdict
