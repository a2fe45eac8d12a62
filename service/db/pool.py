"""The asyncpg pool, wrapped so every query is named, timed and bounded.

Any connection-level failure (server down, pool exhausted, timeout) surfaces as
``DatabaseUnavailable`` so callers get a quick 503 instead of a hang or a 500. A
value the database refuses is not an outage: its data error (``asyncpg.DataError``,
which asyncpg also raises for a value it cannot encode) passes through.

One timeout bounds each call as a whole: waiting for a pooled connection,
opening a new one (asyncpg's connect timeout is 60 s unless told otherwise,
and a dead pooled connection is reopened on acquire), and the statement. So a
request during an outage is answered 503 within that timeout, and once the
server is back the next acquire reconnects: no restart needed.

Statements that concurrent callers may share (the audit row's INSERT, RESOLVE)
run through :meth:`Database.run_grouped`: one statement per batch of callers
(``grouping.py``). ``close`` waits for the batches queued before closing the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
import orjson

from service.db.grouping import GroupedStatement, StatementGroup
from service.errors import DatabaseUnavailable
from service.metrics import Metrics

# What ``Database.connection()`` yields; functions that run inside a caller's
# transaction take it.
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

# Errors that mean "the database is not answering", as opposed to a bug in a query.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    # Class 08: the connection failed or was closed under us.
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # Class 57: shutting down, crashed, starting up, statement timeout.
    asyncpg.OperatorInterventionError,
    # Class 53: too many connections, out of memory or disk.
    asyncpg.InsufficientResourcesError,
    # A failover left us on a standby that is still read-only.
    asyncpg.ReadOnlySQLTransactionError,
)
# Reconnecting while serving, the server may also refuse us outright (the
# database or role is gone, e.g. after a failover to a server not yet restored):
# to a request that is the database being unavailable too, not a bug. At start-up
# the same errors are configuration errors, so Database.connect lets them through.
_REQUEST_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    *UNAVAILABLE_ERRORS,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            schema="pg_catalog",
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query (a round trip per release).

    Our statements never leave session state behind (no SET, LISTEN, advisory
    session locks or open cursors); asyncpg still rolls back a transaction left
    open before calling this.
    """


class Database:
    """A pool plus per-query metrics and timeouts."""

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics | None, timeout: float) -> None:
        self.pool = pool
        self._metrics = metrics
        self.timeout = timeout
        # Releases still running after their caller got its answer (see _release).
        self._releasing: set[asyncio.Task[None]] = set()
        self._groups: dict[GroupedStatement, StatementGroup] = {}

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
                    reset=_keep_session,
                    # No idle-connection timer armed on every release (a call_later
                    # per query): the pool keeps at most max_size connections anyway.
                    max_inactive_connection_lifetime=0,
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
        """Run the grouped statements still queued, then close the pool, waiting for connections in
        use at most the timeout."""
        try:
            # Each queued caller is answered or failed within the timeout of its queueing.
            async with asyncio.timeout(self.timeout * 5):
                for group in self._groups.values():
                    await group.drain()
                await self.pool.close()
        except TimeoutError:
            self.pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; acquisition (and reconnecting) is bounded by the timeout."""
        try:
            conn = await self.pool.acquire(timeout=self.timeout)
        except _REQUEST_UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        try:
            yield conn
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        finally:
            self._give_back(conn)

    async def fetchrow(self, name: str, sql: str, *args: Any) -> asyncpg.Record | None:
        """Run one named statement and return its first row."""
        result: asyncpg.Record | None = await self._run(name, "fetchrow", sql, args)
        return result

    async def fetch(self, name: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run one named statement and return all rows."""
        result: list[asyncpg.Record] = await self._run(name, "fetch", sql, args)
        return result

    async def execute(self, name: str, sql: str, *args: Any) -> str:
        """Run one named statement for its effect."""
        result: str = await self._run(name, "execute", sql, args)
        return result

    async def run_grouped(self, statement: GroupedStatement, values: Sequence[Any]) -> Any:
        """Run ``statement`` with ``values`` together with the same statement of
        concurrent callers (``grouping.py``); this caller's answer: its row for a
        read, None once committed for a write."""
        group = self._groups.get(statement)
        if group is None:
            group = self._groups[statement] = StatementGroup(
                statement,
                lambda method, sql, args, budget: self._run(
                    statement.name, method, sql, args, budget
                ),
                self.timeout,
                self._batch_observer(statement.name),
            )
        return await group.run(values)

    def grouped(self, statement: GroupedStatement) -> StatementGroup | None:
        """The queue of ``statement``, once a caller has used it."""
        return self._groups.get(statement)

    async def _run(
        self,
        name: str,
        method: str,
        sql: str,
        args: Sequence[Any],
        budget: float | None = None,
    ) -> Any:
        # Not pool.fetchrow() & co: their acquire has no timeout, so an exhausted
        # pool or a server that does not answer the connect would queue forever.
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        # The whole call's seconds: the timeout, or what a grouped row has left of it.
        budget = self.timeout if budget is None else max(budget, 0.001)
        deadline = loop.time() + budget
        try:
            conn = await self.pool.acquire(timeout=budget)
            try:
                remaining = max(deadline - loop.time(), 0.001)
                result = await getattr(conn, method)(sql, *args, timeout=remaining)
            except BaseException:
                self._give_back(conn)
                raise
            # Answered: nothing to wait for on release (no reset query, no cancel to
            # confirm), so no task of its own.
            await self.pool.release(conn)
            return result
        except _REQUEST_UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        finally:
            self._observe(name, started)

    def _give_back(self, conn: Connection) -> None:
        """Release the connection to the pool without making the caller wait for it.

        asyncpg resets a connection on release (a round trip), and after a
        timed-out statement first waits for the server to confirm the cancel:
        on a hung server, another full timeout. The caller has its answer (or
        its 503) already; the release finishes in the background, bounded by
        the acquire timeout, and asyncpg terminates a connection it cannot reset.
        """
        task = asyncio.ensure_future(self.pool.release(conn))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled():
            task.exception()  # already logged by asyncpg; retrieved so asyncio stays quiet

    def _observe(self, name: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.db_query(name, time.perf_counter() - started)

    def _batch_observer(self, name: str) -> Callable[[float], None] | None:
        if self._metrics is None:
            return None
        return self._metrics.db_batch_rows.labels(query=name).observe

    def pool_stats(self) -> dict[str, int]:
        """Connections by state, for the pool gauge."""
        size = self.pool.get_size()
        idle = self.pool.get_idle_size()
        return {"in_use": size - idle, "idle": idle, "max": self.pool.get_max_size()}
