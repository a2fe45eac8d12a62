"""The Stripe client's customer endpoints (SPEC §11) against the stand-in over HTTP.

``retrieve_customer`` (a deleted customer is an answer, an unknown one
``resource_missing``) and ``list_customers_page`` (one page, its cursor, on a
connected account with ``Stripe-Account``), through the one send loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.errors import ServiceError
from service.metrics import Metrics
from service.stripe import StripeClient, upstream_error_code
from tests.conftest import Standin, make_settings


@pytest.fixture
async def stripe(database_url: str, standin: Standin) -> AsyncIterator[StripeClient]:
    settings = make_settings(database_url, standin.url, STRIPE_MAX_RETRIES="0")
    session = StripeClient.new_session(settings)
    try:
        yield StripeClient(session, settings, Metrics())
    finally:
        await session.close()


def _seed(standin: Standin) -> None:
    standin.state.seed_customers(
        [
            {"id": f"cus_p{n}", "created": 1_700_000_000 + n, "metadata": {"user_id": f"u_{n}"}}
            for n in range(5)
        ]
        + [
            {"id": "cus_gone", "created": 1_700_000_010, "deleted": True},
            {"id": "cus_conn1", "created": 1_700_000_020, "account": "acct_conn1"},
        ]
    )


async def test_retrieve_customer(stripe: StripeClient, standin: Standin) -> None:
    _seed(standin)
    found = await stripe.retrieve_customer("cus_p1")
    assert (found["id"], found["object"], found["metadata"]) == (
        "cus_p1",
        "customer",
        {"user_id": "u_1"},
    )
    assert await stripe.retrieve_customer("cus_gone") == {
        "id": "cus_gone",
        "object": "customer",
        "deleted": True,
    }
    connected = await stripe.retrieve_customer("cus_conn1", stripe_account="acct_conn1")
    assert connected["id"] == "cus_conn1"
    requests = standin.requests("/v1/customers/cus_conn1")
    assert requests[-1].headers["Stripe-Account"] == "acct_conn1"

    # Unknown, and a connected account's customer asked of the platform: resource_missing.
    for customer_id in ("cus_unknown", "cus_conn1"):
        with pytest.raises(ServiceError) as missing:
            await stripe.retrieve_customer(customer_id)
        assert missing.value.code == "upstream_rejected"
        assert upstream_error_code(missing.value) == "resource_missing"

    # Only an id's characters reach the URL's path.
    before = len(standin.state.requests)
    for bad in ("cus_../v1/x", "cus_1?expand=x", "sub_1", "cus_"):
        with pytest.raises(ValueError, match="not a customer id"):
            await stripe.retrieve_customer(bad)
    assert len(standin.state.requests) == before


async def test_list_customers_page_follows_the_cursor(
    stripe: StripeClient, standin: Standin
) -> None:
    _seed(standin)
    first = await stripe.list_customers_page(limit=2)
    assert ([c["id"] for c in first.data], first.has_more) == (["cus_p4", "cus_p3"], True)
    second = await stripe.list_customers_page(starting_after="cus_p3", limit=2)
    assert ([c["id"] for c in second.data], second.has_more) == (["cus_p2", "cus_p1"], True)
    last = await stripe.list_customers_page(starting_after="cus_p1")
    # Deleted customers are not listed; the connected account's are not the platform's.
    assert ([c["id"] for c in last.data], last.has_more) == (["cus_p0"], False)
    pages = standin.requests("/v1/customers")
    assert [p.params for p in pages] == [
        {"limit": "2"},
        {"limit": "2", "starting_after": "cus_p3"},
        {"limit": "100", "starting_after": "cus_p1"},
    ]
    assert all("Stripe-Account" not in p.headers for p in pages)

    connected = await stripe.list_customers_page(stripe_account="acct_conn1")
    assert ([c["id"] for c in connected.data], connected.has_more) == (["cus_conn1"], False)
    assert standin.requests("/v1/customers")[-1].headers["Stripe-Account"] == "acct_conn1"
