"""Group commit: rows appended by concurrent callers, written together in one statement.

An append whose commit is what its caller waits for (the audit row before the
response, SPEC §6) costs Postgres a statement and a commit (a WAL flush) per
row, and the caller a round trip. Here the rows of concurrent callers share
them: each caller queues its row and awaits the commit of the batch that holds
it.

* Idle, a lone row is written at once, by the single-row statement: no timer.
* While a batch is in flight, new rows queue; they go together, by the
  multi-row statement (one prepared statement whatever the batch size), as the
  next batch once the one in flight is done. A batch holds at most
  ``max_rows``.
* A caller returns only once its row is committed; a failed batch fails every
  caller in it with the error one row alone would have had (DatabaseUnavailable
  for an outage, the database's own error otherwise).
* A data error (class 22, or a value asyncpg cannot encode) or a constraint
  violation (class 23) is one row's doing: the batch is retried one row at a
  time (a rare path), so only the bad row's caller gets it.
* A caller cancelled while it waits takes nothing with it: the write runs in a
  task of its own, and the row still commits.
* Each row has the database timeout of a single statement, counted from when
  it was queued: a batch is bounded by the time its oldest row has left, so
  waiting behind a batch in flight does not double a caller's worst case.
* :meth:`GroupInsert.drain` waits until every queued row is written or failed;
  ``Database.close`` calls it before the pool closes.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from service.errors import DatabaseUnavailable

logger = structlog.get_logger("app")

# The errors of one row's data, not of the batch: retried one row at a time.
ROW_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


@dataclass(frozen=True, slots=True)
class GroupedInsert:
    """An INSERT whose rows may be committed together.

    ``sql`` takes one row's values as its parameters; ``batch_sql`` takes one
    array per column (``INSERT … SELECT * FROM unnest($1::type[], …)``), in the
    same order. ``name`` names both in the query metrics.
    """

    name: str
    sql: str
    batch_sql: str
    max_rows: int = 256


# (sql, args, timeout) → runs one statement, mapping an outage to DatabaseUnavailable.
Run = Callable[[str, Sequence[Any], float], Awaitable[Any]]


class _Row:
    __slots__ = ("deadline", "settled", "values", "waiter")

    def __init__(self, values: Sequence[Any], waiter: asyncio.Future[None], deadline: float):
        self.values = values
        self.waiter = waiter
        self.deadline = deadline
        self.settled = False  # written or failed, whether or not its caller still waits


class GroupInsert:
    """The queue and the writer of one :class:`GroupedInsert` on one pool."""

    def __init__(
        self,
        statement: GroupedInsert,
        run: Run,
        timeout: float,
        observe_batch: Callable[[float], None] | None = None,
    ) -> None:
        self.statement = statement
        self._run = run
        self._timeout = timeout
        self._observe_batch = observe_batch
        self._queue: list[_Row] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Rows waiting for a batch (not those of the batch in flight)."""
        return len(self._queue)

    async def insert(self, values: Sequence[Any]) -> None:
        """Return once the row is committed; raise what its write raised."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._queue.append(_Row(values, waiter, loop.time() + self._timeout))
        if self._writer is None:
            # A context of its own: the writer serves many requests, it logs as none of them.
            self._writer = loop.create_task(
                self._write_all(), name=self.statement.name, context=contextvars.Context()
            )
        # Cancelling the caller cancels only this future: the row stays in its batch.
        await waiter

    async def drain(self) -> None:
        """Wait until every row queued so far (and since) is written or failed."""
        while self._writer is not None:
            await asyncio.wait((self._writer,))

    async def _write_all(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.statement.max_rows]
                del self._queue[: self.statement.max_rows]
                await self._write(batch)
        except BaseException:
            # Cancelled (the loop is closing): no one will write the rows still queued.
            queued, self._queue = self._queue, []
            for row in queued:
                self._fail(row, DatabaseUnavailable())
            raise
        finally:
            self._writer = None

    async def _write(self, batch: list[_Row]) -> None:
        now = asyncio.get_running_loop().time()
        rows = []
        for row in batch:
            if row.deadline > now:
                rows.append(row)
            else:  # only after an event-loop stall: a batch ends within its rows' time
                self._fail(row, DatabaseUnavailable())
        if not rows:
            return
        if self._observe_batch is not None:
            self._observe_batch(len(rows))
        try:
            await self._write_rows(rows, min(row.deadline for row in rows) - now)
        except BaseException:
            # This task itself was cancelled (the loop is closing): the rows not answered
            # yet were not written, or not known to be.
            for row in rows:
                self._fail(row, DatabaseUnavailable())
            raise

    async def _write_rows(self, rows: list[_Row], budget: float) -> None:
        try:
            if len(rows) == 1:
                await self._run(self.statement.sql, rows[0].values, budget)
            else:
                columns = list(zip(*(row.values for row in rows), strict=True))
                await self._run(self.statement.batch_sql, columns, budget)
        except ROW_ERRORS as exc:
            if len(rows) == 1:
                self._fail(rows[0], exc)
            else:
                await self._write_one_by_one(rows)
        except Exception as exc:
            for row in rows:
                self._fail(row, exc)
        else:
            for row in rows:
                self._written(row)

    async def _write_one_by_one(self, rows: list[_Row]) -> None:
        for row in rows:
            remaining = row.deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    raise DatabaseUnavailable()
                await self._run(self.statement.sql, row.values, remaining)
            except Exception as exc:
                self._fail(row, exc)
            else:
                self._written(row)

    @staticmethod
    def _written(row: _Row) -> None:
        row.settled = True
        if not row.waiter.done():
            row.waiter.set_result(None)

    def _fail(self, row: _Row, exc: BaseException) -> None:
        if row.settled:
            return
        row.settled = True
        if not row.waiter.done():
            row.waiter.set_exception(exc)
        elif row.waiter.cancelled():
            # Its caller was cancelled while it waited: no one else will say the row is
            # missing.
            logger.error(
                "grouped_insert_failed",
                query=self.statement.name,
                error=type(exc).__name__,
                caller="cancelled",
            )
