"""§3 idempotency: same key and body → same session; other body → 409; after the TTL → new."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Standin, create_client_token
from tests.helpers import created, post_session, problem

pytestmark = pytest.mark.usefixtures("world")
BODY = {"user_id": "u_42", "flow": {"type": "subscription_cancel"}}


async def test_replay_returns_same_session(service: Any, token: str, standin: Standin) -> None:
    first = await created(await post_session(service, BODY, token, {"Idempotency-Key": "k-1"}))
    again = await created(await post_session(service, BODY, token, {"Idempotency-Key": "k-1"}))
    assert again == first
    keys = {r.headers["Idempotency-Key"] for r in standin.requests()}
    assert len(keys) == 1  # Stripe saw the same upstream key both times
    assert "k-1" not in keys  # derived, not the caller's key verbatim


async def test_same_key_other_body_conflicts(service: Any, token: str, standin: Standin) -> None:
    await created(await post_session(service, BODY, token, {"Idempotency-Key": "k-2"}))
    other = {"user_id": "u_42", "flow": {"type": "subscription_update"}}
    await problem(
        await post_session(service, other, token, {"Idempotency-Key": "k-2"}),
        409,
        "idempotency_conflict",
    )
    assert len(standin.requests()) == 1


async def test_key_after_ttl_starts_new_session(
    service: Any, token: str, conn: Any, standin: Standin
) -> None:
    first = await created(await post_session(service, BODY, token, {"Idempotency-Key": "k-3"}))
    # Age the key past its TTL instead of sleeping through it.
    await conn.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
    later = await created(await post_session(service, BODY, token, {"Idempotency-Key": "k-3"}))
    assert later["id"] != first["id"]
    keys = [r.headers["Idempotency-Key"] for r in standin.requests()]
    assert len(set(keys)) == 2


async def test_two_principals_same_key_do_not_collide(
    service: Any, token: str, conn: Any, standin: Standin
) -> None:
    other = await create_client_token(conn, "other-service")
    a = await created(await post_session(service, BODY, token, {"Idempotency-Key": "shared"}))
    b = await created(await post_session(service, BODY, other, {"Idempotency-Key": "shared"}))
    assert a["id"] != b["id"]


async def test_without_key_every_request_is_new(service: Any, token: str, standin: Standin) -> None:
    a = await created(await post_session(service, BODY, token))
    b = await created(await post_session(service, BODY, token))
    assert a["id"] != b["id"]
    assert len({r.headers["Idempotency-Key"] for r in standin.requests()}) == 2


async def test_concurrent_same_key_yields_one_session(service: Any, token: str) -> None:
    responses = await asyncio.gather(
        *(post_session(service, BODY, token, {"Idempotency-Key": "race"}) for _ in range(8))
    )
    bodies = [await created(r) for r in responses]
    assert len({b["id"] for b in bodies}) == 1
