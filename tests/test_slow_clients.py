"""Slow or vanishing callers (SPEC §5): in-flight budgets, 408 after the body timeout, 499.

Raw sockets play the hostile or careless clients: a head announcing a body
that never (fully) comes, then holding the connection open or hanging up.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service import keys
from service.app import create_app
from service.logs import tee
from service.metrics import Metrics
from tests.conftest import (
    ALLOWED_ORIGIN,
    STRIPE_TEST_KEY,
    ServiceTestServer,
    Standin,
    make_settings,
)
from tests.helpers import (
    PATH,
    WEBHOOK_PATH,
    WEBHOOK_SECRET,
    created,
    deliver,
    metric_value,
    post_session,
    problem,
    subscription_event,
    until,
)

pytestmark = pytest.mark.usefixtures("world")

PROJECT = Path(__file__).resolve().parent.parent
# Generous for a loaded 2-core machine, and still far below any timeout at play.
PROMPT_SECONDS = 5.0


def _head(path: str, token: str | None = None, content_length: int = 1000) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: gateway",
        "Content-Type: application/json",
        f"Content-Length: {content_length}",
        "Stripe-Signature: t=1,v1=00",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _open_slow_body(
    service: TestClient[Any, Any], path: str, token: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request announcing 1000 body bytes and sending one, then holding the connection."""
    assert service.port is not None
    return await _connect_slow_body(service.host, service.port, path, token)


async def _connect_slow_body(
    host: str, port: int, path: str, token: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(_head(path, token) + b"{")
    await writer.drain()
    return reader, writer


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in filter(None, header_lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def _app(service: TestClient[Any, Any]) -> web.Application:
    app = service.app
    assert isinstance(app, web.Application)
    return app


def _access_lines(log: io.StringIO) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line.get("logger") == "access"]


def _assert_no_crash(log: io.StringIO) -> None:
    text = log.getvalue()
    assert '"status":500' not in text
    assert "unhandled_exception" not in text
    errors = [line for line in text.splitlines() if '"level":"error"' in line]
    assert errors == []


async def test_slow_webhook_bodies_never_take_the_callers_slots(
    make_service: Callable[..., Awaitable[TestClient[Any, Any]]], token: str
) -> None:
    # 300 slow webhook senders against budgets of 16 (callers) and 8 (webhooks);
    # a long body timeout, so the admitted ones hold their slots for the whole test.
    service = await make_service(
        MAX_IN_FLIGHT="16",
        WEBHOOK_MAX_IN_FLIGHT="8",
        BODY_READ_TIMEOUT_SECONDS="60",
        STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET,
    )
    lifecycle = _app(service)[keys.LIFECYCLE]
    refused = {"method": "POST", "route": WEBHOOK_PATH, "status": "503"}
    connections = await asyncio.gather(
        *(_open_slow_body(service, WEBHOOK_PATH) for _ in range(300))
    )
    try:
        with tee(log := io.StringIO()):

            async def all_seen() -> bool:
                shed = await metric_value(service, "portal_gateway_http_requests_total", **refused)
                return bool(shed == 300 - 8)

            await until(all_seen, "all seen", 15)
            assert (lifecycle.webhooks.in_flight, lifecycle.api.in_flight) == (8, 0)
            # What those past the budget got: 503 overloaded at once, and Stripe retries.
            answers = [asyncio.ensure_future(_read_response(r)) for r, _ in connections]

            async def all_read() -> bool:
                return sum(answer.done() for answer in answers) == 300 - 8

            await until(all_read, "all read", 15)
            for answer in answers:
                if not answer.done():  # admitted, still waiting for its body
                    answer.cancel()
                    continue
                status, headers, body = answer.result()
                assert (status, headers["retry-after"]) == (503, "1"), body
                assert orjson.loads(body)["code"] == "overloaded"
            # Our callers are served promptly all along, several at once.
            for _ in range(4):
                started = time.monotonic()
                calls = [post_session(service, {"user_id": "u_42"}, token) for _ in range(5)]
                for resp in await asyncio.gather(*calls):
                    await created(resp)
                assert time.monotonic() - started < PROMPT_SECONDS
            assert (await service.get("/readyz")).status == 200
            event = subscription_event("customer.subscription.updated", "sub_x", "cus_x")
            await problem(await deliver(service, event), 503, "overloaded")
        _assert_no_crash(log)
    finally:
        for _, writer in connections:
            writer.transport.abort()

    async def released() -> bool:
        return lifecycle.in_flight == 0

    await until(released, "released", 15)
    assert (await deliver(service, event)).status == 200


@pytest.mark.parametrize("path", [PATH, WEBHOOK_PATH])
async def test_a_body_not_arriving_in_time_is_408(
    make_service: Callable[..., Awaitable[TestClient[Any, Any]]],
    token: str,
    conn: asyncpg.Connection,
    path: str,
) -> None:
    service = await make_service(BODY_READ_TIMEOUT_SECONDS="0.3")
    with tee(log := io.StringIO()):
        reader, writer = await _open_slow_body(service, path, token if path == PATH else None)
        try:
            started = time.monotonic()
            status, headers, body = await asyncio.wait_for(_read_response(reader), 15)
            waited = time.monotonic() - started
        finally:
            writer.close()
    assert status == 408, body
    assert waited >= 0.25  # it did wait for the body
    assert headers["content-type"].startswith("application/problem+json")
    assert headers["connection"] == "close"
    problem_doc = orjson.loads(body)
    assert problem_doc["code"] == "request_timeout"
    assert problem_doc["request_id"] == headers["x-request-id"]
    (line,) = [a for a in _access_lines(log) if a["route"] == path]
    assert line["status"] == 408
    _assert_no_crash(log)
    assert _app(service)[keys.LIFECYCLE].in_flight == 0
    if path == PATH:  # a decided request: audited like every refusal
        row = await conn.fetchrow("SELECT http_status, error_code, request_id FROM audit_events")
        assert row is not None
        assert dict(row) == {
            "http_status": 408,
            "error_code": "request_timeout",
            "request_id": problem_doc["request_id"],
        }


@pytest.fixture
async def start_service(
    database_url: str, standin: Standin
) -> AsyncIterator[Callable[[bool], Awaitable[TestClient[Any, Any]]]]:
    """The service with handler cancellation on (aiohttp's TestServer) or off (``serve``)."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(handler_cancellation: bool) -> TestClient[Any, Any]:
        app = create_app(make_settings(database_url, standin.url), metrics=Metrics())
        client = TestClient(ServiceTestServer(app, handler_cancellation=handler_cancellation))
        await client.start_server()
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            await client.close()


def _hang_up(writer: asyncio.StreamWriter, how: str) -> None:
    if how == "rst":  # SO_LINGER 0: the close is a TCP reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort() if how == "rst" else writer.close()


@pytest.mark.parametrize(
    ("path", "handler_cancellation", "how"),
    [
        (PATH, False, "rst"),  # as `serve` runs: the body read fails
        (PATH, False, "fin"),
        (PATH, True, "rst"),  # as aiohttp's TestServer runs: the handler is cancelled
        (WEBHOOK_PATH, False, "rst"),
        (WEBHOOK_PATH, True, "fin"),
    ],
)
async def test_a_caller_hanging_up_mid_body_is_499_never_500(
    start_service: Callable[[bool], Awaitable[TestClient[Any, Any]]],
    token: str,
    conn: asyncpg.Connection,
    path: str,
    handler_cancellation: bool,
    how: str,
) -> None:
    service = await start_service(handler_cancellation)
    webhooks = _app(service)[keys.LIFECYCLE].webhooks
    with tee(log := io.StringIO()):
        _, writer = await _open_slow_body(service, path, token if path == PATH else None)

        async def reading_body() -> bool:
            if path != PATH:
                return webhooks.in_flight == 1
            # Past the token lookup, the pipeline is waiting for the body.
            count = await metric_value(
                service, "portal_gateway_db_query_duration_seconds_count", query="find_client"
            )
            return bool(count == 1)

        await until(reading_body, "reading body", 15)
        _hang_up(writer, how)

        async def logged() -> bool:
            return any(a["route"] == path for a in _access_lines(log))

        await until(logged, "logged", 15)
    (line,) = [a for a in _access_lines(log) if a["route"] == path]
    assert line["status"] == 499
    _assert_no_crash(log)
    answered = await metric_value(
        service, "portal_gateway_http_requests_total", method="POST", route=path, status="499"
    )
    assert answered == 1
    if path == PATH:

        async def audited() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM audit_events") == 1)

        await until(audited, "audited", 15)
        row = await conn.fetchrow("SELECT http_status, error_code, outcome FROM audit_events")
        assert row is not None
        assert dict(row) == {
            "http_status": 499,
            "error_code": "client_closed_request",
            "outcome": "abandoned",
        }


async def test_serve_answers_slow_vanishing_and_oversized_callers_the_same(
    database_url: str, standin: Standin, tmp_path: Path
) -> None:
    """``portal-gateway serve`` itself (its own process; no handler cancellation):
    a 408 after the body timeout, a 499 for a hang-up, a problem+json 400 for a
    header over the parser's limit, and never an error line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": STRIPE_TEST_KEY,
        "STRIPE_API_BASE": standin.url,
        "RETURN_URL_ALLOWLIST": ALLOWED_ORIGIN,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_FORMAT": "json",
        "BODY_READ_TIMEOUT_SECONDS": "0.5",
    }
    log = tmp_path / "serve.jsonl"
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

    def lines() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in log.read_text().splitlines() if line]

    async def get(path: str, head: str = "") -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
            return await asyncio.wait_for(_read_response(reader), 15)
        finally:
            writer.close()

    async def up() -> bool:
        assert process.returncode is None, log.read_text()[-2000:]
        try:
            return (await get("/readyz"))[0] == 200
        except OSError:
            return False

    try:
        await until(up, "up", 30)
        status, headers, body = await get("/healthz", f"X-Padding: {'a' * 20 * 1024}\r\n")
        assert (status, orjson.loads(body)["code"]) == (400, "header_too_large")
        assert headers["content-type"].startswith("application/problem+json")
        assert orjson.loads(body)["request_id"] == headers["x-request-id"]

        reader, writer = await _connect_slow_body("127.0.0.1", port, WEBHOOK_PATH)
        status, headers, body = await asyncio.wait_for(_read_response(reader), 15)
        writer.close()
        assert (status, orjson.loads(body)["code"]) == (408, "request_timeout")

        _, writer = await _connect_slow_body("127.0.0.1", port, WEBHOOK_PATH)

        async def reading_body() -> bool:  # the scrape itself, and the webhook
            text = (await get("/metrics"))[2].decode()
            return "portal_gateway_http_requests_in_flight 2.0" in text

        await until(reading_body, "reading body", 15)
        _hang_up(writer, "rst")

        async def logged() -> bool:
            return any(line.get("status") == 499 for line in lines())

        await until(logged, "logged", 15)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    access = [line for line in lines() if line.get("logger") == "access"]
    statuses = [
        (line["route"], line["status"])
        for line in access
        if line["route"] in ("unmatched", WEBHOOK_PATH)
    ]
    assert statuses == [("unmatched", 400), (WEBHOOK_PATH, 408), (WEBHOOK_PATH, 499)]
    assert [line for line in lines() if line.get("level") == "error"] == []
