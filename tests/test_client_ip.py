"""SPEC §5 client IP: the connecting address, unless it is a trusted proxy; then
the rightmost ``X-Forwarded-For`` address that is not one.

The rule on its own (``service.client_ip.resolve``), then through the real
service: the audit row of a portal session, the 401's audit log line, the
access line and a webhook's audit row. The test client connects from
127.0.0.1, so ``TRUSTED_PROXIES=127.0.0.1/32`` makes it the ingress.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from service.client_ip import parse_address, resolve
from service.logs import tee
from tests.conftest import STRIPE_TEST_KEY
from tests.helpers import (
    WEBHOOK_PATH,
    WEBHOOK_SECRET,
    created,
    post_session,
    problem,
    stripe_signature,
    subscription_event,
)

pytestmark = pytest.mark.usefixtures("world")

INGRESS = "127.0.0.1"  # the test client's address: the "ingress pod"
CLIENT = "198.51.100.7"


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


TRUSTED = _nets("10.0.0.0/8", "127.0.0.1/32", "2001:db8:ff::/48")


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # Not from a trusted proxy: the header is never believed.
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),
        ("203.0.113.9", [], "203.0.113.9"),
        # From the ingress: the address it appended.
        (INGRESS, [CLIENT], CLIENT),
        # The client's own (forged) entries stand left of what the ingress appended.
        (INGRESS, [f"6.6.6.6, 10.1.1.1, {CLIENT}"], CLIENT),
        # Through a chain of our proxies: the first address none of them vouches for.
        (INGRESS, [f"6.6.6.6, {CLIENT}, 10.1.1.1, 10.2.2.2"], CLIENT),
        # Several X-Forwarded-For headers are one list, in order.
        (INGRESS, ["6.6.6.6", f"{CLIENT}, 10.1.1.1"], CLIENT),
        # Malformed entries are skipped, never returned.
        (INGRESS, [f"{CLIENT}, unknown, , not-an-ip, 999.1.1.1"], CLIENT),
        (INGRESS, ["unknown"], INGRESS),
        # Only trusted addresses: the farthest one; no usable header: the peer.
        (INGRESS, ["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
        (INGRESS, ["10.1.1.1, garbage"], "10.1.1.1"),
        (INGRESS, [], INGRESS),
        # Ports, brackets, IPv6, IPv4-mapped: normalised.
        (INGRESS, ["203.0.113.5:4711"], "203.0.113.5"),
        (INGRESS, ["[2001:DB8::7]:443"], "2001:db8::7"),
        (INGRESS, ["2001:db8::7, 2001:db8:ff::1"], "2001:db8::7"),
        (INGRESS, ["::ffff:203.0.113.5"], "203.0.113.5"),
        (INGRESS, ["fe80::1%eth0"], "fe80::1"),
        ("::ffff:10.9.9.9", [CLIENT], CLIENT),
        # Not an address at all (a Unix socket): passed through untouched.
        (None, [CLIENT], None),
    ],
)
def test_the_rule(peer: str | None, headers: list[str], expected: str | None) -> None:
    resolved = resolve(peer, headers, TRUSTED)
    assert resolved == expected
    if resolved is not None:
        assert parse_address(resolved) is not None  # what Postgres' inet takes


@pytest.mark.parametrize(
    "text", ["", " ", "1.2.3", "1.2.3.4:", "1.2.3.4:x", "1.2.3.4:123456", "[::1", "[::1]x", "a:b"]
)
def test_malformed_entries(text: str) -> None:
    assert parse_address(text) is None


async def _audit_ip(conn: asyncpg.Connection) -> str:
    row = await conn.fetchrow("SELECT client_ip FROM audit_events ORDER BY id DESC LIMIT 1")
    assert row is not None
    return str(row["client_ip"])


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    with tee(buffer):
        yield buffer


def _logged(buffer: io.StringIO, logger: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    return [line for line in lines if line.get("logger") == logger]


async def test_behind_a_trusted_ingress_the_audit_row_has_the_client(
    make_service: Any, token: str, conn: asyncpg.Connection, captured: io.StringIO
) -> None:
    service = await make_service(TRUSTED_PROXIES=f"{INGRESS}/32,10.0.0.0/8")
    forwarded = {"X-Forwarded-For": f"6.6.6.6, {CLIENT}, 10.0.0.12"}
    await created(await post_session(service, {"user_id": "u_42"}, token, forwarded))
    assert await _audit_ip(conn) == CLIENT
    # A refusal's row too, and the 401 that gets only a log line.
    await problem(
        await post_session(service, {"user_id": "nobody"}, token, forwarded), 404, "unknown_user"
    )
    assert await _audit_ip(conn) == CLIENT
    await problem(
        await post_session(service, {"user_id": "u_42"}, "pgw_" + "x" * 43, forwarded),
        401,
        "unauthenticated",
    )
    (anonymous,) = [a for a in _logged(captured, "audit") if a.get("outcome") == "unauthenticated"]
    assert anonymous["client_ip"] == CLIENT
    assert {a["client_ip"] for a in _logged(captured, "access")} == {CLIENT}


async def test_an_untrusted_peer_cannot_choose_its_address(
    make_service: Any, token: str, conn: asyncpg.Connection, captured: io.StringIO
) -> None:
    # A proxy list that does not include the caller: its header is ignored.
    service = await make_service(TRUSTED_PROXIES="10.0.0.0/8")
    spoofed = {"X-Forwarded-For": CLIENT}
    await created(await post_session(service, {"user_id": "u_42"}, token, spoofed))
    assert await _audit_ip(conn) == INGRESS
    await problem(
        await post_session(service, {"user_id": "u_42"}, "pgw_" + "x" * 43, spoofed),
        401,
        "unauthenticated",
    )
    (anonymous,) = [a for a in _logged(captured, "audit") if a.get("outcome") == "unauthenticated"]
    assert anonymous["client_ip"] == INGRESS


async def test_without_trusted_proxies_the_header_means_nothing(
    service: Any, token: str, conn: asyncpg.Connection
) -> None:
    headers = {"X-Forwarded-For": CLIENT}
    await created(await post_session(service, {"user_id": "u_42"}, token, headers))
    assert await _audit_ip(conn) == INGRESS


async def test_malformed_forwarded_for_costs_no_audit_row(
    make_service: Any, token: str, conn: asyncpg.Connection
) -> None:
    service = await make_service(TRUSTED_PROXIES=f"{INGRESS}/32")
    headers = {"X-Forwarded-For": "garbage, ::::, 1.2.3.4.5, [::1"}
    await created(await post_session(service, {"user_id": "u_42"}, token, headers))
    assert await _audit_ip(conn) == INGRESS


async def test_webhook_audit_row_has_the_client_behind_the_ingress(
    make_service: Any, conn: asyncpg.Connection
) -> None:
    service = await make_service(
        STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET, TRUSTED_PROXIES=f"{INGRESS}/32"
    )
    event = subscription_event(
        "customer.subscription.updated",
        "sub_42a",
        "cus_42",
        items=[("si_42a", "price_basic", 4)],
    )
    payload = orjson.dumps(event)
    resp = await service.post(
        WEBHOOK_PATH,
        data=payload,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": stripe_signature(payload),
            "X-Forwarded-For": CLIENT,
        },
    )
    assert resp.status == 200, await resp.text()
    row = await conn.fetchrow("SELECT client_ip FROM audit_events WHERE principal_type = 'stripe'")
    assert row is not None
    assert str(row["client_ip"]) == CLIENT
    assert STRIPE_TEST_KEY not in str(dict(row))
