"""One Redis connection per replica, shared by every request (SPEC §14).

redis-py's client gives each command in flight a pooled connection of its own
and wraps every send and read in timers. Redis answers the commands of one
connection in the order they were sent, so one connection can carry them all:
the commands asked for in one turn of the event loop go out in one write, and
one reader task hands the replies back, in order, to the callers waiting for
them. Measured on the 2-core VM with uvloop, this process's CPU per decision
(rate limit / Stripe budget script) with 50 in flight: 53-58 / 65-78 µs, and
35-50 / 48-56 µs with hiredis parsing, against 98-142 / 65-172 µs through
redis-py's client; one at a time ~195 against ~280 µs.

redis-py still connects, authenticates, selects the database, speaks TLS and
parses RESP; only the sharing is ours. A failed connection fails every command
waiting on it and is never used again; the next command opens a new one.
Timeouts are the caller's (:class:`service.shared_redis.SharedRedis` bounds
each call): a caller that gives up leaves its reply to be read and dropped, so
the replies of the others stay in step. Blocking commands (BLPOP and the like)
must not come here: every caller behind one would wait with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

Arg = str | int | float | bytes


class _Link:
    """One connection, the callers waiting for its replies (oldest first), its reader."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.waiting: deque[asyncio.Future[Any]] = deque()
        # Commands asked for in this turn of the event loop, not written yet (a writer
        # task is scheduled whenever there are some), and the last writer task.
        self.outgoing: list[bytes] = []
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.error: RedisError | None = None

    def fail(self, error: RedisError) -> None:
        """Every caller still waiting gets ``error``; later ones too (idempotent)."""
        if self.error is None:
            self.error = error
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(self.error)


class MultiplexedRedis:
    """The commands of concurrent callers over one connection; see the module."""

    def __init__(self, pool: redis.asyncio.ConnectionPool) -> None:
        # Only a factory of configured connections: none is ever given back to it.
        self._pool = pool
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float) -> MultiplexedRedis:
        """No I/O: the first command connects."""
        pool = redis.asyncio.ConnectionPool.from_url(
            url,
            # No read timeout: the reader waits as long as commands are in flight; each
            # caller bounds its own wait.
            socket_timeout=None,
            socket_connect_timeout=connect_timeout,
            # No retries inside redis-py: a failed call falls back at once, and a retry
            # would stretch the bound a request waits for Redis.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(pool)

    async def execute(self, *args: Arg) -> Any:
        """Send one command and wait for its reply; an error reply is raised
        (``ResponseError``), a lost connection too (``ConnectionError``)."""
        link = await self._connected()
        packed = link.connection.pack_command(*args)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # No await between the two: the reader matches replies to callers by order.
        link.waiting.append(reply)
        first_of_turn = not link.outgoing
        link.outgoing += packed
        if first_of_turn:
            # Written by a task of its own, in the next turn of the loop: one write for
            # every caller ready in this one, and a caller that gives up (cancelled)
            # never takes the others' commands with it.
            link.writer = asyncio.create_task(self._write(link), name="redis-writer")
        return await reply

    async def _write(self, link: _Link) -> None:
        """Write the commands asked for since the last write, in their order."""
        outgoing, link.outgoing = link.outgoing, []
        if link.error is not None:
            return  # dropped meanwhile: its callers have their error already
        try:
            await link.connection.send_packed_command(outgoing, check_health=False)
        except Exception as exc:  # the callers get it as a lost connection
            await self._drop(link, exc)
        except BaseException:
            # Cancelled in the middle of a write (redis-py closed the socket then).
            await self._drop(link, RedisConnectionError("write interrupted"))
            raise

    async def _connected(self) -> _Link:
        link = self._link
        if link is not None and link.error is None:
            return link
        async with self._connecting:
            link = self._link
            if link is not None and link.error is None:
                return link
            # Configured from the URL (AUTH, SELECT, TLS); redis-py leaves it unannotated.
            connection: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await _close(connection)
                raise
            link = _Link(connection)
            link.reader = asyncio.create_task(self._read(link), name="redis-reader")
            self._link = link
            return link

    async def _read(self, link: _Link) -> None:
        """Hand each reply of ``link``'s connection to the oldest caller waiting."""
        while True:
            try:
                value: Any = await link.connection.read_response()
            except ResponseError as exc:  # an error reply: the caller's, not the connection's
                value = exc
            except Exception as exc:  # whatever it is, the stream is lost
                await self._drop(link, exc)
                return
            if not link.waiting:
                # A reply nobody asked for: out of step, so nothing after it can be trusted.
                await self._drop(link, RedisConnectionError("unexpected reply"))
                return
            waiter = link.waiting.popleft()
            if waiter.done():  # its caller gave up (timeout, hang-up): drop the reply
                continue
            if isinstance(value, ResponseError):
                waiter.set_exception(value)
            else:
                waiter.set_result(value)

    async def _drop(self, link: _Link, exc: BaseException) -> None:
        """Fail ``link``'s callers, forget it, close its socket and stop its reader."""
        error = exc if isinstance(exc, RedisError) else RedisConnectionError(type(exc).__name__)
        link.fail(error)
        if self._link is link:
            self._link = None
        for task in (link.reader, link.writer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        await _close(link.connection)

    async def reset(self) -> None:
        """Drop the connection (after a timeout it may be half dead); the next command
        opens a new one."""
        if self._link is not None:
            await self._drop(self._link, RedisConnectionError("reset"))

    async def aclose(self) -> None:
        """Close the connection and stop its reader."""
        link = self._link
        await self.reset()
        if link is not None and link.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await link.reader
        await self._pool.aclose()


async def _close(connection: AbstractConnection) -> None:
    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        await connection.disconnect(nowait=True)
