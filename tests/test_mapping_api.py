"""SPEC §11, the mapping API: ``PUT``/``DELETE /v1/users/{user_id}/customer`` and
``GET /v1/users/{user_id}``, over real HTTP against real Postgres and the Stripe
stand-in (customers and subscriptions seeded in it, as Stripe would hold them).

Status codes and bodies, Stripe's verdict on the customer, scopes, validation
of the path and the body, audit rows, the OpenAPI entries, and the point of it
all: a user linked through the API can open a subscription flow at once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import jwt
import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from openapi_schema_validator import OAS30Validator

from service.schemas import PutMappingSchema, UserMappingSchema
from tests.conftest import STRIPE_TEST_KEY, Standin, create_client_token
from tests.helpers import created, metric_value, post_session, problem

pytestmark = pytest.mark.usefixtures("world")

ISSUER = "https://id.example.com/"
AUDIENCE = "portal-gateway"
JWT_SECRET = "mapping-api-test-secret-0123456789abcdef"
WRITE, READ = "mappings:write", "mappings:read"
CUSTOMERS_PATH = "/v1/customers"
SUBSCRIPTIONS_PATH = "/v1/subscriptions"


# --- requests ------------------------------------------------------------------


def _headers(token: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return headers | (extra or {})


async def put_customer(
    client: TestClient[Any, Any],
    user: str,
    body: Any,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> ClientResponse:
    """``PUT /v1/users/{user}/customer``; ``user`` is percent-encoded here."""
    data = body if isinstance(body, bytes | str) else orjson.dumps(body)
    return await client.put(
        f"/v1/users/{quote(user, safe='')}/customer",
        data=data,
        headers=_headers(token, {"Content-Type": "application/json", **(headers or {})}),
    )


async def get_user(client: TestClient[Any, Any], user: str, token: str | None) -> ClientResponse:
    return await client.get(f"/v1/users/{quote(user, safe='')}", headers=_headers(token))


async def delete_customer(
    client: TestClient[Any, Any], user: str, token: str | None
) -> ClientResponse:
    return await client.delete(
        f"/v1/users/{quote(user, safe='')}/customer", headers=_headers(token)
    )


async def answered(resp: ClientResponse, status: int) -> dict[str, Any]:
    """Assert a JSON answer with this status, valid by its response schema; return it."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = orjson.loads(text)
    schema = PutMappingSchema() if "backfill" in body else UserMappingSchema()
    assert schema.validate(body) == {}, body
    return body


def user_token(sub: str) -> str:
    """An end-user JWT for ``sub``, as our identity provider would sign it."""
    now = int(time.time())
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
async def gateway(make_service: Any) -> Any:
    """The service, accepting end-user JWTs too (so that they can be refused)."""
    return await make_service(
        JWT_HS256_SECRET=JWT_SECRET,
        JWT_ISSUER=ISSUER,
        JWT_AUDIENCE=AUDIENCE,
        JWT_ALGORITHMS="HS256",
    )


@pytest.fixture
async def writer(conn: asyncpg.Connection) -> str:
    """A client that may write and read mappings (the application's backend)."""
    return await create_client_token(conn, "signup-backend", (WRITE, READ))


@pytest.fixture
async def reader(conn: asyncpg.Connection) -> str:
    return await create_client_token(conn, "support-tool", (READ,))


def seed_stripe(
    standin: Standin,
    customer: str,
    *,
    account: str | None = None,
    subscriptions: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> None:
    """A customer (and its subscriptions) as Stripe holds them."""
    standin.state.seed_customers([{"id": customer, "account": account, **fields}])
    seeds = [{"customer": customer, "account": account, **s} for s in subscriptions or []]
    if seeds:
        standin.state.seed_subscriptions(seeds)


def _sub(sub_id: str, item: str, price: str, quantity: int = 1, **more: Any) -> dict[str, Any]:
    return {"id": sub_id, "items": [{"id": item, "price": price, "quantity": quantity}], **more}


async def _customer_row(conn: asyncpg.Connection, user_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM customers WHERE user_id = $1", user_id)


async def _audit(conn: asyncpg.Connection, action: str | None = None) -> list[dict[str, Any]]:
    """Audit rows (of one action), oldest first, their ``detail`` decoded."""
    rows = await conn.fetch(
        "SELECT * FROM audit_events WHERE action = coalesce($1, action) ORDER BY id", action
    )
    return [
        {**r, "detail": None if r["detail"] is None else orjson.loads(r["detail"])} for r in rows
    ]


# --- PUT: new, replaced, unchanged -------------------------------------------------


async def test_a_new_mapping_is_201_with_its_subscriptions_backfilled(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    cancel_at = 1_900_000_000
    seed_stripe(
        standin,
        "cus_new1",
        subscriptions=[
            _sub("sub_new1", "si_new1", "price_pro_yearly", 2, cancel_at=cancel_at),
            _sub("sub_new0", "si_new0", "price_other", status="canceled"),
        ],
    )
    before = datetime.now(UTC)
    body = await answered(
        await put_customer(
            service,
            "u_new",
            {"stripe_customer_id": "cus_new1", "portal": "default", "locale": "de"},
            writer,
        ),
        201,
    )
    assert body["user_id"] == "u_new"
    assert body["backfill"] == "ok"
    customer = body["customer"]
    assert {k: v for k, v in customer.items() if k != "source_at"} == {
        "stripe_customer_id": "cus_new1",
        "stripe_account_id": None,
        "source": "api",
        "stale": False,
        "portal": "default",
        "locale": "de",
        "connected_account": None,
    }
    assert datetime.fromisoformat(customer["source_at"]) >= before.replace(microsecond=0)
    assert body["subscriptions"] == [
        {
            "ref": None,
            "stripe_subscription_id": "sub_new0",
            "status": "canceled",
            "cancel_at": None,
            "cancel_at_period_end": False,
            "item_id": "si_new0",
            "price_id": "price_other",
            "plan": None,  # no plan of ours has this price
            "quantity": 1,
        },
        {
            "ref": None,
            "stripe_subscription_id": "sub_new1",
            "status": "active",
            "cancel_at": datetime.fromtimestamp(cancel_at, UTC).isoformat(),
            "cancel_at_period_end": False,
            "item_id": "si_new1",
            "price_id": "price_pro_yearly",
            "plan": "pro-yearly",
            "quantity": 2,
        },
    ]
    row = await _customer_row(conn, "u_new")
    assert row is not None
    assert (row["source"], row["stripe_customer_id"]) == ("api", "cus_new1")
    # Stripe was asked about the customer, then for all its subscriptions.
    (lookup,) = standin.requests(f"{CUSTOMERS_PATH}/cus_new1")
    assert lookup.method == "GET"
    (listing,) = standin.requests(SUBSCRIPTIONS_PATH)
    assert listing.params == {"customer": "cus_new1", "status": "all", "limit": "100"}
    # GET shows the same mapping.
    shown = await answered(await get_user(service, "u_new", writer), 200)
    assert shown == {k: v for k, v in body.items() if k != "backfill"}


async def test_a_user_linked_by_the_api_can_open_a_subscription_flow_at_once(
    service: Any, writer: str, token: str, standin: Standin
) -> None:
    seed_stripe(standin, "cus_signup", subscriptions=[_sub("sub_signup", "si_signup", "price_x")])
    await answered(
        await put_customer(service, "u_signup", {"stripe_customer_id": "cus_signup"}, writer), 201
    )
    # No event, no import: the first portal call finds the subscription.
    await created(
        await post_session(
            service, {"user_id": "u_signup", "flow": {"type": "subscription_cancel"}}, token
        )
    )
    (session,) = standin.requests()
    assert session.params["customer"] == "cus_signup"
    assert session.params["flow_data"]["subscription_cancel"]["subscription"] == "sub_signup"


async def test_replacing_an_imported_mapping_is_200_and_drops_the_old_customers_rows(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    # u_42 was imported with cus_42 and two subscriptions; the app moves them.
    seed_stripe(standin, "cus_42b", subscriptions=[_sub("sub_42b", "si_42b", "price_b")])
    body = await answered(
        await put_customer(service, "u_42", {"stripe_customer_id": "cus_42b"}, writer), 200
    )
    assert body["customer"]["stripe_customer_id"] == "cus_42b"
    assert body["customer"]["source"] == "api"
    assert body["customer"]["locale"] is None  # PUT is the whole mapping
    assert [s["stripe_subscription_id"] for s in body["subscriptions"]] == ["sub_42b"]
    (row,) = await _audit(conn, "mapping.api.put")
    assert row["detail"]["change"] == "relinked"
    assert row["detail"]["previous"] == "cus_42"
    assert row["detail"]["dropped_subscriptions"] == ["sub_42a", "sub_42old"]


async def test_the_same_put_again_is_200_and_changes_nothing(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    seed_stripe(standin, "cus_same", subscriptions=[_sub("sub_same", "si_same", "price_x")])
    request = {"stripe_customer_id": "cus_same", "locale": "fr"}
    first = await answered(await put_customer(service, "u_same", request, writer), 201)
    # Our ref on the subscription survives a repeat (it stays with its sub_ id).
    await conn.execute("UPDATE subscriptions SET external_ref = 'team' WHERE user_id = 'u_same'")
    again = await answered(await put_customer(service, "u_same", request, writer), 200)
    assert again["customer"] | {"source_at": None} == first["customer"] | {"source_at": None}
    assert [s["ref"] for s in again["subscriptions"]] == ["team"]
    changes = [r["detail"]["change"] for r in await _audit(conn, "mapping.api.put")]
    assert changes == ["linked", "unchanged"]


async def test_an_explicit_mapping_replaces_a_metadata_one(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO customers (user_id, stripe_customer_id, source, source_at)"
        " VALUES ('u_meta', 'cus_meta', 'stripe_metadata', now() - interval '1 day')"
    )
    seed_stripe(standin, "cus_meta")
    body = await answered(
        await put_customer(service, "u_meta", {"stripe_customer_id": "cus_meta"}, writer), 200
    )
    assert body["customer"]["source"] == "api"


# --- PUT: refusals -----------------------------------------------------------------


async def test_a_customer_mapped_to_another_user_is_409_without_asking_stripe(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    seed_stripe(standin, "cus_42")
    answer = await problem(
        await put_customer(service, "u_thief", {"stripe_customer_id": "cus_42"}, writer),
        409,
        "customer_already_mapped",
    )
    assert answer["field"] == "stripe_customer_id"
    assert "u_42" not in answer["detail"]  # who holds it is not said
    assert standin.requests(f"{CUSTOMERS_PATH}/cus_42") == []
    assert await _customer_row(conn, "u_thief") is None
    (row,) = await _audit(conn, "mapping.api.put")
    assert (row["http_status"], row["error_code"]) == (409, "customer_already_mapped")
    assert row["detail"] == {"mapped_to": "u_42"}  # the audit trail does say it


async def test_two_users_racing_for_one_customer_get_it_once(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    seed_stripe(standin, "cus_race")
    # Both pass the lookup while neither has written; the unique index decides.
    standin.state.set_latency(100)
    first, second = await asyncio.gather(
        put_customer(service, "u_race1", {"stripe_customer_id": "cus_race"}, writer),
        put_customer(service, "u_race2", {"stripe_customer_id": "cus_race"}, writer),
    )
    assert sorted([first.status, second.status]) == [201, 409]
    loser = first if first.status == 409 else second
    await problem(loser, 409, "customer_already_mapped")
    owners = await conn.fetch("SELECT user_id FROM customers WHERE stripe_customer_id = 'cus_race'")
    assert len(owners) == 1


@pytest.mark.parametrize(
    ("seed", "request_extra", "says"),
    [
        (None, {}, "Stripe has no customer cus_gone"),
        ({"deleted": True}, {}, "deleted"),
        ({"livemode": True}, {}, "live-mode customer"),
        # On a connected account, it exists only there.
        ({"account": "acct_conn1"}, {}, "Stripe has no customer"),
        ({}, {"connected_account": "acct_conn1"}, "on the connected account acct_conn1"),
    ],
    ids=["unknown", "deleted", "other-mode", "on-an-account", "not-on-that-account"],
)
async def test_a_customer_stripe_does_not_have_for_us_is_422(
    service: Any,
    writer: str,
    standin: Standin,
    conn: asyncpg.Connection,
    seed: dict[str, Any] | None,
    request_extra: dict[str, Any],
    says: str,
) -> None:
    if seed is not None:
        standin.state.seed_customers([{"id": "cus_gone", **seed}])
    answer = await problem(
        await put_customer(
            service, "u_new", {"stripe_customer_id": "cus_gone", **request_extra}, writer
        ),
        422,
        "stripe_customer_not_found",
    )
    assert says in answer["detail"]
    assert answer["field"] == "stripe_customer_id"
    assert STRIPE_TEST_KEY not in answer["detail"]
    assert await _customer_row(conn, "u_new") is None
    assert standin.requests(SUBSCRIPTIONS_PATH) == []


async def test_an_unknown_portal_is_404_before_stripe_is_asked(
    service: Any, writer: str, standin: Standin
) -> None:
    answer = await problem(
        await put_customer(
            service, "u_new", {"stripe_customer_id": "cus_new", "portal": "nope"}, writer
        ),
        404,
        "unknown_portal",
    )
    assert answer["field"] == "portal"
    assert standin.state.requests == []


async def test_a_failed_backfill_keeps_the_mapping_and_says_so(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    seed_stripe(standin, "cus_flaky", subscriptions=[_sub("sub_flaky", "si_flaky", "price_x")])
    # The customer lookup goes through; Stripe then refuses the subscription listing.
    standin.state.queue_faults([{"latency_ms": 0}, {"status": 400, "code": "parameter_invalid"}])
    body = await answered(
        await put_customer(service, "u_flaky", {"stripe_customer_id": "cus_flaky"}, writer), 201
    )
    assert body["backfill"] == "failed"
    assert body["subscriptions"] == []
    assert await _customer_row(conn, "u_flaky") is not None
    (row,) = await _audit(conn, "mapping.api.put")
    assert (row["http_status"], row["detail"]["backfill"]) == (201, "failed")


# --- Connect and Accounts v2 ----------------------------------------------------------


async def test_a_customer_on_a_connected_account_is_checked_and_backfilled_there(
    service: Any, writer: str, standin: Standin
) -> None:
    seed_stripe(
        standin,
        "cus_onacct",
        account="acct_conn1",
        subscriptions=[_sub("sub_onacct", "si_onacct", "price_x")],
    )
    body = await answered(
        await put_customer(
            service,
            "u_conn",
            {"stripe_customer_id": "cus_onacct", "connected_account": "acct_conn1"},
            writer,
        ),
        201,
    )
    assert body["customer"]["connected_account"] == "acct_conn1"
    assert [s["stripe_subscription_id"] for s in body["subscriptions"]] == ["sub_onacct"]
    sent = standin.requests(f"{CUSTOMERS_PATH}/cus_onacct") + standin.requests(SUBSCRIPTIONS_PATH)
    assert [r.headers.get("Stripe-Account") for r in sent] == ["acct_conn1", "acct_conn1"]


async def test_an_accounts_v2_id_is_written_without_a_stripe_check(
    service: Any, writer: str, standin: Standin
) -> None:
    body = await answered(
        await put_customer(service, "u_v2", {"stripe_account_id": "acct_v2user"}, writer), 201
    )
    assert body["customer"]["stripe_account_id"] == "acct_v2user"
    assert body["customer"]["stripe_customer_id"] is None
    assert body["backfill"] == "skipped"
    assert standin.state.requests == []


# --- GET and DELETE -----------------------------------------------------------------


async def test_get_shows_the_mapping_with_scheduled_cancellations_and_plans(
    service: Any, reader: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "UPDATE subscriptions SET cancel_at = '2030-01-02T03:04:05Z', cancel_at_period_end = true,"
        " price_id = 'price_pro_yearly' WHERE stripe_subscription_id = 'sub_42a'"
    )
    body = await answered(await get_user(service, "u_42", reader), 200)
    assert body["customer"]["stripe_customer_id"] == "cus_42"
    assert body["customer"]["source"] == "import"
    assert body["customer"]["locale"] == "fr"
    by_id = {s["stripe_subscription_id"]: s for s in body["subscriptions"]}
    assert set(by_id) == {"sub_42a", "sub_42old"}
    assert by_id["sub_42a"] == {
        "ref": "team-plan",
        "stripe_subscription_id": "sub_42a",
        "status": "active",
        "cancel_at": "2030-01-02T03:04:05+00:00",
        "cancel_at_period_end": True,
        "item_id": "si_42a",
        "price_id": "price_pro_yearly",
        "plan": "pro-yearly",
        "quantity": 3,
    }
    # An Accounts v2 mapping and one with several items.
    acct = await answered(await get_user(service, "u_acct", reader), 200)
    assert acct["customer"]["stripe_account_id"] == "acct_user1"
    multi = await answered(await get_user(service, "u_multi", reader), 200)
    assert multi["subscriptions"][0]["item_id"] is None


async def test_get_of_a_user_without_mapping_is_404(service: Any, reader: str) -> None:
    await problem(await get_user(service, "u_nobody", reader), 404, "unknown_user")


async def test_delete_removes_the_mapping_and_its_subscriptions(
    service: Any, writer: str, token: str, conn: asyncpg.Connection
) -> None:
    resp = await delete_customer(service, "u_42", writer)
    assert resp.status == 204, await resp.text()
    assert await resp.read() == b""
    assert await _customer_row(conn, "u_42") is None
    assert await conn.fetchval("SELECT count(*) FROM subscriptions WHERE user_id = 'u_42'") == 0
    await problem(await get_user(service, "u_42", writer), 404, "unknown_user")
    await problem(await post_session(service, {"user_id": "u_42"}, token), 404, "unknown_user")
    await problem(await delete_customer(service, "u_42", writer), 404, "unknown_user")
    first, again = await _audit(conn, "mapping.api.delete")
    assert (first["http_status"], first["stripe_customer_id"]) == (204, "cus_42")
    assert first["detail"]["subscriptions"] == ["sub_42a", "sub_42old"]
    assert (again["http_status"], again["error_code"]) == (404, "unknown_user")


# --- the path parameter ---------------------------------------------------------------


async def test_the_user_id_in_the_path_is_percent_decoded(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    seed_stripe(standin, "cus_odd")
    odd = "org/7 é?#%"
    body = await answered(
        await put_customer(service, odd, {"stripe_customer_id": "cus_odd"}, writer), 201
    )
    assert body["user_id"] == odd
    assert await _customer_row(conn, odd) is not None
    assert (await answered(await get_user(service, odd, writer), 200))["user_id"] == odd


@pytest.mark.parametrize("raw", ["u" * 129, "u%00x"], ids=["too-long", "nul"])
async def test_an_invalid_user_id_in_the_path_is_422_on_user_id(
    service: Any, writer: str, conn: asyncpg.Connection, raw: str
) -> None:
    for resp in (
        await service.get(f"/v1/users/{raw}", headers=_headers(writer)),
        await service.delete(f"/v1/users/{raw}/customer", headers=_headers(writer)),
        await service.put(
            f"/v1/users/{raw}/customer",
            data=b'{"stripe_customer_id": "cus_x"}',
            headers=_headers(writer, {"Content-Type": "application/json"}),
        ),
    ):
        answer = await problem(resp, 422, "validation_failed")
        assert list(answer["errors"]) == ["user_id"], answer
    assert await conn.fetchval("SELECT count(*) FROM customers") == 6  # the seeded ones


# --- the body -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "stripe_customer_id"),
        ({"stripe_customer_id": "cus_a", "stripe_account_id": "acct_a"}, "stripe_account_id"),
        ({"stripe_customer_id": "cust_a"}, "stripe_customer_id"),
        ({"stripe_customer_id": "cus_a/../x"}, "stripe_customer_id"),
        ({"stripe_customer_id": 42}, "stripe_customer_id"),
        ({"stripe_account_id": "cus_a"}, "stripe_account_id"),
        (
            {"stripe_customer_id": "cus_a", "connected_account": "acct_a\r\nX: y"},
            "connected_account",
        ),
        ({"stripe_customer_id": "cus_a", "locale": "xx"}, "locale"),
        ({"stripe_customer_id": "cus_a", "portal": ""}, "portal"),
        ({"stripe_customer_id": "cus_a", "user_id": "u_other"}, "user_id"),
    ],
)
async def test_an_invalid_body_is_422_on_its_field(
    service: Any, writer: str, standin: Standin, body: dict[str, Any], field: str
) -> None:
    answer = await problem(
        await put_customer(service, "u_new", body, writer), 422, "validation_failed"
    )
    assert list(answer["errors"]) == [field], answer
    assert standin.state.requests == []


async def test_a_body_that_is_not_json_is_refused(service: Any, writer: str) -> None:
    await problem(await put_customer(service, "u_new", b"{nope", writer), 400, "malformed_json")
    resp = await service.put(
        "/v1/users/u_new/customer",
        data=b"stripe_customer_id=cus_a",
        headers=_headers(writer, {"Content-Type": "application/x-www-form-urlencoded"}),
    )
    await problem(resp, 415, "unsupported_media_type")


# --- who may call ---------------------------------------------------------------------


async def test_end_users_may_not_use_the_mapping_api_even_for_themselves(
    gateway: Any, standin: Standin, conn: asyncpg.Connection
) -> None:
    mine = user_token("u_42")
    for resp in (
        await put_customer(gateway, "u_42", {"stripe_customer_id": "cus_x"}, mine),
        await get_user(gateway, "u_42", mine),
        await delete_customer(gateway, "u_42", mine),
    ):
        await problem(resp, 403, "insufficient_scope")
    assert await _customer_row(conn, "u_42") is not None
    rows = await conn.fetch(
        "SELECT principal_type, principal_id, action, error_code FROM audit_events ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("user", "u_42", action, "insufficient_scope")
        for action in ("mapping.api.put", "mapping.api.get", "mapping.api.delete")
    ]


async def test_clients_need_the_mapping_scopes(
    service: Any, token: str, reader: str, conn: asyncpg.Connection
) -> None:
    # `token` has portal_sessions:create only; `reader` mappings:read only.
    for bearer in (token, reader):
        await problem(
            await put_customer(service, "u_42", {"stripe_customer_id": "cus_x"}, bearer),
            403,
            "insufficient_scope",
        )
        await problem(await delete_customer(service, "u_42", bearer), 403, "insufficient_scope")
    await problem(await get_user(service, "u_42", token), 403, "insufficient_scope")
    await answered(await get_user(service, "u_42", reader), 200)
    # A missing or unknown token is a 401, before any scope is looked at.
    await problem(await get_user(service, "u_42", None), 401, "unauthenticated")
    await problem(await get_user(service, "u_42", "pgw_" + "x" * 43), 401, "unauthenticated")
    assert await _customer_row(conn, "u_42") is not None


async def test_no_cors_for_the_mapping_api_even_when_browsers_are_allowed(
    make_service: Any, reader: str
) -> None:
    service = await make_service(CORS_ALLOWED_ORIGINS="https://app.example.com")
    origin = {"Origin": "https://app.example.com"}
    for method, path in (("GET", "/v1/users/u_42"), ("PUT", "/v1/users/u_42/customer")):
        preflight = await service.options(
            path, headers={**origin, "Access-Control-Request-Method": method}
        )
        assert "Access-Control-Allow-Origin" not in preflight.headers, path
    resp = await service.get("/v1/users/u_42", headers=_headers(reader, origin))
    await answered(resp, 200)
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_the_mapping_api_is_rate_limited_like_the_rest(
    service: Any, conn: asyncpg.Connection
) -> None:
    slow = await create_client_token(conn, "slow-reader", (READ,), rate_limit=2)
    for _ in range(2):
        await answered(await get_user(service, "u_42", slow), 200)
    resp = await get_user(service, "u_42", slow)
    await problem(resp, 429, "rate_limited")
    assert int(resp.headers["Retry-After"]) >= 1


# --- the audit trail ------------------------------------------------------------------


async def test_every_call_writes_one_audit_row(
    service: Any, writer: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    seed_stripe(standin, "cus_audit", subscriptions=[_sub("sub_audit", "si_audit", "price_x")])
    headers = {"X-Request-ID": "req-map-1", "User-Agent": "signup/2.0"}
    await answered(
        await put_customer(
            service, "u_audit", {"stripe_customer_id": "cus_audit"}, writer, headers
        ),
        201,
    )
    await answered(await get_user(service, "u_audit", writer), 200)
    assert (await delete_customer(service, "u_audit", writer)).status == 204
    rows = await _audit(conn)
    assert [(r["action"], r["http_status"], r["outcome"]) for r in rows] == [
        # The inline backfill writes its own row, under the request's id.
        ("mapping.backfill", 200, "applied"),
        ("mapping.api.put", 201, "created"),
        ("mapping.api.get", 200, "created"),
        ("mapping.api.delete", 204, "created"),
    ]
    backfill, put, *_ = rows
    assert backfill["request_id"] == put["request_id"] == "req-map-1"
    assert (backfill["principal_type"], backfill["principal_id"]) == ("client", "signup-backend")
    assert (put["principal_type"], put["principal_id"]) == ("client", "signup-backend")
    assert put["user_agent"] == "signup/2.0"
    assert all(r["user_id"] == "u_audit" for r in rows)
    assert all(r["stripe_customer_id"] == "cus_audit" for r in rows)
    assert put["detail"] == {
        "change": "linked",
        "verified": True,
        "backfill": "ok",
        "previous": None,
        "dropped_subscriptions": [],
    }
    # And the changes are counted by source.
    for change in ("linked", "unlinked"):
        labels = {"source": "api", "change": change}
        assert await metric_value(service, "portal_gateway_mapping_changes_total", **labels) == 1


# --- the OpenAPI document ----------------------------------------------------------------


async def test_the_operations_are_documented_with_their_schemas(service: Any) -> None:
    doc = orjson.loads(await (await service.get("/api/docs/swagger.json")).read())
    put = doc["paths"]["/v1/users/{user_id}/customer"]["put"]
    delete = doc["paths"]["/v1/users/{user_id}/customer"]["delete"]
    get = doc["paths"]["/v1/users/{user_id}"]["get"]
    for op in (put, delete, get):
        assert op["security"] == [{"bearerAuth": []}]
        (path_param,) = [p for p in op["parameters"] if p["in"] == "path"]
        assert path_param["name"] == "user_id"
        assert path_param["required"] is True
        assert (path_param["schema"]["minLength"], path_param["schema"]["maxLength"]) == (1, 128)
        codes = {
            status: set(
                r["content"]["application/problem+json"]["schema"]["allOf"][1]["properties"][
                    "code"
                ]["enum"]
            )
            for status, r in op["responses"].items()
            if "application/problem+json" in r.get("content", {})
        }
        assert "insufficient_scope" in codes["403"]
        assert "validation_failed" in codes["422"]
        assert "rate_limited" in codes["429"]
    assert "requestBody" not in get
    assert "requestBody" not in delete
    assert "unknown_user" in {
        c
        for r in (get, delete)
        for c in r["responses"]["404"]["content"]["application/problem+json"]["schema"]["allOf"][1][
            "properties"
        ]["code"]["enum"]
    }
    assert "204" in delete["responses"]
    put_codes = put["responses"]
    assert put_codes["409"]["content"]["application/problem+json"]["schema"]["allOf"][1][
        "properties"
    ]["code"]["enum"] == ["customer_already_mapped"]
    assert "stripe_customer_not_found" in put_codes["422"]["description"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = doc
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            node = target
        return node

    request = resolve(put["requestBody"]["content"]["application/json"]["schema"])
    assert set(request["properties"]) == {
        "stripe_customer_id",
        "stripe_account_id",
        "portal",
        "locale",
        "connected_account",
    }
    assert request.get("additionalProperties") is False
    for status in ("200", "201"):
        answer = resolve(put["responses"][status]["content"]["application/json"]["schema"])
        assert "backfill" in answer["required"]
    shown = resolve(get["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(shown["required"]) == {"user_id", "customer", "subscriptions"}
    customer = resolve(shown["properties"]["customer"])
    assert {"source", "source_at", "stale", "connected_account"} <= set(customer["required"])
    sub = resolve(shown["properties"]["subscriptions"]["items"])
    assert {"cancel_at", "cancel_at_period_end", "plan"} <= set(sub["required"])
    # The documented schema accepts what the service answers.
    validator = OAS30Validator({**shown, "components": doc["components"]})
    example = {
        "user_id": "u_1",
        "customer": {
            "stripe_customer_id": "cus_1",
            "stripe_account_id": None,
            "source": "api",
            "source_at": "2030-01-01T00:00:00+00:00",
            "stale": False,
            "portal": None,
            "locale": None,
            "connected_account": None,
        },
        "subscriptions": [],
    }
    assert list(validator.iter_errors(example)) == []
