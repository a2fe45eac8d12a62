"""``portal-gateway profiles plan|apply|sync`` (real CLI processes) against the stand-in over HTTP.

SPEC §12: plan says per profile what would change at Stripe and in the
database (exit 0 nothing, 2 something, 1 an error); apply creates or updates
the configurations (idempotency keys from the profile name and content hash,
the hash in their metadata), then writes the rows and one ``profiles_apply``
audit row in one transaction; a second apply of the same file writes nothing
to Stripe; an apply interrupted between Stripe and the database converges on
rerun without a second configuration; ``--prune`` deactivates what the file
dropped; ``sync`` stores Stripe's newer snapshot and shows the drift, which
plan then reports and apply repairs.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from service.config import Settings
from service.db.pool import Database
from service.profiles_file import content_hash, load_profiles
from service.stripe.encode import encode_form
from tests.conftest import ALLOWED_ORIGIN, STRIPE_TEST_KEY, Standin

REPO = Path(__file__).resolve().parent.parent
CONFIGURATIONS = "/v1/billing_portal/configurations"
HEADER = re.compile(r"^profile (\S+): (stripe|database): (create|update|unchanged|drifted)\b")

BASIC = """\
  - name: basic
    default: true
    self_serve: true
    default_return_url: https://app.example.com/account
    configuration:
      business_profile: {headline: Manage your plan}
      features:
        invoice_history: {enabled: true}
        payment_method_update: {enabled: true}
        subscription_cancel: {enabled: true, mode: at_period_end}
"""
PRO = """\
  - name: pro
    configuration:
      features:
        payment_method_update: {enabled: true}
        subscription_update:
          enabled: true
          default_allowed_updates: [price]
          products:
            - product: prod_pro
              prices: [pro-monthly]
"""
# The next version: basic drops its headline and lets customers edit their
# email; pro offers the yearly price too.
BASIC_V2 = """\
  - name: basic
    default: true
    self_serve: true
    default_return_url: https://app.example.com/account
    configuration:
      features:
        customer_update: {enabled: true, allowed_updates: [email]}
        invoice_history: {enabled: true}
        payment_method_update: {enabled: true}
        subscription_cancel: {enabled: true, mode: at_period_end}
"""
PRO_V2 = PRO.replace("[pro-monthly]", "[pro-monthly, price_pro_yearly]")


@pytest.fixture(autouse=True)
async def catalogue(conn: asyncpg.Connection, standin: Standin) -> None:
    """Our plans, and the products and prices Stripe has for them."""
    await conn.execute(
        "INSERT INTO plans (plan, stripe_price_id, active) VALUES"
        " ('pro-monthly', 'price_pro_monthly', true), ('pro-yearly', 'price_pro_yearly', true)"
    )
    standin.state.seed_catalogue(
        [{"id": "prod_pro", "prices": ["price_pro_monthly", "price_pro_yearly"]}]
    )


def _file(tmp_path: Path, *profiles: str, name: str = "profiles.yaml") -> Path:
    path = tmp_path / name
    path.write_text("profiles:\n" + "".join(profiles), encoding="utf-8")
    return path


def _env(database_url: str, standin: Standin) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "STRIPE_API_BASE": standin.url,
        "STRIPE_API_KEY": STRIPE_TEST_KEY,
        "STRIPE_MAX_RETRIES": "0",
        "RETURN_URL_ALLOWLIST": ALLOWED_ORIGIN,
    }


async def _profiles(database_url: str, standin: Standin, *args: str) -> tuple[int, str, str]:
    # Not subprocess.run: the stand-in answers from this very event loop.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "profiles",
        *args,
        cwd=REPO,
        env=_env(database_url, standin),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _headers(out: str) -> dict[tuple[str, str], str]:
    """``(profile, side) → status`` from plan's header lines."""
    found = {}
    for line in out.splitlines():
        match = HEADER.match(line)
        if match:
            found[(match[1], match[2])] = match[3]
    return found


def _writes(standin: Standin) -> list[Any]:
    """Every POST that reached a configuration endpoint (create, update)."""
    return [
        r
        for r in standin.state.requests
        if r.method == "POST" and r.path.startswith(CONFIGURATIONS)
    ]


def _configurations(standin: Standin) -> dict[str, dict[str, Any]]:
    """The stand-in's configurations by our profile name (metadata)."""
    return {
        c["metadata"]["portal_gateway_profile"]: c
        for c in standin.state.configurations.values()
        if "portal_gateway_profile" in (c.get("metadata") or {})
    }


async def _hashes(database_url: str, path: Path) -> dict[str, str]:
    """Each profile's content hash, as apply computes it."""
    settings = Settings.from_env(
        {"DATABASE_URL": database_url, "RETURN_URL_ALLOWLIST": ALLOWED_ORIGIN}, serving=False
    )
    db = await Database.connect(database_url, max_size=1)
    try:
        return {s.name: content_hash(s) for s in await load_profiles(path, db, settings)}
    finally:
        await db.close()


async def _rows(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM portal_profiles ORDER BY name")
    decoded = [
        {k: orjson.loads(v) if k in ("applied", "snapshot") and v else v for k, v in r.items()}
        for r in rows
    ]
    return {r["name"]: r for r in decoded}


async def test_plan_then_apply_from_an_empty_account(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    path = _file(tmp_path, BASIC, PRO)
    hashes = await _hashes(database_url, path)

    code, out, err = await _profiles(database_url, standin, "plan", str(path))
    assert code == 2, err
    assert _headers(out) == {
        ("basic", "stripe"): "create",
        ("basic", "database"): "create",
        ("pro", "stripe"): "create",
        ("pro", "database"): "create",
    }
    assert _writes(standin) == []
    assert not standin.state.requests
    assert await _rows(conn) == {}

    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    assert "profile basic: stripe: created bpc_" in out

    configs = _configurations(standin)
    assert set(configs) == {"basic", "pro"}
    writes = _writes(standin)
    assert [(w.path, w.idempotency_key) for w in writes] == [
        (CONFIGURATIONS, f"profile-basic-{hashes['basic'][:16]}-create"),
        (CONFIGURATIONS, f"profile-pro-{hashes['pro'][:16]}-create"),
    ]
    pro = configs["pro"]
    assert pro["metadata"] == {"portal_gateway_profile": "pro", "content_hash": hashes["pro"]}
    assert pro["features"]["subscription_update"]["products"][0]["prices"] == [
        "price_pro_monthly"  # the plan name resolved through the plans table
    ]
    assert configs["basic"]["business_profile"]["headline"] == "Manage your plan"

    rows = await _rows(conn)
    assert set(rows) == {"basic", "pro"}
    basic = rows["basic"]
    assert basic["configuration_id"] == configs["basic"]["id"]
    assert (basic["managed"], basic["is_default"], basic["self_serve"]) == (True, True, True)
    assert basic["default_return_url"] == "https://app.example.com/account"
    assert basic["applied_hash"] == hashes["basic"]
    assert basic["snapshot_at"].timestamp() == configs["basic"]["updated"]
    assert rows["pro"]["is_default"] is False

    audit = await conn.fetch(
        "SELECT principal_type, principal_id, outcome, detail FROM audit_events"
        " WHERE action = 'profiles_apply'"
    )
    assert len(audit) == 1
    assert (audit[0]["principal_type"], audit[0]["principal_id"]) == ("cli", "profiles")
    assert audit[0]["outcome"] == "applied"
    assert '"created"' in audit[0]["detail"]
    assert configs["pro"]["id"] in audit[0]["detail"]

    # Nothing left to do.
    code, out, err = await _profiles(database_url, standin, "plan", str(path))
    assert code == 0, out + err
    assert set(_headers(out).values()) == {"unchanged"}


async def test_a_changed_file_is_applied_field_by_field(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    code, _, err = await _profiles(database_url, standin, "apply", str(_file(tmp_path, BASIC, PRO)))
    assert code == 0, err
    before = _configurations(standin)
    path = _file(tmp_path, BASIC_V2, PRO_V2, name="v2.yaml")
    hashes = await _hashes(database_url, path)

    code, out, err = await _profiles(database_url, standin, "plan", str(path))
    assert code == 2, err
    assert _headers(out) == {
        ("basic", "stripe"): "update",
        ("basic", "database"): "update",
        ("pro", "stripe"): "update",
        ("pro", "database"): "update",
    }
    lines = out.splitlines()
    assert (
        "  features.subscription_update.products[0].prices:"
        " [price_pro_monthly] → [price_pro_monthly, price_pro_yearly]"
    ) in lines
    assert "  business_profile.headline: Manage your plan → null" in lines
    assert "  features.customer_update.enabled: false → true" in lines
    assert "  features.customer_update.allowed_updates: [] → [email]" in lines
    standin.state.requests.clear()
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    writes = _writes(standin)
    assert [(w.path, w.idempotency_key.rsplit("-", 1)[0]) for w in writes] == [
        (
            f"{CONFIGURATIONS}/{before['basic']['id']}",
            f"profile-basic-{hashes['basic'][:16]}-update",
        ),
        (f"{CONFIGURATIONS}/{before['pro']['id']}", f"profile-pro-{hashes['pro'][:16]}-update"),
    ]
    after = _configurations(standin)
    assert set(after) == {"basic", "pro"}
    assert len(standin.state.configurations) == 2
    assert after["basic"]["business_profile"]["headline"] is None  # dropped from the file
    assert after["basic"]["features"]["customer_update"] == {
        "enabled": True,
        "allowed_updates": ["email"],
    }
    assert after["pro"]["features"]["subscription_update"]["products"][0]["prices"] == [
        "price_pro_monthly",
        "price_pro_yearly",
    ]
    assert after["pro"]["metadata"]["content_hash"] == hashes["pro"]
    rows = await _rows(conn)
    assert rows["pro"]["applied_hash"] == hashes["pro"]
    assert rows["pro"]["snapshot"]["features"]["subscription_update"]["products"][0]["prices"] == [
        "price_pro_monthly",
        "price_pro_yearly",
    ]

    code, out, _ = await _profiles(database_url, standin, "plan", str(path))
    assert code == 0, out


async def test_the_same_file_again_writes_nothing_to_stripe(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    path = _file(tmp_path, BASIC, PRO)
    code, _, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    rows_before = await _rows(conn)
    standin.state.requests.clear()

    code, out, err = await _profiles(database_url, standin, "plan", str(path))
    assert code == 0, out + err
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    assert _writes(standin) == []
    assert {(r.method, r.path.rsplit("/", 1)[0]) for r in standin.state.requests} == {
        ("GET", CONFIGURATIONS)  # each configuration retrieved, nothing written
    }
    assert "profile pro: stripe: unchanged" in out
    rows_after = await _rows(conn)
    assert {n: r["configuration_id"] for n, r in rows_after.items()} == {
        n: r["configuration_id"] for n, r in rows_before.items()
    }


async def test_prune_deactivates_what_the_file_dropped(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    code, _, err = await _profiles(database_url, standin, "apply", str(_file(tmp_path, BASIC, PRO)))
    assert code == 0, err
    pro_id = _configurations(standin)["pro"]["id"]
    await conn.execute(
        "INSERT INTO customers (user_id, stripe_customer_id, portal)"
        " VALUES ('u_pro', 'cus_pro', 'pro')"
    )
    path = _file(tmp_path, BASIC, name="basic-only.yaml")

    code, out, _ = await _profiles(database_url, standin, "plan", str(path))
    assert code == 0, out  # without --prune, apply would leave pro alone
    assert "prune candidates" in out
    assert f"  pro: {pro_id} → active: false, row removed" in out
    code, out, _ = await _profiles(database_url, standin, "plan", str(path), "--prune")
    assert code == 2, out

    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    assert _configurations(standin)["pro"]["active"] is True
    assert "pro" in await _rows(conn)

    standin.state.requests.clear()
    code, out, err = await _profiles(database_url, standin, "apply", str(path), "--prune")
    assert code == 0, err
    assert f"profile pro: pruned: {pro_id} deactivated, row removed" in out
    assert [(w.path, w.params) for w in _writes(standin)] == [
        (f"{CONFIGURATIONS}/{pro_id}", {"active": "false"})
    ]
    assert _configurations(standin)["pro"]["active"] is False  # deactivated, not deleted
    assert set(await _rows(conn)) == {"basic"}
    assert await conn.fetchval("SELECT portal FROM customers WHERE user_id = 'u_pro'") is None
    detail = await conn.fetchval(
        "SELECT detail FROM audit_events WHERE action = 'profiles_apply'"
        " ORDER BY occurred_at DESC LIMIT 1"
    )
    assert pro_id in detail
    assert '"customers_unassigned": 1' in detail

    code, out, _ = await _profiles(database_url, standin, "plan", str(path), "--prune")
    assert code == 0, out


async def test_an_apply_cut_between_stripe_and_the_database_converges(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    # The rows cannot be written: Stripe accepts, then the transaction fails.
    await conn.execute(
        """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'interrupted'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON portal_profiles
            FOR EACH ROW EXECUTE FUNCTION refuse();
        """
    )
    path = _file(tmp_path, BASIC, PRO)
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 1
    assert err.startswith("error: the profile rows could not be written"), err
    assert len(err.strip().splitlines()) == 1
    assert set(_configurations(standin)) == {"basic", "pro"}
    assert await _rows(conn) == {}

    await conn.execute("DROP TRIGGER refuse ON portal_profiles")
    ids = {n: c["id"] for n, c in _configurations(standin).items()}
    standin.state.requests.clear()
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    assert _writes(standin) == []  # found by metadata: nothing created twice
    assert len(standin.state.configurations) == 2
    assert "profile basic: stripe: adopted" in out
    assert {n: r["configuration_id"] for n, r in (await _rows(conn)).items()} == ids


async def test_a_configuration_left_by_a_dead_run_is_adopted(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """The previous run died after Stripe's create: same key, same metadata, no row."""
    path = _file(tmp_path, PRO)
    digest = (await _hashes(database_url, path))["pro"]
    body = {
        "features": {
            "payment_method_update": {"enabled": True},
            "subscription_update": {
                "enabled": True,
                "default_allowed_updates": ["price"],
                "products": [{"product": "prod_pro", "prices": ["price_pro_monthly"]}],
            },
        },
        "metadata": {"portal_gateway_profile": "pro", "content_hash": digest},
    }
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            standin.url + CONFIGURATIONS,
            data=encode_form(body),
            headers={
                "Authorization": f"Bearer {STRIPE_TEST_KEY}",
                "Idempotency-Key": f"profile-pro-{digest[:16]}-create",
            },
        )
        assert resp.status == 200, await resp.text()
        left = await resp.json()
    standin.state.requests.clear()

    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    assert f"profile pro: stripe: adopted {left['id']}" in out
    assert _writes(standin) == []
    assert len(standin.state.configurations) == 1
    row = (await _rows(conn))["pro"]
    assert (row["configuration_id"], row["applied_hash"]) == (left["id"], digest)


async def test_plan_errors_and_exit_codes(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    bad = _file(tmp_path, PRO.replace("[pro-monthly]", "[gold-monthly]"), name="bad.yaml")
    for command in ("plan", "apply"):
        code, out, err = await _profiles(database_url, standin, command, str(bad))
        assert code == 1, out + err
        assert out == ""
        assert (
            err == "error: bad.yaml line 11: unknown plan 'gold-monthly' (not in the plans table)\n"
        )
    assert standin.state.requests == []
    assert await _rows(conn) == {}

    code, out, err = await _profiles(database_url, standin, "plan", str(tmp_path / "none.yaml"))
    assert code == 1
    assert err.startswith("error: none.yaml: cannot read the file"), err

    # The shape: two header lines per profile, the summary last.
    code, out, _ = await _profiles(database_url, standin, "plan", str(_file(tmp_path, BASIC, PRO)))
    assert code == 2
    assert out.splitlines() == [
        "profile basic: stripe: create",
        "profile basic: database: create",
        "profile pro: stripe: create",
        "profile pro: database: create",
        "plan: stripe 2 to create, 0 to update, 0 drifted, 0 unchanged; 0 prune candidates",
    ]


async def test_sync_stores_the_snapshot_and_plan_shows_the_drift(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    path = _file(tmp_path, BASIC, PRO)
    code, _, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    basic_id = _configurations(standin)["basic"]["id"]
    stored_at = (await _rows(conn))["basic"]["snapshot_at"]

    # Edited "in the Dashboard".
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{standin.url}/_standin/billing_portal/configurations/{basic_id}",
            json={"business_profile": {"headline": "Edited by hand"}},
        )
        assert resp.status == 200, await resp.text()
        edited = await resp.json()

    code, out, err = await _profiles(database_url, standin, "sync")
    assert code == 0, err
    assert f"profile basic: {basic_id}: drifted (snapshot stored)" in out
    assert "  business_profile.headline: applied Manage your plan, Stripe has Edited by hand" in out
    assert "profile pro: " in out
    assert "as applied" in out
    assert "profiles sync: 2 snapshots stored" not in err  # pro's snapshot was current
    row = (await _rows(conn))["basic"]
    assert row["snapshot"]["business_profile"]["headline"] == "Edited by hand"
    assert row["snapshot_at"].timestamp() == edited["updated"]
    assert row["snapshot_at"] > stored_at

    # A second sync finds nothing newer.
    code, out, _ = await _profiles(database_url, standin, "sync")
    assert code == 0
    assert "drifted (snapshot already current)" in out

    code, out, _ = await _profiles(database_url, standin, "plan", str(path))
    assert code == 2
    assert _headers(out)[("basic", "stripe")] == "drifted"
    assert _headers(out)[("basic", "database")] == "unchanged"
    assert _headers(out)[("pro", "stripe")] == "unchanged"
    assert "  business_profile.headline: Edited by hand → Manage your plan" in out.splitlines()

    # apply puts the file's value back.
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    assert _configurations(standin)["basic"]["business_profile"]["headline"] == "Manage your plan"
    code, out, _ = await _profiles(database_url, standin, "plan", str(path))
    assert code == 0, out


async def test_a_stripe_refusal_stops_the_run_and_keeps_what_stripe_accepted(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    unknown = PRO.replace("name: pro", "name: other").replace("prod_pro", "prod_unknown")
    path = _file(tmp_path, BASIC, unknown, PRO)
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 1
    assert err.splitlines()[-1] == (
        "error: profile other: Stripe: upstream_rejected (resource_missing,"
        " param features[subscription_update][products][0][product]);"
        " what Stripe accepted before it is stored"
    )
    assert set(_configurations(standin)) == {"basic"}  # pro was never tried
    assert set(await _rows(conn)) == {"basic"}
    outcome, detail = await conn.fetchrow(
        "SELECT outcome, detail FROM audit_events WHERE action = 'profiles_apply'"
    )
    assert outcome == "failed"
    assert "profile other" in detail

    code, out, err = await _profiles(
        database_url, standin, "apply", str(_file(tmp_path, BASIC, PRO))
    )
    assert code == 0, err
    assert "profile basic: stripe: unchanged" in out
    assert set(_configurations(standin)) == {"basic", "pro"}


async def test_a_connected_account_profile_lives_on_that_account(
    database_url: str, standin: Standin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    connect = BASIC.replace("name: basic", "name: connect").replace(
        "    default: true\n", "    connected_account: acct_connect1\n"
    )
    path = _file(tmp_path, connect)
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    config = _configurations(standin)["connect"]
    assert standin.state.account_of(config["id"]) == "acct_connect1"
    assert {r.stripe_account for r in standin.state.requests} == {"acct_connect1"}
    row = (await _rows(conn))["connect"]
    assert (row["connected_account"], row["configuration_id"]) == ("acct_connect1", config["id"])

    standin.state.requests.clear()
    code, out, err = await _profiles(database_url, standin, "apply", str(path))
    assert code == 0, err
    assert _writes(standin) == []
    assert "profile connect: stripe: unchanged" in out
    code, out, err = await _profiles(database_url, standin, "sync")
    assert code == 0, err
    assert f"profile connect: {config['id']}: as applied" in out
