"""The optional Redis the replicas share (SPEC §14): one client, and whether to use it.

The shared rate limits (:mod:`service.ratelimit`) and the Stripe budget
(:mod:`service.upstream_budget`) each ask Redis with one Lua script per
decision, through :meth:`SharedRedis.run`, over the one connection of
:mod:`service.redis_multiplex`. Redis is optional by design, so it
is never the reason a request is refused: ``run`` answers None, "decide
alone", when ``REDIS_URL`` is unset, when Redis is known to be down, or when a
call fails or takes longer than ``REDIS_TIMEOUT_SECONDS`` (a hung Redis costs a
request that bound, never its deadline); the caller then uses its per-replica
fallback.

Health, per replica: a failure marks Redis down (``portal_gateway_redis_up``
0) and the replica stops asking it for :data:`REPROBE_SECONDS`. Then the next
decision is the probe, one at a time (the others keep deciding alone, without
waiting for it); a success marks Redis up again. While it is down, a
``redis_unavailable`` warning goes out at most once a minute with the number
of decisions made alone since the last one. The URL (it may hold a password)
is never logged: only the kind of error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings
from service.metrics import Metrics
from service.redis_multiplex import MultiplexedRedis

log = structlog.get_logger("app")

# How long a replica decides alone after a failure before it asks Redis again.
REPROBE_SECONDS = 1.0
# At most one `redis_unavailable` line per this many seconds.
LOG_EVERY_SECONDS = 60.0
# Every key this service writes starts with it, so a shared Redis stays readable.
KEY_PREFIX = "portal-gateway:"


def error_reason(exc: BaseException) -> str:
    """A bounded label value for a failed Redis call."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    return "error"


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, run by its SHA1 (sent whole once if Redis does not know it)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.source.encode(), usedforsecurity=False)
        object.__setattr__(self, "sha", digest.hexdigest())


class SharedRedis:
    """One Redis client (or none), its health, and the fallback signal; see the module."""

    def __init__(
        self,
        client: MultiplexedRedis | None,
        *,
        timeout: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._metrics = metrics
        self._clock = clock
        self._up = client is not None
        # While down: no call before this (clock time); then one probe at a time.
        self._retry_at = 0.0
        self._probing = False
        self._last_log = -LOG_EVERY_SECONDS
        self._alone_since_log = 0
        self._set_gauge()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None) -> SharedRedis:
        """The client of ``REDIS_URL`` (none when unset). No I/O: it connects on first use."""
        client = None
        if settings.redis_url is not None:
            client = MultiplexedRedis.from_url(
                settings.redis_url.reveal(), connect_timeout=settings.redis_timeout_seconds
            )
        return cls(client, timeout=settings.redis_timeout_seconds, metrics=metrics)

    @property
    def configured(self) -> bool:
        """Whether ``REDIS_URL`` is set."""
        return self._client is not None

    @property
    def up(self) -> bool:
        """Whether the last call to Redis succeeded (False when it is not configured)."""
        return self._up

    def script(self, source: str) -> Script | None:
        """``source`` for :meth:`run` (None without ``REDIS_URL``)."""
        return Script(source) if self._client is not None else None

    async def probe(self) -> bool:
        """PING, at start: says in the log and the gauge whether Redis answers."""
        if self._client is None:
            return False
        client = self._client
        await self._call(lambda: client.execute("PING"))
        if self._up:
            log.info("redis_connected")
        return self._up

    async def run(
        self, script: Script | None, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> Any:
        """The script's answer, or None: decide alone (see the module docstring)."""
        client = self._client
        if script is None or client is None:
            return None
        probe = not self._up
        if probe:
            if self._probing or self._clock() < self._retry_at:
                self._decided_alone()
                return None
            self._probing = True
        try:
            return await self._call(lambda: _eval(client, script, keys, args))
        finally:
            if probe:
                self._probing = False

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            await self._reset_connection()
            return None
        if not self._up:
            self._up = True
            self._set_gauge()
            log.info("redis_recovered", decided_alone=self._alone_since_log)
            self._alone_since_log = 0
        return result

    def _failed(self, exc: BaseException) -> None:
        reason = error_reason(exc)
        if self._metrics is not None:
            self._metrics.redis_errors.labels(reason=reason).inc()
        self._up = False
        self._set_gauge()
        self._retry_at = self._clock() + REPROBE_SECONDS
        self._decided_alone()
        now = self._clock()
        if now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            # The class of the error only: redis-py's messages can name the URL.
            log.warning(
                "redis_unavailable",
                reason=reason,
                error=type(exc).__name__,
                decided_alone=self._alone_since_log,
                fallback="per-replica limits",
            )
            self._alone_since_log = 0

    async def _reset_connection(self) -> None:
        """Drop the connection: after a timeout or an outage it may be dead, and the
        next call on it would fail and mark a recovered Redis down again."""
        if self._client is None:
            return
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._client.reset()

    def _decided_alone(self) -> None:
        self._alone_since_log += 1

    def _set_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.redis_up.set(1 if self._up else 0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def _eval(
    client: MultiplexedRedis, script: Script, keys: Sequence[str], args: Sequence[str | int | float]
) -> Any:
    try:
        return await client.execute("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        # Redis restarted or flushed its scripts: EVAL runs it and caches it again.
        return await client.execute("EVAL", script.source, len(keys), *keys, *args)
