"""Logs: one JSON object per line, request ids bound, and never a secret or portal URL."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog

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
        "header Bearer abc.def whsec_abcdef "
        "link https://gw.example.com/v1/portal-links/Tok3n_-Tok3n_-Tok3n_-Tok3n_-Tok3n_-Tok3n_-ab"
    )
    masked = redact(text)
    secrets = ("sk_live_abc123", "pgw_abc", "billing.stripe.com", "eyJa", "abc.def", "whsec_")
    for secret in (*secrets, "Tok3n"):
        assert secret not in masked
    # The route template is no secret: access lines keep it.
    assert redact("route /v1/portal-links/{token}") == "route /v1/portal-links/{token}"


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


@pytest.mark.parametrize(
    "url",
    [
        "https://billing.example.com/p/session/live_YWNjdF8xTzBaXzEyMw",
        "https://portal.example.org:8443/p/session/test_YWNjdF8xTz?locale=fr",
        "http://localhost:12111/p/session/test_YWNjdF8xTz",
        "billing.example.com/p/session/test_YWNjdF8xTz",
        "https://example.com/billing/p/session/test_YWNjdF8xTz",
    ],
)
def test_redact_masks_a_portal_session_url_on_any_host(url: str) -> None:
    """A custom portal domain keeps Stripe's /p/session/<token> path: masked on any host."""
    line = orjson.dumps({"event": "x", "url": url, "next": "kept"}).decode()
    masked = redact(line)
    assert "YWNjdF8xTz" not in masked
    assert "/p/session/" not in masked
    assert orjson.loads(masked)["next"] == "kept"  # still one valid JSON object
    assert LEAK_PATTERNS.search(line) is not None  # and the suite would catch it unmasked


def _stdlib_warning(logger: str, msg: str, *args: object) -> None:
    """A standard-library record, handed to the service's handler only.

    Not ``logging.getLogger(...).warning``: pytest's own log capture would keep
    the raw record too, and under xdist ships its text to the controller, which
    can't carry a lone surrogate (the worker dies). The service's handler is what
    is under test.
    """
    record = logging.LogRecord(logger, logging.WARNING, __file__, 0, msg, args, None)
    handlers = [h for h in logging.getLogger().handlers if type(h).__module__ == "service.logs"]
    assert handlers
    for handler in handlers:
        handler.handle(record)


def test_a_log_line_never_raises_for_its_values(captured: io.StringIO) -> None:
    """Lone surrogates (header bytes that were not UTF-8), NUL, non-str keys, huge ints,
    objects whose str() fails, cycles: the line is written, one JSON object, escaped."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no str")

    cyclic: list[Any] = []
    cyclic.append(cyclic)
    values: dict[str, Any] = {
        "user_agent": "curl/8 \udce9",
        "nul": "a\x00b",
        "lone": "\ud800",
        "big": 2**70,
        "obj": Unprintable(),
        "nested": {1: ["\udcff"]},
        "cyclic": cyclic,
    }
    structlog.get_logger("audit").info("audit", **values)
    structlog.get_logger("audit").error("audit_write_failed", user_agent="\udce9")
    _stdlib_warning("aiohttp.server", "bad byte %s", "\udce9")
    first, second, third = _lines(captured)
    assert (first["event"], first["user_agent"]) == ("audit", "curl/8 \\xe9")
    assert (first["nul"], first["lone"]) == ("a\\x00b", "\\ud800")
    assert (first["big"], first["nested"]) == (str(2**70), {"1": ["\\xff"]})
    assert first["obj"] == "<Unprintable>"
    assert (second["event"], second["user_agent"]) == ("audit_write_failed", "\\xe9")
    assert (third["logger"], third["event"]) == ("aiohttp.server", "bad byte \\xe9")
    previous = set_format("console")
    try:
        with tee(io.StringIO()) as console:
            structlog.get_logger("audit").info("audit", **values)
            _stdlib_warning("aiohttp.server", "bad byte %s", "\udce9")
    finally:
        set_format(previous)
    console.getvalue().encode("utf-8")  # writable: no lone surrogate left
    assert "curl/8 \\udce9" in console.getvalue()


def test_alembic_set_up_lines_only_at_debug(captured: io.StringIO) -> None:
    """`migrate` and `make run` at INFO: no plugin, dialect or DDL-mode lines; the
    revisions applied and every warning or error still show."""
    root = logging.getLogger()
    previous = root.level
    plugins = logging.getLogger("alembic.runtime.plugins")
    migration = logging.getLogger("alembic.runtime.migration")
    root.setLevel(logging.INFO)
    try:
        plugins.info("setup plugin %s", "alembic.autogenerate.schemas")
        migration.info("Context impl %s.", "PostgresqlImpl")
        migration.info("Will assume %s DDL.", "transactional")
        migration.info("Running upgrade %s -> %s, %s", "0001", "0002", "Webhook state")
        migration.error("Can't locate revision identified by '%s'", "nope")
    finally:
        root.setLevel(previous)
    migration.info("Context impl %s.", "PostgresqlImpl")  # at DEBUG it is there, as debug
    assert [(line["event"], line["level"]) for line in _lines(captured)] == [
        ("Running upgrade 0001 -> 0002, Webhook state", "info"),
        ("Can't locate revision identified by 'nope'", "error"),
        ("Context impl PostgresqlImpl.", "debug"),
    ]
