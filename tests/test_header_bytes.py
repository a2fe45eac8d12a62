"""§5/§6: any header byte sequence is stored and logged safely escaped; bad input never
costs an audit row, and a data error is never reported as the database being unavailable.

The requests go over raw sockets: an HTTP client library would refuse (or re-encode)
the very bytes under test.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import audit
from service.audit import AuditEvent
from service.db.pool import Database
from service.logs import tee
from service.metrics import Metrics
from service.safe_text import MAX_HEADER_TEXT, printable
from tests.conftest import Standin
from tests.helpers import PATH, metric_value, post_session, problem


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every line logged during the test, as production writes them (JSON)."""
    with tee(io.StringIO()) as buffer:
        yield buffer


def _audit_lines(buffer: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]  # all valid JSON
    return [
        line
        for line in lines
        if line.get("logger") == "audit" and line.get("request_id") == request_id
    ]


async def _raw_post(service: Any, token: str, user_agent: bytes, request_id: str) -> int:
    """POST a portal session with these exact User-Agent bytes; the response status."""
    body = orjson.dumps({"user_id": "u_42"})
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-ID: {request_id}\r\nConnection: close\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(service.host, service.port)
    try:
        writer.write(head + b"User-Agent: " + user_agent + b"\r\n\r\n" + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=20)  # until the server closes
    finally:
        writer.close()
    status_line = response.split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


# What arrives (bytes on the wire) and what the audit row and line must hold.
ACCEPTED = {
    "non_utf8": (b"curl/8 \xe9", "curl/8 \\xe9"),
    "broken_utf8": (b"\xff\xfe\xc3(x\xe2\x82", "\\xff\\xfe\\xc3(x\\xe2\\x82"),
    "tab": (b"a\tb", "a\\x09b"),
    # Valid UTF-8 for a C1 control (NEL) and a right-to-left override.
    "unicode_controls": (b"x\xc2\x85y\xe2\x80\xaez", "x\\u0085y\\u202ez"),
    "printable_unicode": ("Mozilla/5.0 (été) 🦊".encode(), "Mozilla/5.0 (été) 🦊"),
    # 7 KiB: under aiohttp's 8190-byte header limit; stored capped (an escape is never cut).
    "long_non_utf8": (b"\xe9" * 7 * 1024, "\\xe9" * (MAX_HEADER_TEXT // 4)),
    "long_ascii": (b"A" * 7 * 1024, "A" * MAX_HEADER_TEXT),
}


@pytest.mark.usefixtures("world")
@pytest.mark.parametrize(("sent", "stored"), ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_any_user_agent_bytes_are_audited_escaped(
    service: Any,
    token: str,
    conn: asyncpg.Connection,
    captured: io.StringIO,
    sent: bytes,
    stored: str,
) -> None:
    assert await _raw_post(service, token, sent, "r-ua") == 201
    rows = await conn.fetch("SELECT request_id, outcome, user_agent FROM audit_events")
    assert [tuple(r) for r in rows] == [("r-ua", "created", stored)]
    (line,) = _audit_lines(captured, "r-ua")
    assert (line["outcome"], line["user_agent"]) == ("created", stored)
    assert "audit_write_failed" not in captured.getvalue()


# Bytes aiohttp's parser refuses before any handler runs: no request, so nothing
# is decided (no Stripe call, nothing to audit), and the service keeps serving.
REFUSED_BY_PARSER = {
    "nul": b"a\x00b",
    "control": b"a\x01b",
    "escape_sequence": b"\x1b[31mred",
    "delete": b"a\x7fb",
    "bare_cr": b"a\rX-Injected: 1",
}


@pytest.mark.usefixtures("world")
@pytest.mark.parametrize("sent", REFUSED_BY_PARSER.values(), ids=REFUSED_BY_PARSER.keys())
async def test_nul_and_control_bytes_are_refused_before_anything_is_decided(
    service: Any, token: str, conn: asyncpg.Connection, standin: Standin, sent: bytes
) -> None:
    assert await _raw_post(service, token, sent, "r-bad") == 400
    assert standin.requests() == []
    assert await conn.fetch("SELECT 1 FROM audit_events") == []
    assert await _raw_post(service, token, b"curl/8", "r-next") == 201


async def test_emit_escapes_what_the_parser_would_refuse(
    database_url: str, conn: asyncpg.Connection, captured: io.StringIO
) -> None:
    """emit itself makes the value safe: every writer (webhooks, CLI) goes through it."""
    db = await Database.connect(database_url)
    try:
        event = AuditEvent(
            request_id="r-emit",
            principal_type="client",
            principal_id="billing",
            action=audit.ACTION_CREATE_SESSION,
            user_agent="nul\x00 cr\r\nlf \udce9 \ud800 \U000e0001 " + "\x00" * 4096,
            stripe_request_id="req_\udce9",
            http_status=201,
        )
        await audit.emit(db, Metrics(), event)
    finally:
        await db.close()
    stored, request_id = await conn.fetchrow(
        "SELECT user_agent, stripe_request_id FROM audit_events"
    )
    assert request_id == "req_\\xe9"
    assert stored.startswith("nul\\x00 cr\\x0d\\x0alf \\xe9 \\ud800 \\U000e0001 \\x00")
    assert len(stored) <= MAX_HEADER_TEXT
    (line,) = _audit_lines(captured, "r-emit")
    assert line["user_agent"] == stored


async def test_data_error_is_not_a_database_outage(
    database_url: str, conn: asyncpg.Connection, captured: io.StringIO
) -> None:
    """What we send can be wrong; that is a bug (500), never "database unavailable" (503)."""
    metrics = Metrics()
    db = await Database.connect(database_url)
    try:
        # asyncpg cannot encode a lone surrogate; Postgres refuses NUL in text. Both are
        # data errors and pass through the pool as such, pooled or on a held connection.
        for value in ("\udce9", "a\x00b"):
            with pytest.raises(asyncpg.DataError):
                await db.execute("probe", "SELECT $1::text", value)
            with pytest.raises(asyncpg.DataError):
                async with db.connection() as connection, connection.transaction():
                    await connection.execute("SELECT $1::text", value)
        # A field emit does not sanitise (it never comes from a header): the row is
        # refused, the failure line is still written, and it is no outage.
        event = AuditEvent(
            request_id="r-refused",
            principal_type="client",
            principal_id="billing",
            action=audit.ACTION_CREATE_SESSION,
            stripe_customer_id="cus_\udce9\x00",
            http_status=201,
        )
        with pytest.raises(audit.AuditRowRefused):
            await audit.emit(db, metrics, event)
    finally:
        await db.close()
    assert await conn.fetch("SELECT 1 FROM audit_events") == []
    (failed,) = _audit_lines(captured, "r-refused")
    assert failed["event"] == "audit_write_failed"
    assert failed["stripe_customer_id"] == "cus_\\xe9\\x00"
    name = "portal_gateway_audit_events_total"
    assert metrics.registry.get_sample_value(name, {"outcome": "write_failed"}) == 1


@pytest.mark.usefixtures("world")
async def test_refused_audit_row_is_a_counted_500_not_database_unavailable(
    service: Any, token: str, conn: asyncpg.Connection, standin: Standin
) -> None:
    await conn.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " RAISE EXCEPTION 'bad text' USING ERRCODE = 'character_not_in_repertoire'; END $$"
    )
    await conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    resp = await post_session(service, {"user_id": "u_42"}, token)
    assert "/p/session/" not in await resp.text()  # no URL without its row
    await problem(resp, 500, "internal_error")
    # A refusal keeps its own answer; the failed row is logged and counted.
    await problem(await post_session(service, {"user_id": "nobody"}, token), 404, "unknown_user")
    assert len(standin.requests()) == 1

    async def count(name: str, **labels: str) -> float:
        return await metric_value(service, name, **labels)

    errors = "portal_gateway_session_errors_total"
    assert await count(errors, code="internal_error") == 1
    assert await count(errors, code="database_unavailable") == 0
    assert await count("portal_gateway_audit_events_total", outcome="write_failed") == 2


# --- the sanitiser -------------------------------------------------------------

_ESCAPE = re.compile(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})|\\U([0-9a-f]{8})")


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        raw, bmp, astral = match.groups()
        if raw is not None:
            code = int(raw, 16)
            return chr(0xDC00 + code) if code >= 0x80 else chr(code)  # a raw byte
        return chr(int(bmp or astral, 16))

    return _ESCAPE.sub(one, text)


def _as_aiohttp_decodes(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


@settings(database=None, max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_printable_makes_any_bytes_safe(data: bytes) -> None:
    text = printable(_as_aiohttp_decodes(data))
    text.encode("utf-8")  # valid UTF-8: no surrogate left
    assert text.isprintable()
    assert "\x00" not in text
    assert len(text) <= MAX_HEADER_TEXT
    orjson.dumps(text)


@settings(database=None, max_examples=200, deadline=None)
@given(st.binary(max_size=100).filter(lambda data: b"\\" not in data))
def test_printable_is_reversible_below_the_cap(data: bytes) -> None:
    """Distinct inputs stay distinct: the escapes decode back to the exact bytes."""
    text = printable(_as_aiohttp_decodes(data))
    assert _unescape(text).encode("utf-8", "surrogateescape") == data


@settings(database=None, max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=600))
def test_printable_ascii_stays_itself(value: str) -> None:
    assert printable(value) == value[:MAX_HEADER_TEXT]
    assert printable(value, None) == value
