"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from service.schemas import PortalSessionSchema, ProblemSchema

PATH = "/v1/portal-sessions"


async def post_session(
    client: TestClient[Any, Any],
    body: Any,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> ClientResponse:
    """POST /v1/portal-sessions with a bearer token and a JSON body."""
    all_headers = {"Content-Type": "application/json"}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    data = body if isinstance(body, bytes | str) else orjson.dumps(body)
    return await client.post(PATH, data=data, headers=all_headers)


async def created(resp: ClientResponse) -> dict[str, Any]:
    """Assert a 201 with the documented body and headers; return the body."""
    text = await resp.text()
    assert resp.status == 201, text
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers.get("X-Request-ID")
    body: dict[str, Any] = await resp.json()
    assert PortalSessionSchema().validate(body) == {}, body
    assert body["url"].startswith("https://billing.stripe.com/p/session/")
    assert body["id"].startswith("bps_")
    return body


async def problem(resp: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """Assert a problem+json error with this status and code; return the body."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.headers["Content-Type"].startswith("application/problem+json"), text
    body: dict[str, Any] = await resp.json()
    assert ProblemSchema().validate(body) == {}, body
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body


# --- Stripe webhooks ---------------------------------------------------------

WEBHOOK_PATH = "/v1/stripe/webhooks"
WEBHOOK_SECRET = "whsec_test_current_0123456789"
_event_ids = itertools.count(1)


def stripe_signature(payload: bytes, secret: str = WEBHOOK_SECRET, t: int | None = None) -> str:
    """A ``Stripe-Signature`` header as Stripe computes it."""
    t = int(time.time()) if t is None else t
    digest = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def subscription_event(
    event_type: str,
    sub_id: str,
    customer: str,
    *,
    status: str = "active",
    items: Sequence[tuple[str, str, int]] = (),
    created: int | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A ``customer.subscription.*`` event with items given as (si_, price_, quantity)."""
    now = int(time.time())
    obj = {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "items": {
            "object": "list",
            "data": [
                {"id": si, "object": "subscription_item", "price": {"id": price}, "quantity": q}
                for si, price, q in items
            ],
            "has_more": False,
        },
    }
    return _event(event_type, obj, created if created is not None else now, event_id)


def customer_deleted_event(customer: str, created: int | None = None) -> dict[str, Any]:
    obj = {"id": customer, "object": "customer", "deleted": True}
    return _event("customer.deleted", obj, created or int(time.time()), None)


def customer_event(
    event_type: str,
    customer: dict[str, Any],
    created: int,
    account: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A ``customer.created|updated|deleted`` event carrying ``customer`` (e.g. a stand-in
    customer object); ``account`` is the top-level field Connect events carry."""
    assert event_type in ("customer.created", "customer.updated", "customer.deleted"), event_type
    return _account_event(event_type, customer, created, account, previous_attributes, event_id)


def configuration_event(
    event_type: str,
    configuration: dict[str, Any],
    *,
    account: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    created: int | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A ``billing_portal.configuration.created|updated`` event carrying ``configuration``
    (e.g. a stand-in configuration object, or what its Dashboard edit answers), created
    at its ``updated`` unless ``created`` is given. ``data.previous_attributes``:
    ``previous_attributes`` as given, or computed from ``previous`` (the object before
    the change) with :func:`changed_attributes`. ``account`` is the top-level field
    Connect events carry."""
    assert event_type in (
        "billing_portal.configuration.created",
        "billing_portal.configuration.updated",
    ), event_type
    when = created if created is not None else int(configuration["updated"])
    if previous is not None:
        previous_attributes = changed_attributes(previous, configuration)
    return _account_event(event_type, configuration, when, account, previous_attributes, event_id)


def changed_attributes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Stripe's ``previous_attributes``: the old values of what differs, nested objects
    narrowed to their changed fields."""
    changed: dict[str, Any] = {}
    for key in before.keys() | after.keys():
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            if inner := changed_attributes(old, new):
                changed[key] = inner
        elif old != new:
            changed[key] = old
    return changed


def _account_event(
    event_type: str,
    obj: dict[str, Any],
    created: int,
    account: str | None,
    previous_attributes: dict[str, Any] | None,
    event_id: str | None,
) -> dict[str, Any]:
    """An event with ``data.previous_attributes`` and top-level ``account`` when given."""
    event = _event(event_type, obj, created, event_id)
    if previous_attributes is not None:
        event["data"]["previous_attributes"] = previous_attributes
    if account is not None:
        event["account"] = account
    return event


def _event(
    event_type: str, obj: dict[str, Any], created: int, event_id: str | None
) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_test{next(_event_ids):06d}{int(time.time() * 1000) % 10**9}",
        "object": "event",
        "api_version": "2025-09-30.clover",
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_webhooktest", "idempotency_key": None},
        "type": event_type,
        "data": {"object": obj},
    }


async def deliver(
    client: TestClient[Any, Any],
    event: dict[str, Any] | bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    signature: str | None = None,
) -> ClientResponse:
    """POST an event to the webhook endpoint, signed with ``secret`` unless a header is given."""
    payload = event if isinstance(event, bytes) else orjson.dumps(event)
    header = signature if signature is not None else stripe_signature(payload, secret)
    headers = {"Content-Type": "application/json; charset=utf-8", "Stripe-Signature": header}
    return await client.post(WEBHOOK_PATH, data=payload, headers=headers)


async def metric_value(client: TestClient[Any, Any], name: str, **labels: str) -> float:
    """One sample of ``GET /metrics`` with exactly these labels, 0 if absent."""
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, within: float = 10
) -> None:
    """Poll ``predicate`` (plain or async) until it holds; fail naming ``what`` after
    ``within`` seconds. The one bounded wait of the suite: no fixed sleeps."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert loop.time() < end, f"{what} did not happen within {within} s"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def table_locked(database_url: str, table: str, mode: str) -> AsyncIterator[None]:
    """``LOCK TABLE table IN mode MODE`` held until the block ends: the statements it
    conflicts with wait meanwhile (how a test keeps a grouped statement in flight)."""
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute(f"LOCK TABLE {table} IN {mode} MODE")
            yield
    finally:
        await holder.close()


def with_real_servers(max_examples: int) -> settings:
    """Hypothesis settings of a property checked against this test's real servers: the
    function-scoped fixtures serve every example, and I/O has no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
