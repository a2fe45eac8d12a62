"""One Redis connection shared by every request (service/redis_multiplex.py),
against a real, throwaway ``redis-server``.

What the sharing must never do: hand a caller another caller's reply. So the
replies of many callers at once, some of them giving up mid-flight and some
getting an error reply, each reach their own caller, over one connection; a
Redis killed mid-flight fails the callers waiting at once, and the next
command connects again; a Redis that forgot the scripts still runs them; the
URL's password and database hold, over TCP and over a Unix socket.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.config import Settings
from service.logs import tee
from service.ratelimit import SharedRateLimiter
from service.redis_multiplex import MultiplexedRedis
from service.shared_redis import SharedRedis
from tests.helpers import with_real_servers
from tests.redis_server import RedisServer

KEY = "sk_test_multiplex0123456789abc"


@pytest.fixture
async def mux(redis_server: RedisServer) -> AsyncIterator[MultiplexedRedis]:
    client = MultiplexedRedis.from_url(redis_server.url, connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


def _clients_of_others(redis_server: RedisServer) -> int:
    """Connections to the server other than the one this check opens."""
    with redis_server.client() as client:
        return len(client.client_list()) - 1


async def test_concurrent_commands_share_one_connection_each_with_its_own_reply(
    mux: MultiplexedRedis, redis_server: RedisServer
) -> None:
    replies = await asyncio.gather(*(mux.execute("ECHO", f"caller-{n}") for n in range(300)))
    assert replies == [f"caller-{n}".encode() for n in range(300)]
    assert _clients_of_others(redis_server) == 1


# One caller: its value, and what it does: wait for its reply, give up after
# some turns of the event loop (a timeout, a hang-up), or send a command Redis
# answers with an error.
caller = st.tuples(st.sampled_from(["wait", "give_up", "error"]), st.integers(0, 3))


@with_real_servers(max_examples=60)
@given(callers=st.lists(caller, min_size=1, max_size=40))
async def test_callers_giving_up_or_refused_leave_the_others_their_own_replies(
    mux: MultiplexedRedis, redis_server: RedisServer, callers: list[tuple[str, int]]
) -> None:
    async def call(n: int, kind: str) -> Any:
        if kind == "error":
            return await mux.execute("INCR", f"not-a-number-{n}")
        return await mux.execute("ECHO", f"caller-{n}")

    with redis_server.client() as client:
        for n, (kind, _) in enumerate(callers):
            if kind == "error":
                client.set(f"not-a-number-{n}", "x")
    tasks = [asyncio.create_task(call(n, kind)) for n, (kind, _) in enumerate(callers)]
    for n, (kind, turns) in enumerate(callers):
        if kind == "give_up":
            for _ in range(turns):
                await asyncio.sleep(0)
            tasks[n].cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for n, ((kind, _), outcome) in enumerate(zip(callers, outcomes, strict=True)):
        if kind == "error":
            assert isinstance(outcome, ResponseError), outcome
        elif kind == "wait":
            assert outcome == f"caller-{n}".encode()
        else:  # gave up: cancelled, or its reply came first
            assert isinstance(outcome, asyncio.CancelledError) or outcome == f"caller-{n}".encode()
    # Still in step, on the same one connection.
    assert await mux.execute("ECHO", "after") == b"after"
    assert _clients_of_others(redis_server) == 1


async def test_redis_killed_mid_flight_fails_the_waiting_callers_then_connects_again(
    mux: MultiplexedRedis, redis_server: RedisServer
) -> None:
    assert await mux.execute("PING") in (b"PONG", "PONG", True)
    redis_server.pause()  # the commands are written, no reply comes
    waiting = [asyncio.create_task(mux.execute("ECHO", f"lost-{n}")) for n in range(5)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in waiting)
    assert redis_server.process is not None
    redis_server.process.kill()
    redis_server.process.wait(5)
    outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert all(isinstance(outcome, RedisConnectionError) for outcome in outcomes), outcomes
    # Back on the same port: the next command opens a new connection.
    redis_server.start()
    assert await mux.execute("ECHO", "again") == b"again"


async def test_a_redis_that_forgot_the_scripts_still_runs_them(
    redis_server: RedisServer,
) -> None:
    settings_ = Settings.from_env({"STRIPE_API_KEY": KEY, "REDIS_URL": redis_server.url})
    redis = SharedRedis.from_settings(settings_, None)
    try:
        limiter = SharedRateLimiter(redis, None)
        assert (await limiter.acquire("client:a", 2)).wait == 0
        with redis_server.client() as client:
            client.script_flush()
        # Run from its source this time (not decided alone: the bucket is Redis's).
        assert (await limiter.acquire("client:a", 2)).wait == 0
        assert (await limiter.acquire("client:a", 2)).wait > 0
        assert redis.up
    finally:
        await redis.close()


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that wants a password, on a port and on a Unix socket (its
    path short enough for sun_path: not under pytest's long tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="rds", dir="/tmp") as short:
        server = RedisServer(tmp_path, password="s3cret-pass", unix_socket=Path(short) / "r.sock")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_the_urls_password_and_database_hold(
    locked_server: RedisServer, transport: str
) -> None:
    if transport == "tcp":
        url = f"redis://:s3cret-pass@127.0.0.1:{locked_server.port}/3"
    else:
        url = f"unix://:s3cret-pass@{locked_server.unix_socket}?db=3"
    settings_ = Settings.from_env({"STRIPE_API_KEY": KEY, "REDIS_URL": url})
    redis = SharedRedis.from_settings(settings_, None)
    try:
        assert await redis.probe()
        limiter = SharedRateLimiter(redis, None)
        assert (await limiter.acquire("client:a", 1)).wait == 0
        assert (await limiter.acquire("client:a", 1)).wait > 0  # Redis's bucket, not local
    finally:
        await redis.close()
    with locked_server.client(db=0) as client:
        assert client.dbsize() == 0  # nothing in database 0 ...
    with locked_server.client(db=3) as client:
        assert client.dbsize() == 2  # ... the bucket and its refusal window are in 3

    wrong = url.replace("s3cret-pass", "not-the-pass")
    settings_ = Settings.from_env({"STRIPE_API_KEY": KEY, "REDIS_URL": wrong})
    redis = SharedRedis.from_settings(settings_, None)
    buffer = io.StringIO()
    try:
        with tee(buffer):
            assert not await redis.probe()  # refused: decided alone, never raised
        assert not redis.up
    finally:
        await redis.close()
    assert "redis_unavailable" in buffer.getvalue()
    assert "not-the-pass" not in buffer.getvalue()
