"""§8 graceful shutdown of the real process (``python -m service serve``).

SIGTERM: /readyz turns 503 at once, new work is refused with 503 draining,
every request in flight finishes, then the listener closes, the Stripe session
and the pool close, and the process exits 0 within SHUTDOWN_TIMEOUT. The
Stripe stand-in runs in the test's own event loop with 1 s of latency, so the
requests are really in flight when the signal lands.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.conftest import ALLOWED_ORIGIN, LEAK_PATTERNS, STRIPE_TEST_KEY, Standin
from tests.helpers import PATH, until

PROJECT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("world")


@dataclass
class Served:
    """The service running as its own process."""

    process: asyncio.subprocess.Process
    base: str
    port: int
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.log.read_text().splitlines() if line]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _leaks(folder: Path) -> list[str]:
    """Log lines of the served processes that show a secret or a portal URL."""
    return [
        line
        for path in folder.glob("serve-*.jsonl")
        for line in path.read_text().splitlines()
        if LEAK_PATTERNS.search(line)
    ]


@pytest.fixture
async def serve(
    database_url: str, standin: Standin, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(**extra: str) -> Served:
        port = _free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": database_url,
            "STRIPE_API_KEY": STRIPE_TEST_KEY,
            "STRIPE_API_BASE": standin.url,
            "RETURN_URL_ALLOWLIST": ALLOWED_ORIGIN,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "LOG_FORMAT": "json",
            **extra,
        }
        log = tmp_path / f"serve-{port}.jsonl"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service",
                "serve",
                cwd=PROJECT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        processes.append(process)
        served = Served(process, f"http://127.0.0.1:{port}", port, log)

        async def up() -> bool:
            assert process.returncode is None, log.read_text()[-2000:]
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(served.base + "/readyz") as resp,
                ):
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await until(up, "the service answering /readyz 200", 30)
        return served

    try:
        yield start
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        leaks = _leaks(tmp_path)
        assert leaks == [], leaks[:3]


async def _status(url: str, method: str = "GET", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    # A fresh connection each time: what a load balancer's probe or a new client does.
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # raced the listener's close: ask again
        return False
    writer.close()
    await writer.wait_closed()
    return False


# Both event loops EVENT_LOOP offers: signals, the drain and the pool's close behave alike.
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_sigterm_drains_50_in_flight_requests_then_exits_0(
    serve: Callable[..., Any],
    standin: Standin,
    token: str,
    conn: asyncpg.Connection,
    event_loop: str,
) -> None:
    shutdown_timeout = 10.0
    served: Served = await serve(SHUTDOWN_TIMEOUT=str(shutdown_timeout), EVENT_LOOP=event_loop)
    standin.state.set_latency(1000)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = orjson.dumps({"user_id": "u_42"})

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def post() -> tuple[int, dict[str, Any]]:
            async with http.post(served.base + PATH, data=body, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

        in_flight = [asyncio.ensure_future(post()) for _ in range(50)]

        async def all_at_stripe() -> bool:
            return len(standin.requests()) == 50

        await until(all_at_stripe, "50 requests reaching Stripe", 10)
        served.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # Readiness turns 503 at once, and new work is refused while the 50 finish.
        async def not_ready() -> bool:
            return (await _status(served.base + "/readyz"))[0] == 503

        await until(not_ready, "/readyz 503 after SIGTERM", 0.5)
        status, ready = await _status(served.base + "/readyz")
        assert (status, ready["checks"]["draining"]) == (503, "yes")
        status, refused = await _status(served.base + PATH, "POST", data=body, headers=headers)
        assert (status, refused["code"]) == (503, "draining")
        assert not any(task.done() for task in in_flight)  # all of that while they ran

        results = await asyncio.gather(*in_flight)

    assert [status for status, _ in results] == [201] * 50
    assert len({answer["id"] for _, answer in results}) == 50

    async def listener_closed() -> bool:
        return await _refused(served.port)

    await until(listener_closed, "new connections refused", shutdown_timeout)
    code = await asyncio.wait_for(served.process.wait(), timeout=shutdown_timeout)
    assert code == 0
    assert time.monotonic() - signalled < shutdown_timeout
    assert len(standin.requests()) == 50  # the refused request never reached Stripe

    events = [line.get("event") for line in served.lines()]
    assert events.index("draining") < events.index("stopped")
    (serving,) = [line for line in served.lines() if line.get("event") == "serving"]
    assert serving["event_loop"] == event_loop
    created = await conn.fetchval("SELECT count(*) FROM audit_events WHERE http_status = 201")
    assert created == 50


async def test_requests_longer_than_shutdown_timeout_do_not_hold_the_exit(
    serve: Callable[..., Any], standin: Standin, token: str
) -> None:
    served: Served = await serve(SHUTDOWN_TIMEOUT="0.5")
    standin.state.set_latency(30_000)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        stuck = asyncio.ensure_future(
            http.post(served.base + PATH, data=orjson.dumps({"user_id": "u_42"}), headers=headers)
        )

        async def at_stripe() -> bool:
            return len(standin.requests()) == 1

        await until(at_stripe, "the request reaching Stripe", 10)
        served.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.wait_for(served.process.wait(), timeout=10)
        assert code == 0
        # SHUTDOWN_TIMEOUT, then at most the final grace and the cleanup.
        assert time.monotonic() - signalled < 0.5 + 3
        with pytest.raises(aiohttp.ClientError):
            await stuck
    assert "drain_timeout" in [line.get("event") for line in served.lines()]


async def test_metrics_port_serves_metrics_apart_from_the_api(serve: Callable[..., Any]) -> None:
    # SPEC §5: with METRICS_PORT the API port has no /metrics (its ingress shows no internals).
    metrics_port = _free_port()
    served: Served = await serve(METRICS_PORT=str(metrics_port))
    scrape = f"http://127.0.0.1:{metrics_port}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(served.base + "/metrics") as resp:
            assert resp.status == 404
            assert (await resp.json(content_type=None))["code"] == "not_found"
        async with http.get(scrape) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "portal_gateway_build_info" in text
        assert "portal_gateway_ready 1.0" in text
        async with http.get(f"http://127.0.0.1:{metrics_port}/readyz") as resp:
            assert resp.status == 404
    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.process.wait(), timeout=10) == 0
    assert await _refused(metrics_port)
    (serving,) = [line for line in served.lines() if line.get("event") == "serving"]
    assert serving["metrics_port"] == metrics_port
