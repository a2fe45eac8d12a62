"""``portal-gateway import``: good files land in the tables, bad files change nothing.

Every bad file must fail with one message naming the file, line and column,
and leave every mapping table exactly as it was (all or nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service import importer
from service.config import Settings
from service.db import imports
from service.db.pool import Database
from service.importer import ImportFailed, import_csv
from tests.conftest import seed_world

ROOT = Path(__file__).resolve().parent.parent
TABLES = {
    "portal_profiles": "name",
    "customers": "user_id",
    "subscriptions": "stripe_subscription_id",
    "plans": "plan",
    "offers": "name",
}
HEADERS = {kind: ",".join(spec.columns) for kind, spec in importer.KINDS.items()}


@pytest.fixture
def import_settings(database_url: str) -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": database_url, "RETURN_URL_ALLOWLIST": "https://app.example.com"},
        serving=False,
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database.connect(database_url)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def run(db: Database, import_settings: Settings, tmp_path: Path) -> Any:
    """Write ``text`` to ``<kind>.csv`` and import it; returns the row count."""

    async def run_import(kind: str, text: str | bytes, name: str | None = None) -> int:
        path = tmp_path / (name or f"{kind}.csv")
        data = text if isinstance(text, bytes) else text.encode()
        path.write_bytes(data)
        return await import_csv(db, kind, path, import_settings)

    return run_import


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row of every mapping table, in key order."""
    return {
        table: [dict(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY {key}")]
        for table, key in TABLES.items()
    }


def csv_text(kind: str, *rows: str) -> str:
    return "\n".join([HEADERS[kind], *rows]) + "\n"


# --- good files ---------------------------------------------------------------


async def test_good_file_of_each_kind_imports(run: Any, conn: asyncpg.Connection) -> None:
    assert (
        await run(
            "profiles",
            csv_text(
                "profiles",
                "main,bpc_main1,,https://app.example.com/account,true",
                "connect,,acct_platform1,,false",
            ),
        )
        == 2
    )
    assert (
        await run(
            "customers",
            csv_text(
                "customers",
                "u_1,cus_1,,,fr",
                "u_2,,acct_2,connect,",
                '"u,3",cus_3,,main,pt-BR',  # quoting is CSV's, not ours
            ),
        )
        == 3
    )
    assert (
        await run(
            "subscriptions",
            csv_text(
                "subscriptions",
                "u_1,sub_1,team,active,si_1,price_basic,3",
                "u_1,sub_2,,canceled,si_2,price_basic,0",
                "u_2,sub_3,multi,past_due,,,",
            ),
        )
        == 3
    )
    assert (
        await run("plans", csv_text("plans", "pro,price_pro,true", "legacy,price_old,false")) == 2
    )
    assert (
        await run(
            "offers",
            csv_text("offers", "stay-20,coupon,STAY-20%off", "spring,promotion_code,promo_spring"),
        )
        == 2
    )

    tables = await snapshot(conn)
    assert [
        (
            r["name"],
            r["configuration_id"],
            r["on_behalf_of"],
            r["default_return_url"],
            r["is_default"],
        )
        for r in tables["portal_profiles"]
    ] == [
        ("connect", None, "acct_platform1", None, False),
        ("main", "bpc_main1", None, "https://app.example.com/account", True),
    ]
    assert [
        (r["user_id"], r["stripe_customer_id"], r["stripe_account_id"], r["portal"], r["locale"])
        for r in tables["customers"]
    ] == [
        ("u,3", "cus_3", None, "main", "pt-BR"),
        ("u_1", "cus_1", None, None, "fr"),
        ("u_2", None, "acct_2", "connect", None),
    ]
    assert [
        (
            r["stripe_subscription_id"],
            r["user_id"],
            r["external_ref"],
            r["status"],
            r["item_id"],
            r["price_id"],
            r["quantity"],
        )
        for r in tables["subscriptions"]
    ] == [
        ("sub_1", "u_1", "team", "active", "si_1", "price_basic", 3),
        ("sub_2", "u_1", None, "canceled", "si_2", "price_basic", 0),
        ("sub_3", "u_2", "multi", "past_due", None, None, None),
    ]
    # The last column is self_serve: false when the header does not name it.
    assert [tuple(r.values()) for r in tables["plans"]] == [
        ("legacy", "price_old", False, False),
        ("pro", "price_pro", True, False),
    ]
    assert [tuple(r.values()) for r in tables["offers"]] == [
        ("spring", "promotion_code", "promo_spring", False),
        ("stay-20", "coupon", "STAY-20%off", False),
    ]


@pytest.mark.usefixtures("world")
async def test_reimport_updates_in_place(run: Any, conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE customers SET stale_at = now() WHERE user_id IN ('u_42', 'u_7')")
    # u_42 changes customer (stale mark cleared), u_7 keeps it (mark kept), u_new is new.
    assert (
        await run(
            "customers",
            csv_text(
                "customers",
                "u_42,cus_42new,,connect,de",
                "u_7,cus_7,,,",
                "u_new,cus_new,,,",
            ),
        )
        == 3
    )
    rows = {r["user_id"]: r for r in await conn.fetch("SELECT * FROM customers")}
    u_42 = rows["u_42"]
    assert (u_42["stripe_customer_id"], u_42["portal"], u_42["locale"], u_42["stale_at"]) == (
        "cus_42new",
        "connect",
        "de",
        None,
    )
    assert (rows["u_7"]["portal"], rows["u_7"]["stale_at"] is not None) == (None, True)
    assert rows["u_new"]["stripe_customer_id"] == "cus_new"
    assert len(rows) == 7
    # Subscriptions are keyed by their Stripe id; the user's other rows stay.
    await run(
        "subscriptions",
        csv_text("subscriptions", "u_42,sub_42a,team-plan,past_due,si_42a,price_pro,5"),
    )
    sub = await conn.fetchrow(
        "SELECT status, price_id, quantity FROM subscriptions"
        " WHERE stripe_subscription_id = 'sub_42a'"
    )
    assert sub is not None
    assert tuple(sub) == ("past_due", "price_pro", 5)
    assert await conn.fetchval("SELECT count(*) FROM subscriptions WHERE user_id = 'u_42'") == 2
    await run("plans", csv_text("plans", "legacy,price_legacy2,true"))
    plan = await conn.fetchrow("SELECT stripe_price_id, active FROM plans WHERE plan = 'legacy'")
    assert plan is not None
    assert tuple(plan) == ("price_legacy2", True)
    await run("offers", csv_text("offers", "stay-20,promotion_code,promo_stay"))
    offer = await conn.fetchrow("SELECT kind, stripe_id FROM offers WHERE name = 'stay-20'")
    assert offer is not None
    assert tuple(offer) == ("promotion_code", "promo_stay")


@pytest.mark.usefixtures("world")
async def test_new_default_profile_replaces_the_old_one(run: Any, conn: asyncpg.Connection) -> None:
    await run("profiles", csv_text("profiles", "connect,bpc_connect2,acct_platform1,,true"))
    defaults = await conn.fetch("SELECT name FROM portal_profiles WHERE is_default")
    assert [r["name"] for r in defaults] == ["connect"]
    # The old default keeps everything else.
    assert (
        await conn.fetchval("SELECT configuration_id FROM portal_profiles WHERE name = 'default'")
        == "bpc_default1"
    )


async def test_bom_crlf_blank_lines_and_header_only(run: Any, conn: asyncpg.Connection) -> None:
    text = "\ufeff" + HEADERS["plans"] + "\r\npro,price_pro,true\r\n\r\nbasic,price_basic,false\r\n"
    assert await run("plans", text.encode("utf-8")) == 2
    assert await conn.fetchval("SELECT count(*) FROM plans") == 2
    assert await run("offers", csv_text("offers")) == 0


# --- bad files ----------------------------------------------------------------

# (kind, rows after the header — or the whole file as bytes, expected message)
BAD_FILES: dict[str, tuple[str, list[str] | bytes, str]] = {
    "wrong header": (
        "customers",
        b"user_id,stripe_customer_id,stripe_account,portal,locale\nu_1,cus_1,,,\n",
        "customers.csv line 1, column 3: expected stripe_account_id, got 'stripe_account'",
    ),
    "header of another kind": (
        "customers",
        b"plan,stripe_price_id,active\n",
        "(this looks like a plans file)",
    ),
    "bad prefix": (
        "customers",
        ["u_1,cus_1,,,", "u_2,cus_2,,,", "u_3,cs_3,,,"],
        "customers.csv line 4, column stripe_customer_id: must start with cus_ (got 'cs_3')",
    ),
    "both ids": (
        "customers",
        ["u_1,cus_1,acct_1,,"],
        "customers.csv line 2, column stripe_account_id: must be empty when stripe_customer_id",
    ),
    "neither id": (
        "customers",
        ["u_1,cus_1,,,", "u_2,,,,fr"],
        "customers.csv line 3, column stripe_customer_id: one of stripe_customer_id or",
    ),
    "bad locale": (
        "customers",
        ["u_1,cus_1,,,french"],
        "customers.csv line 2, column locale: must be a Stripe locale such as auto, en,",
    ),
    "user id too long": (
        "customers",
        ["u" * 129 + ",cus_1,,,"],
        "customers.csv line 2, column user_id: must be at most 128 characters",
    ),
    "id with whitespace": (
        "customers",
        ["u_1,cus_1 ,,,"],
        "customers.csv line 2, column stripe_customer_id: must be cus_ followed by",
    ),
    "bad boolean": (
        "plans",
        ["pro,price_pro,true", "basic,price_basic,TRUE"],
        "plans.csv line 3, column active: must be true or false (got 'TRUE')",
    ),
    "empty boolean": (
        "plans",
        ["pro,price_pro,"],
        "plans.csv line 2, column active: must be true or false (got an empty cell)",
    ),
    "bad status": (
        "subscriptions",
        ["u_42,sub_1,,Active,si_1,price_1,1"],
        "subscriptions.csv line 2, column status: must be one of incomplete,",
    ),
    "negative quantity": (
        "subscriptions",
        ["u_42,sub_1,,active,si_1,price_1,1", "u_42,sub_2,,active,si_2,price_1,-1"],
        "subscriptions.csv line 3, column quantity: must be a non-negative integer (got '-1')",
    ),
    "price without item": (
        "subscriptions",
        ["u_42,sub_1,,active,,price_1,"],
        "subscriptions.csv line 2, column price_id: must be empty when item_id is empty",
    ),
    "external_ref looking like an id": (
        "subscriptions",
        ["u_42,sub_1,sub_2,active,si_1,price_1,1"],
        "subscriptions.csv line 2, column external_ref: must not start with sub_",
    ),
    "unknown portal": (
        "customers",
        ["u_1,cus_1,,default,", "u_2,cus_2,,gold,"],
        "customers.csv line 3, column portal: no portal profile named 'gold'",
    ),
    "subscription for unknown user": (
        "subscriptions",
        ["u_42,sub_1,,active,si_1,price_1,1", "u_ghost,sub_2,,active,si_2,price_1,1"],
        "subscriptions.csv line 3, column user_id: user 'u_ghost' has no customer mapping",
    ),
    "external_ref taken in the database": (
        "subscriptions",
        ["u_42,sub_new,team-plan,active,si_new,price_1,1"],
        "subscriptions.csv line 2, column external_ref: user 'u_42' already has external_ref"
        " 'team-plan' on sub_42a",
    ),
    "customer id mapped to another user": (
        "customers",
        ["u_1,cus_42,,,"],
        "customers.csv line 2, column stripe_customer_id: 'cus_42' is already mapped to user"
        " 'u_42'",
    ),
    "duplicate user": (
        "customers",
        ["u_1,cus_1,,,", "u_2,cus_2,,,", "u_1,cus_3,,,"],
        "customers.csv line 4, column user_id: duplicate of line 2",
    ),
    "duplicate customer id": (
        "customers",
        ["u_1,cus_1,,,", "u_2,cus_1,,,"],
        "customers.csv line 3, column stripe_customer_id: duplicate of line 2",
    ),
    "duplicate external_ref": (
        "subscriptions",
        ["u_42,sub_1,x,active,si_1,price_1,1", "u_42,sub_2,x,active,si_2,price_1,1"],
        "subscriptions.csv line 3, column external_ref: this user already has this external_ref on"
        " line 2",
    ),
    "two defaults": (
        "profiles",
        ["a,bpc_a,,,true", "b,bpc_b,,,false", "c,bpc_c,,,true"],
        "profiles.csv line 4, column is_default: line 2 is already the default",
    ),
    "disallowed default_return_url": (
        "profiles",
        ["a,bpc_a,,https://app.example.com.evil.com/x,false"],
        "profiles.csv line 2, column default_return_url: its origin is not in the allowlist",
    ),
    "http default_return_url": (
        "profiles",
        ["a,bpc_a,,http://app.example.com/,false"],
        "profiles.csv line 2, column default_return_url: only https URLs are allowed",
    ),
    "bad promotion code": (
        "offers",
        ["o,promotion_code,coupon_1"],
        "offers.csv line 2, column stripe_id: must start with promo_",
    ),
    "coupon with whitespace": (
        "offers",
        ["o,coupon,stay 20"],
        "offers.csv line 2, column stripe_id: must not contain whitespace",
    ),
    "ragged row, short": (
        "customers",
        ["u_1,cus_1,,,", "u_2,cus_2,,"],
        "customers.csv line 3, column locale: missing: the line has 4 fields, the header 5",
    ),
    "ragged row, long": (
        "plans",
        ["pro,price_pro,true,extra"],
        "plans.csv line 2, column 4: unexpected extra field",
    ),
    "not UTF-8": (
        "customers",
        HEADERS["customers"].encode() + b"\nu_1,cus_1,,,\nu_2,cus_2,,,fr\xe9\n",
        "customers.csv line 3, column locale: is not valid UTF-8 (byte 0xe9)",
    ),
    "UTF-16": (
        "plans",
        (HEADERS["plans"] + "\npro,price_pro,true\n").encode("utf-16"),
        "plans.csv line 1: is UTF-16",
    ),
    "empty": ("plans", b"", "plans.csv: is empty; expected the header plan,stripe_price_id,active"),
    "unclosed quote": (
        "plans",
        ["pro,price_pro,true", 'basic,"price_basic,true', "gold,price_gold,true"],
        "plans.csv line 3: is not valid CSV (unexpected end of data)",
    ),
    "control character": (
        "plans",
        ['"pro\tplan",price_pro,true'],
        "plans.csv line 2, column plan: contains a control or invisible character",
    ),
    "several errors": (
        "plans",
        ["a,price_a,yes", "b,price_b,no", "c,price_c,true", "d,xprice_d,true"],
        "plans.csv line 2, column active: must be true or false (got 'yes') (and 2 more errors)",
    ),
}


async def test_bad_files_name_line_and_column_and_change_nothing(
    run: Any, conn: asyncpg.Connection, db: Database, import_settings: Settings, tmp_path: Path
) -> None:
    # One database for all cases (a database per case would double the suite's
    # time); each case must leave it exactly as seeded.
    await seed_world(conn)
    before = await snapshot(conn)
    wrong = {}
    for case, (kind, content, message) in BAD_FILES.items():
        text = content if isinstance(content, bytes) else csv_text(kind, *content)
        try:
            await run(kind, text)
        except ImportFailed as exc:
            got = str(exc)
            if message not in got or not got.startswith(f"{kind}.csv") or "\n" in got:
                wrong[case] = got
        else:
            wrong[case] = "imported"
        if await snapshot(conn) != before:
            wrong[case] = "tables changed"
    assert wrong == {}
    with pytest.raises(ImportFailed, match=r"^nope\.csv: cannot be read \(No such file"):
        await import_csv(db, "plans", tmp_path / "nope.csv", import_settings)


@pytest.mark.usefixtures("world")
async def test_database_refusal_late_in_the_file_rolls_back_earlier_batches(
    run: Any, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines 2 to 49 are written in earlier batches; the refusal on line 50 undoes them."""
    monkeypatch.setattr(imports, "BATCH_SIZE", 10)
    before = await snapshot(conn)
    rows = [f"u_new{i},cus_new{i},,," for i in range(2, 50)]
    # Swapping two users' customer ids passes validation (both users are in the
    # file) but trips the unique index on line 50, while u_42 still holds cus_42.
    rows += ["u_two,cus_42,,,", "u_42,cus_two,,,"]
    with pytest.raises(ImportFailed) as failed:
        await run("customers", csv_text("customers", *rows))
    assert str(failed.value) == (
        "customers.csv line 50, column stripe_customer_id: refused by the database: 'cus_42'"
        " already exists in the database (uq__customers__stripe_customer_id)"
    )
    assert await snapshot(conn) == before


async def test_100k_rows_import_in_seconds(run: Any, conn: asyncpg.Connection) -> None:
    rows = [f"user_{i},cus_{i:08d},,,{'fr' if i % 3 else ''}" for i in range(100_000)]
    started = time.perf_counter()
    assert await run("customers", csv_text("customers", *rows)) == 100_000
    elapsed = time.perf_counter() - started
    assert await conn.fetchval("SELECT count(*) FROM customers") == 100_000
    assert elapsed < 10, elapsed


# --- the real CLI ---------------------------------------------------------------


def run_cli(database_url: str, kind: str, path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SYSTEMROOT")}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "service", "import", kind, str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_bad_file_exits_1_with_one_line(
    database_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    path = tmp_path / "customers.csv"
    path.write_text(csv_text("customers", "u_1,cus_1,,,", "u_2,cus_2,,,", "u_3,cs_3,,,"))
    result = run_cli(database_url, "customers", path)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: customers.csv line 4, column stripe_customer_id: must start with cus_ (got 'cs_3')"
    ]
    assert await conn.fetchval("SELECT count(*) FROM customers") == 0


async def test_cli_good_file_exits_0(
    database_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    path = tmp_path / "customers.csv"
    path.write_text(csv_text("customers", "u_1,cus_1,,,", "u_2,,acct_2,,fr"))
    result = run_cli(database_url, "customers", path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"imported 2 customers rows from {path}",
        "their subscriptions were not read from Stripe: import subscriptions, or run "
        "`portal-gateway resync --all`",
    ]
    assert await conn.fetchval("SELECT count(*) FROM customers") == 2


# --- Connect and the source of a mapping (SPEC §11) ------------------------------

CONNECTED_HEADER = HEADERS["customers"] + ",connected_account"


@pytest.mark.usefixtures("world")
async def test_customers_connected_account_column_and_source(
    run: Any, conn: asyncpg.Connection
) -> None:
    # u_7 was linked by metadata a day ago, on another account.
    await conn.execute(
        "UPDATE customers SET source = 'stripe_metadata', source_at = now() - interval '1 day',"
        " connected_account = 'acct_old7' WHERE user_id = 'u_7'"
    )
    rows = ["u_7,cus_7,,,,acct_conn7", "u_new,cus_new,,,,", "u_42,cus_42,,,fr,acct_conn42"]
    assert await run("customers", "\n".join([CONNECTED_HEADER, *rows]) + "\n") == 3

    found = {
        r["user_id"]: r
        for r in await conn.fetch(
            "SELECT user_id, connected_account, source, now() - source_at < interval '1 minute'"
            " AS fresh FROM customers"
        )
    }
    assert {u: (r["connected_account"], r["source"], r["fresh"]) for u, r in found.items()} == {
        "u_7": ("acct_conn7", "import", True),  # an import is explicit: it wins, from now
        "u_new": (None, "import", True),
        "u_42": ("acct_conn42", "import", True),
        "u_acct": (None, "import", True),
        "u_none": (None, "import", True),
        "u_two": (None, "import", True),
        "u_multi": (None, "import", True),
    }
    # A file without the column maps its customers on the platform account.
    await run("customers", csv_text("customers", "u_42,cus_42,,,fr"))
    assert (
        await conn.fetchval("SELECT connected_account FROM customers WHERE user_id = 'u_42'")
        is None
    )


async def test_bad_connected_account_names_line_and_column(
    run: Any, conn: asyncpg.Connection
) -> None:
    await seed_world(conn)
    before = await snapshot(conn)
    cases = {
        "u_1,cus_1,,,,cus_x": (
            "customers.csv line 3, column connected_account: must start with acct_ (got 'cus_x')"
        ),
        "u_1,cus_1,,,,acct_a-b": (
            "customers.csv line 3, column connected_account: must be acct_ followed by letters,"
        ),
        "u_1,cus_1,,,,acct_1,extra": "customers.csv line 3, column 7: unexpected extra field",
    }
    for row, message in cases.items():
        with pytest.raises(ImportFailed) as failed:
            await run("customers", f"{CONNECTED_HEADER}\nu_2,cus_2,,,,acct_2\n{row}\n")
        assert message in str(failed.value)
        assert await snapshot(conn) == before
    with pytest.raises(ImportFailed, match="unexpected extra column 'account'"):
        await run("customers", f"{CONNECTED_HEADER},account\n")
