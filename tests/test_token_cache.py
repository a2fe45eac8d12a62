"""Client tokens from the authenticator's cache (issue 17): two round trips per
request, and revocation or a lost scope still refused on the very next request.

A client token seen before is not looked up again on the portal routes: the
resolving statement reads the token's row in the same round trip, and the
pipeline answers nothing before that row (or, on any other path, a lookup of
its own) confirmed the token.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from service import keys
from tests.helpers import created, post_session, problem

pytestmark = pytest.mark.usefixtures("world")


def queries(service: Any, name: str) -> float:
    value = service.app[keys.METRICS].registry.get_sample_value(
        "portal_gateway_db_query_duration_seconds_count", {"query": name}
    )
    return value or 0.0


def round_trips(service: Any) -> dict[str, float]:
    return {
        name: queries(service, name)
        for name in ("find_client", "resolve", "resolve_idempotent", "insert_audit")
    }


async def test_a_known_token_costs_two_round_trips(service: Any, token: str) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    first = round_trips(service)
    assert first["find_client"] == 1
    for n in range(5):
        headers = {"Idempotency-Key": f"k-{n}"} if n % 2 else None
        await created(await post_session(service, {"user_id": "u_42"}, token, headers))
    after = round_trips(service)
    assert after["find_client"] == 1  # never again
    assert after["resolve"] + after["resolve_idempotent"] == 6
    assert after["insert_audit"] - first["insert_audit"] == 5


async def test_revoked_between_two_requests_is_a_401_without_a_claim_or_a_row(
    service: Any, token: str, conn: asyncpg.Connection
) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await conn.execute("UPDATE api_clients SET revoked_at = now()")
    rows_before = await conn.fetchval("SELECT count(*) FROM audit_events")
    headers = {"Idempotency-Key": "after-revocation"}
    await problem(
        await post_session(service, {"user_id": "u_42"}, token, headers), 401, "unauthenticated"
    )
    assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == rows_before
    # Forgotten: the next one is looked up (and refused) like any unknown token.
    lookups = queries(service, "find_client")
    await problem(await post_session(service, {"user_id": "u_42"}, token), 401, "unauthenticated")
    assert queries(service, "find_client") == lookups + 1


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u_42", "locale": "xx"},  # 422 before any query
        {"user_id": "u_42", "return_url": "https://evil.example.net/"},  # 403 before any query
        {"user_id": "u_nobody"},  # 404 from the resolving statement
    ],
)
async def test_a_revoked_token_never_learns_anything_else(
    service: Any, token: str, conn: asyncpg.Connection, body: dict[str, Any]
) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await conn.execute("UPDATE api_clients SET revoked_at = now()")
    await problem(await post_session(service, body, token), 401, "unauthenticated")


async def test_a_scope_taken_away_is_a_403_on_the_next_request(
    service: Any, token: str, conn: asyncpg.Connection, standin: Any
) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await conn.execute("UPDATE api_clients SET scopes = '{mappings:read}'")
    await problem(
        await post_session(service, {"user_id": "u_42"}, token), 403, "insufficient_scope"
    )
    assert len(standin.requests()) == 1


async def test_a_new_rate_limit_applies_from_the_next_request(
    service: Any, token: str, conn: asyncpg.Connection
) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await conn.execute("UPDATE api_clients SET rate_limit_per_minute = 1")
    await created(await post_session(service, {"user_id": "u_42"}, token))  # reads the new limit
    # The bucket is cut to the new capacity of one: one more, then refused.
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await problem(await post_session(service, {"user_id": "u_42"}, token), 429, "rate_limited")
