"""The asyncpg pool, wrapped so every query is named, timed and bounded.

Any connection-level failure (server down, pool exhausted, timeout) surfaces as
``DatabaseUnavailable`` so callers get a quick 503 instead of a hang or a 500.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson

from service.errors import DatabaseUnavailable
from service.metrics import Metrics

# Errors that mean "the database is not answering", as opposed to a bug in a query.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            schema="pg_catalog",
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
        )


class Database:
    """A pool plus per-query metrics and timeouts."""

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics | None, timeout: float) -> None:
        self.pool = pool
        self._metrics = metrics
        self.timeout = timeout

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        metrics: Metrics | None = None,
        query_timeout: float = 2.0,
        min_size: int = 1,
        max_size: int = 10,
    ) -> Database:
        """Open a pool; raise DatabaseUnavailable if the server does not answer."""
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    dsn,
                    min_size=min_size,
                    max_size=max_size,
                    command_timeout=query_timeout,
                    timeout=query_timeout,
                    init=_init_connection,
                ),
                timeout=query_timeout * 3,
            )
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable(
                f"cannot connect to the database: {type(exc).__name__}"
            ) from exc
        assert pool is not None
        return cls(pool, metrics, query_timeout)

    async def close(self) -> None:
        """Close the pool, waiting for connections in use at most the timeout."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout=self.timeout * 5)
        except TimeoutError:
            self.pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[asyncpg.Record]]:
        """A pooled connection; acquisition is bounded by the timeout."""
        try:
            async with self.pool.acquire(timeout=self.timeout) as conn:
                yield conn
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc

    async def fetchrow(self, name: str, sql: str, *args: Any) -> asyncpg.Record | None:
        """Run one named statement and return its first row."""
        started = time.perf_counter()
        try:
            return await self.pool.fetchrow(sql, *args, timeout=self.timeout)
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        finally:
            self._observe(name, started)

    async def fetch(self, name: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run one named statement and return all rows."""
        started = time.perf_counter()
        try:
            return await self.pool.fetch(sql, *args, timeout=self.timeout)
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        finally:
            self._observe(name, started)

    async def execute(self, name: str, sql: str, *args: Any) -> str:
        """Run one named statement for its effect."""
        started = time.perf_counter()
        try:
            return await self.pool.execute(sql, *args, timeout=self.timeout)
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        finally:
            self._observe(name, started)

    def _observe(self, name: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.db_duration.labels(query=name).observe(time.perf_counter() - started)

    def pool_stats(self) -> dict[str, int]:
        """Connections by state, for the pool gauge."""
        size = self.pool.get_size()
        idle = self.pool.get_idle_size()
        return {"in_use": size - idle, "idle": idle, "max": self.pool.get_max_size()}
