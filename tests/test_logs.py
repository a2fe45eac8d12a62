"""Logs: one JSON object per line, request ids bound, and never a secret or portal URL."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from service.logs import redact
from tests.conftest import LEAK_PATTERNS, STRIPE_TEST_KEY, Standin
from tests.helpers import created, post_session, problem

pytestmark = pytest.mark.usefixtures("world")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A copy of every line the service logs during the test, formatted for production."""
    root = logging.getLogger()
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)


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
