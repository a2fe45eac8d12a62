"""Logs: one JSON object per line, request ids bound, and never a secret or portal URL."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from service.logs import redact, set_format, tee
from tests.conftest import LEAK_PATTERNS, STRIPE_TEST_KEY, Standin
from tests.helpers import created, post_session, problem

pytestmark = pytest.mark.usefixtures("world")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A copy of every line the service logs during the test, formatted for production."""
    with tee(io.StringIO()) as buffer:
        yield buffer


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


async def test_every_path_logs_json_without_secrets(
    service: Any, token: str, standin: Standin, conn: Any, captured: io.StringIO
) -> None:
    ok = await created(
        await post_session(service, {"user_id": "u_42"}, token, {"X-Request-ID": "r-ok"})
    )
    await problem(
        await post_session(service, {"user_id": "u_42"}, "pgw_" + "x" * 43), 401, "unauthenticated"
    )
    await problem(
        await post_session(service, {"user_id": "u_42"}, "eyJhbGciOi.eyJzdWIiOi.c2ln"),
        401,
        "unauthenticated",
    )
    await problem(await post_session(service, {"user_id": "nobody"}, token), 404, "unknown_user")
    await problem(
        await post_session(service, {"user_id": "u_42", "locale": "x"}, token),
        422,
        "validation_failed",
    )
    standin.state.missing_ids.add("cus_42")
    await problem(await post_session(service, {"user_id": "u_42"}, token), 502, "upstream_rejected")
    # An unexpected failure: a table vanishes under the running service.
    await conn.execute("ALTER TABLE plans RENAME TO plans_gone")
    await problem(await post_session(service, {"user_id": "u_42"}, token), 500, "internal_error")

    text = captured.getvalue()
    assert LEAK_PATTERNS.search(text) is None, text
    for secret in (ok["url"], token, STRIPE_TEST_KEY):
        assert secret not in text
    lines = _lines(captured)  # every line parses as JSON
    access = [line for line in lines if line.get("logger") == "access"]
    assert [a["status"] for a in access] == [201, 401, 401, 404, 422, 502, 500]
    first = access[0]
    assert first["request_id"] == "r-ok"
    assert first["route"] == "/v1/portal-sessions"
    assert (first["principal_type"], first["user_id"]) == ("client", "u_42")
    assert first["upstream_request_id"].startswith("req_")
    audit = [line for line in lines if line.get("logger") == "audit"]
    assert {a["outcome"] for a in audit} >= {"created", "refused", "failed", "unauthenticated"}
    crash = next(line for line in lines if line.get("event") == "unhandled_exception")
    assert crash["level"] == "error"
    assert crash["exception"]  # a structured stack


def test_redact_masks_what_slips_through() -> None:
    text = (
        "key sk_live_abc123 token pgw_abcdefghijklmnopqrstuvwxyz0123456789 "
        "url https://billing.stripe.com/p/session/test_abc jwt eyJa.eyJb.c2ln "
        "header Bearer abc.def whsec_abcdef"
    )
    masked = redact(text)
    for secret in ("sk_live_abc123", "pgw_abc", "billing.stripe.com", "eyJa", "abc.def", "whsec_"):
        assert secret not in masked


ACCESS_FIELDS = {
    "request_id",
    "method",
    "route",
    "status",
    "duration_ms",
    "principal_type",
    "principal_id",
    "user_id",
    "flow",
    "upstream_request_id",
    "attempts",
}


async def test_one_canonical_access_line_per_request(
    service: Any, token: str, captured: io.StringIO
) -> None:
    body = {"user_id": "u_42", "flow": {"type": "subscription_cancel"}}
    await created(await post_session(service, body, token, {"X-Request-ID": "r-canon"}))
    await service.get("/healthz")
    lines = _lines(captured)
    access = [line for line in lines if line.get("logger") == "access"]
    assert [a["route"] for a in access] == ["/v1/portal-sessions", "/healthz"]
    line = access[0]
    assert set(line) >= ACCESS_FIELDS | {"event", "level", "timestamp"}
    assert line["request_id"] == "r-canon"
    assert (line["method"], line["status"]) == ("POST", 201)
    assert isinstance(line["duration_ms"], float)
    assert (line["principal_type"], line["principal_id"]) == ("client", "billing-frontend")
    assert (line["user_id"], line["flow"], line["attempts"]) == ("u_42", "subscription_cancel", 1)
    assert line["upstream_request_id"].startswith("req_")
    # The audit stream is its own logger, for the same request.
    (audit,) = [a for a in lines if a.get("logger") == "audit"]
    assert (audit["event"], audit["request_id"], audit["outcome"]) == (
        "audit",
        "r-canon",
        "created",
    )


async def test_access_line_of_a_failed_upstream_call(
    service: Any, token: str, standin: Standin, captured: io.StringIO
) -> None:
    standin.state.queue_faults([{"status": 500, "repeat": 3}])
    await problem(
        await post_session(service, {"user_id": "u_42"}, token), 503, "upstream_unavailable"
    )
    (line,) = [a for a in _lines(captured) if a.get("logger") == "access"]
    assert line["status"] == 503
    assert line["attempts"] == 3  # STRIPE_MAX_RETRIES=2
    assert line["upstream_request_id"].startswith("req_")
    assert (line["user_id"], line["flow"]) == ("u_42", "home")


def test_stdlib_loggers_write_one_json_object_per_line(captured: io.StringIO) -> None:
    logging.getLogger("aiohttp.server").error("Error handling request from %s", "10.0.0.1")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade -> 0001")
    try:
        raise ConnectionResetError("gone")
    except ConnectionResetError:
        logging.getLogger("asyncpg.pool").exception("connection lost")
    first, second, third = _lines(captured)  # exactly three lines, each one JSON object
    assert first == {
        "event": "Error handling request from 10.0.0.1",
        "level": "error",
        "logger": "aiohttp.server",
        "timestamp": first["timestamp"],
    }
    assert (second["logger"], second["level"]) == ("alembic.runtime.migration", "info")
    assert third["logger"] == "asyncpg.pool"
    (exc,) = third["exception"]  # the exception as structured fields
    assert (exc["exc_type"], exc["exc_value"]) == ("ConnectionResetError", "gone")
    assert exc["frames"]
    # Frames without their local variables: those can hold secrets.
    assert all("locals" not in frame for frame in exc["frames"])


async def test_console_format_for_development(service: Any, token: str) -> None:
    previous = set_format("console")
    try:
        with tee(io.StringIO()) as buffer:
            await created(await post_session(service, {"user_id": "u_42"}, token))
            logging.getLogger("aiohttp.server").warning("slow client")
    finally:
        set_format(previous)
    text = buffer.getvalue()
    assert text
    for line in text.splitlines():
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(line)
    assert "[access" in text
    assert "route=/v1/portal-sessions" in text
    assert "[aiohttp.server" in text
    assert "slow client" in text
    assert LEAK_PATTERNS.search(text) is None
