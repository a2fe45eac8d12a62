"""Grouped statements: the statements of concurrent callers, run as one.

Each statement of the request path costs Postgres a round trip: a backend woken,
its answer sent, its client woken (on this kind of machine 80 to 100 µs of backend
CPU for a bare ``SELECT 1``), and a write adds a commit (a WAL flush). Here the
statements of concurrent callers share them: each caller queues its values and
awaits the answer of the batch that holds them. Two statements use it: the audit
row before the response (SPEC §6, *group commit*: the batch's rows share one
commit) and the request path's RESOLVE (one read for the lookups of many requests,
from one snapshot taken after each of them was queued).

* Idle, a lone caller's statement runs at once, as the single statement: no timer
  (a lone read in its caller's own task, a write in a task of its own).
* While a batch is in flight, new callers queue; they go together, by the batch
  statement (one prepared statement whatever the batch size), as the next batch
  once the one in flight is done. A batch holds at most ``max_rows``.
* A caller returns only once its batch has run (for a write: is committed), with
  its own answer (for a read: its own row); a failed batch fails every caller in
  it with the error one caller alone would have had (DatabaseUnavailable for an
  outage, the database's own error otherwise).
* A data error (class 22, or a value asyncpg cannot encode) or a constraint
  violation (class 23) is one caller's doing: the batch is run again one caller at
  a time (a rare path), so only that caller gets it.
* A caller cancelled while it waits takes nothing with it: the batch runs in a
  task of its own, and a write still commits.
* Each caller has the database timeout of a single statement, counted from when
  it was queued: a batch is bounded by the time its oldest caller has left, so
  waiting behind a batch in flight does not double a caller's worst case.
* :meth:`StatementGroup.drain` waits until every queued caller is answered;
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

# The errors of one caller's values, not of the batch: run again one caller at a time.
ROW_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


def columns(rows: Sequence[Sequence[Any]]) -> list[Any]:
    """The batch statement's parameters as one array per column, in the same order
    (``INSERT … SELECT * FROM unnest($1::type[], …)``)."""
    return list(zip(*rows, strict=True))


@dataclass(frozen=True, slots=True)
class GroupedStatement:
    """A statement concurrent callers may share.

    ``sql`` takes one caller's values as its parameters; ``batch_sql`` takes
    ``batch_args(values of each caller)``. A write (``returns_rows`` false) answers
    nothing. A read answers each caller one row: ``sql`` its row, ``batch_sql``
    one row per caller, in the callers' order. ``name`` names both in the query
    metrics.
    """

    name: str
    sql: str
    batch_sql: str
    batch_args: Callable[[Sequence[Sequence[Any]]], Sequence[Any]] = columns
    returns_rows: bool = False
    max_rows: int = 256


# (method, sql, args, timeout) → runs one statement, mapping an outage to
# DatabaseUnavailable.
Run = Callable[[str, str, Sequence[Any], float], Awaitable[Any]]


class BatchMismatch(RuntimeError):
    """A batch read answered another number of rows than it had callers (a bug)."""


class _Caller:
    __slots__ = ("deadline", "settled", "values", "waiter")

    def __init__(self, values: Sequence[Any], waiter: asyncio.Future[Any], deadline: float):
        self.values = values
        self.waiter = waiter
        self.deadline = deadline
        self.settled = False  # answered or failed, whether or not it still waits


class StatementGroup:
    """The queue and the runner of one :class:`GroupedStatement` on one pool."""

    def __init__(
        self,
        statement: GroupedStatement,
        run: Run,
        timeout: float,
        observe_batch: Callable[[float], None] | None = None,
    ) -> None:
        self.statement = statement
        self._run = run
        self._timeout = timeout
        self._observe_batch = observe_batch
        self._single = "fetchrow" if statement.returns_rows else "execute"
        self._batch = "fetch" if statement.returns_rows else "execute"
        self._queue: list[_Caller] = []
        self._runner: asyncio.Task[None] | None = None
        # A statement of this group is in flight (the runner's, or a lone read's).
        self._busy = False

    @property
    def queued(self) -> int:
        """Callers waiting for a batch (not those of the batch in flight)."""
        return len(self._queue)

    async def run(self, values: Sequence[Any]) -> Any:
        """This caller's answer (a row, or None for a write) once its batch has run;
        raise what its statement raised."""
        loop = asyncio.get_running_loop()
        if self.statement.returns_rows and not self._busy:
            return await self._run_alone(loop, values)
        waiter: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Caller(values, waiter, loop.time() + self._timeout))
        if not self._busy:
            self._start_runner(loop)
        # Cancelling the caller cancels only this future: its values stay in their batch.
        return await waiter

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, values: Sequence[Any]) -> Any:
        """An idle read runs in its caller's task: no runner to start and wake for the
        common lone lookup (a cancelled read loses nothing). Callers arriving meanwhile
        queue, and go together once it is done."""
        self._busy = True
        try:
            if self._observe_batch is not None:
                self._observe_batch(1)
            return await self._run(self._single, self.statement.sql, values, self._timeout)
        finally:
            self._busy = False
            if self._queue:
                self._start_runner(loop)

    def _start_runner(self, loop: asyncio.AbstractEventLoop) -> None:
        self._busy = True
        # A context of its own: the runner serves many requests, it logs as none of them.
        self._runner = loop.create_task(
            self._run_all(), name=self.statement.name, context=contextvars.Context()
        )

    async def drain(self) -> None:
        """Wait until every caller queued so far (and since) is answered or failed."""
        while self._runner is not None:
            await asyncio.wait((self._runner,))

    async def _run_all(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.statement.max_rows]
                del self._queue[: self.statement.max_rows]
                await self._run_batch(batch)
        except BaseException:
            # Cancelled (the loop is closing): no one will run the callers still queued.
            queued, self._queue = self._queue, []
            for caller in queued:
                self._fail(caller, DatabaseUnavailable())
            raise
        finally:
            self._runner = None
            self._busy = False

    async def _run_batch(self, batch: list[_Caller]) -> None:
        now = asyncio.get_running_loop().time()
        callers = []
        for caller in batch:
            if caller.deadline > now:
                callers.append(caller)
            else:  # only after an event-loop stall: a batch ends within its callers' time
                self._fail(caller, DatabaseUnavailable())
        if not callers:
            return
        if self._observe_batch is not None:
            self._observe_batch(len(callers))
        try:
            await self._run_callers(callers, min(c.deadline for c in callers) - now)
        except BaseException:
            # This task itself was cancelled (the loop is closing): the callers not
            # answered yet were not run, or not known to be.
            for caller in callers:
                self._fail(caller, DatabaseUnavailable())
            raise

    async def _run_callers(self, callers: list[_Caller], budget: float) -> None:
        statement = self.statement
        try:
            if len(callers) == 1:
                answers = [await self._run(self._single, statement.sql, callers[0].values, budget)]
            else:
                args = statement.batch_args([c.values for c in callers])
                result = await self._run(self._batch, statement.batch_sql, args, budget)
                answers = result if statement.returns_rows else [None] * len(callers)
                if len(answers) != len(callers):
                    raise BatchMismatch(
                        f"{statement.name}: {len(answers)} rows for {len(callers)} callers"
                    )
        except ROW_ERRORS as exc:
            if len(callers) == 1:
                self._fail(callers[0], exc)
            else:
                await self._run_one_by_one(callers)
        except Exception as exc:
            for caller in callers:
                self._fail(caller, exc)
        else:
            for caller, answer in zip(callers, answers, strict=True):
                self._answer(caller, answer)

    async def _run_one_by_one(self, callers: list[_Caller]) -> None:
        for caller in callers:
            remaining = caller.deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    raise DatabaseUnavailable()
                answer = await self._run(self._single, self.statement.sql, caller.values, remaining)
            except Exception as exc:
                self._fail(caller, exc)
            else:
                self._answer(caller, answer)

    @staticmethod
    def _answer(caller: _Caller, answer: Any) -> None:
        caller.settled = True
        if not caller.waiter.done():
            caller.waiter.set_result(answer)

    def _fail(self, caller: _Caller, exc: BaseException) -> None:
        if caller.settled:
            return
        caller.settled = True
        if not caller.waiter.done():
            caller.waiter.set_exception(exc)
        elif caller.waiter.cancelled() and not self.statement.returns_rows:
            # Its caller was cancelled while it waited: no one else will say the row is
            # missing.
            logger.error(
                "grouped_insert_failed",
                query=self.statement.name,
                error=type(exc).__name__,
                caller="cancelled",
            )
