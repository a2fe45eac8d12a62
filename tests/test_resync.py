"""``portal-gateway resync`` (a real CLI process) against the stand-in over HTTP:
it rewrites a corrupted mapping from what Stripe lists (SPEC §4).
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import STRIPE_TEST_KEY, Standin
from tests.helpers import created, post_session

pytestmark = pytest.mark.usefixtures("world")

REPO = Path(__file__).resolve().parent.parent


async def _resync(
    database_url: str, standin: Standin, *args: str, key: str | None = STRIPE_TEST_KEY
) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "STRIPE_API_BASE": standin.url,
        "STRIPE_MAX_RETRIES": "0",
    }
    if key is not None:
        env["STRIPE_API_KEY"] = key
    # Not subprocess.run: the stand-in answers from this very event loop.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "resync",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _subs(conn: asyncpg.Connection, user_id: str) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT stripe_subscription_id AS id, external_ref, status, item_id, price_id, quantity,"
        " stale_at IS NOT NULL AS stale, deleted_at IS NOT NULL AS deleted"
        " FROM subscriptions WHERE user_id = $1",
        user_id,
    )
    return {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in rows}


def _item(si: str, price: str, quantity: int) -> dict[str, Any]:
    return {"id": si, "price": price, "quantity": quantity}


async def test_resync_user_repairs_a_corrupted_mapping(
    database_url: str,
    standin: Standin,
    conn: asyncpg.Connection,
    service: Any,
    token: str,
) -> None:
    # What Stripe has for cus_42 now (and one subscription of another customer).
    standin.state.seed_subscriptions(
        [
            {"id": "sub_42a", "customer": "cus_42", "items": [_item("si_42new", "price_pro", 4)]},
            {
                "id": "sub_42old",
                "customer": "cus_42",
                "status": "canceled",
                "items": [_item("si_42old", "price_basic", 1)],
            },
            {
                "id": "sub_42extra",
                "customer": "cus_42",
                "status": "trialing",
                "items": [_item("si_x1", "price_a", 1), _item("si_x2", "price_b", 2)],
            },
            {"id": "sub_7a", "customer": "cus_7", "items": [_item("si_7z", "price_z", 9)]},
        ]
    )
    # Our mapping, deliberately wrong: a stale row with a dead item, a row Stripe
    # never heard of, a stale customer mark.
    await conn.execute(
        """
        UPDATE subscriptions SET status = 'canceled', item_id = 'si_wrong', quantity = 1,
               stale_at = now() WHERE stripe_subscription_id = 'sub_42a';
        INSERT INTO subscriptions (stripe_subscription_id, user_id, external_ref, status)
        VALUES ('sub_bogus', 'u_42', 'bogus', 'active');
        UPDATE customers SET stale_at = now() WHERE user_id = 'u_42';
        """
    )
    u7_before = await _subs(conn, "u_7")

    code, _, err = await _resync(database_url, standin, "--user", "u_42")
    assert code == 0, err
    assert err.strip() == "u_42: 3 subscriptions written, 1 removed"

    assert await _subs(conn, "u_42") == {
        "sub_42a": {  # the ref survives; everything else is Stripe's
            "external_ref": "team-plan",
            "status": "active",
            "item_id": "si_42new",
            "price_id": "price_pro",
            "quantity": 4,
            "stale": False,
            "deleted": False,
        },
        "sub_42old": {
            "external_ref": "old-plan",
            "status": "canceled",
            "item_id": "si_42old",
            "price_id": "price_basic",
            "quantity": 1,
            "stale": False,
            "deleted": True,
        },
        "sub_42extra": {  # several items: not updatable
            "external_ref": None,
            "status": "trialing",
            "item_id": None,
            "price_id": None,
            "quantity": None,
            "stale": False,
            "deleted": False,
        },
    }
    assert await conn.fetchval("SELECT stale_at FROM customers WHERE user_id = 'u_42'") is None
    assert await _subs(conn, "u_7") == u7_before  # only the named user is rewritten
    audit = await conn.fetchrow("SELECT * FROM audit_events WHERE action = 'mapping.resync'")
    assert audit is not None
    assert (audit["principal_type"], audit["user_id"]) == ("cli", "u_42")
    assert orjson.loads(audit["detail"])["removed"] == ["sub_bogus"]

    (listed,) = standin.requests("/v1/subscriptions")
    assert listed.status == 200
    assert listed.params == {"customer": "cus_42", "status": "all", "limit": "100"}
    assert listed.headers["Stripe-Version"] == "2025-09-30.clover"
    assert listed.headers["Authorization"] == "[redacted]"  # sent, and redacted by the stand-in

    # The repaired mapping is what the next portal session sends.
    flow = {"type": "subscription_update_confirm", "subscription": "team-plan", "quantity": 5}
    await created(await post_session(service, {"user_id": "u_42", "flow": flow}, token))
    (sent,) = standin.requests()
    assert sent.params["flow_data"]["subscription_update_confirm"]["items"] == [
        {"id": "si_42new", "quantity": "5"}
    ]


async def test_resync_all_follows_pages_and_skips_accounts(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    many = [
        {
            "id": f"sub_two{n:03d}",
            "customer": "cus_two",
            "created": 1_700_000_000 + n,
            "items": [_item(f"si_two{n:03d}", "price_basic", 1)],
        }
        for n in range(105)
    ]
    standin.state.seed_subscriptions(
        [*many, {"id": "sub_42a", "customer": "cus_42", "items": [_item("si_42a", "price_b", 3)]}]
    )
    code, _, err = await _resync(database_url, standin, "--all")
    assert code == 0, err
    # u_42 u_7 u_multi u_none u_two; u_acct has no cus_ id.
    assert err.strip() == "resync: 5 resynced, 1 skipped (no cus_ id)"

    pages = [
        r.params for r in standin.requests("/v1/subscriptions") if r.params["customer"] == "cus_two"
    ]
    assert len(pages) == 2
    assert "starting_after" not in pages[0]
    assert pages[1]["starting_after"] == "sub_two005"  # newest first: the 100th is sub_two005
    two = await _subs(conn, "u_two")
    assert len(two) == 105
    assert "sub_two1" not in two  # Stripe no longer lists the seeded ones
    assert set(await _subs(conn, "u_42")) == {"sub_42a"}
    assert await _subs(conn, "u_7") == {}
    assert set(await _subs(conn, "u_acct")) == {"sub_acct"}  # skipped, untouched


async def test_resync_errors_are_one_line(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    standin.state.declare_missing(["cus_42"])
    missing, unknown, no_key, no_args = await asyncio.gather(
        _resync(database_url, standin, "--user", "u_42"),
        _resync(database_url, standin, "--user", "u_nobody"),
        _resync(database_url, standin, "--user", "u_42", key=None),
        _resync(database_url, standin),
    )
    for _, out, err in (missing, unknown, no_key):
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
        assert out == ""
    assert missing[0] == 1
    assert "Stripe has no customer cus_42" in missing[2]
    assert "marked stale" in missing[2]
    assert await conn.fetchval("SELECT stale_at FROM customers WHERE user_id = 'u_42'")
    assert unknown[0] == 1
    assert "u_nobody" in unknown[2]
    assert no_key[0] == 2
    assert "STRIPE_API_KEY" in no_key[2]
    assert no_args[0] == 2  # argparse: --user or --all is required


async def test_resync_keeps_scheduled_cancellations_and_clears_them(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    cancel_at = 1_900_000_000
    standin.state.seed_subscriptions(
        [
            # Classic billing mode: cancel at period end (Stripe fills cancel_at too).
            {
                "id": "sub_42a",
                "customer": "cus_42",
                "cancel_at": cancel_at,
                "cancel_at_period_end": True,
                "items": [_item("si_42a", "price_basic", 3)],
            },
            # Flexible billing mode: cancel_at alone.
            {
                "id": "sub_42flex",
                "customer": "cus_42",
                "cancel_at": cancel_at + 60,
                "items": [_item("si_42f", "price_basic", 1)],
            },
        ]
    )
    code, _, err = await _resync(database_url, standin, "--user", "u_42")
    assert code == 0, err
    rows = {
        r["stripe_subscription_id"]: (r["cancel_at"], r["cancel_at_period_end"])
        for r in await conn.fetch(
            "SELECT stripe_subscription_id, cancel_at, cancel_at_period_end FROM subscriptions"
            " WHERE user_id = 'u_42'"
        )
    }
    assert rows == {
        "sub_42a": (datetime.fromtimestamp(cancel_at, UTC), True),
        "sub_42flex": (datetime.fromtimestamp(cancel_at + 60, UTC), False),
    }

    # The customer renewed: Stripe has nothing scheduled any more.
    standin.state.seed_subscriptions(
        [{"id": "sub_42a", "customer": "cus_42", "items": [_item("si_42a", "price_basic", 3)]}]
    )
    code, _, err = await _resync(database_url, standin, "--user", "u_42")
    assert code == 0, err
    row = await conn.fetchrow(
        "SELECT cancel_at, cancel_at_period_end FROM subscriptions"
        " WHERE stripe_subscription_id = 'sub_42a'"
    )
    assert row is not None
    assert tuple(row) == (None, False)
    assert (
        await conn.fetchval("SELECT count(*) FROM audit_events WHERE action = 'mapping.resync'")
        == 2
    )
