"""``portal-gateway sync --from-stripe`` (a real CLI process) against the stand-in over HTTP.

SPEC §11's bootstrap: every page of ``GET /v1/customers`` walked, customers
whose metadata names a user linked by the webhooks' precedence rule and
backfilled; ``--dry-run`` writes nothing; an interrupted run resumes from its
stored cursor; a rerun changes nothing; conflicts are counted and audited; a
user linked by sync opens a subscription flow at once; every Stripe call waits
for the rate cap. Customers are seeded through the stand-in's control API.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from service.pacing import RateCap
from service.stripe_sync import Tally, fact_of
from service.sync_progress import PageLines, TerminalBar, progress_for, summary
from tests.conftest import STRIPE_TEST_KEY, Standin
from tests.helpers import created, post_session

pytestmark = pytest.mark.usefixtures("world")

REPO = Path(__file__).resolve().parent.parent
KEY = "user_id"
# Customers are listed newest first: customer n of a batch is created at BASE - n.
BASE = 1_760_000_000
# Fast by default; the cap itself has its own test.
FAST = "1000"


async def _sync(
    database_url: str, standin: Standin, *args: str, **env: str
) -> tuple[int, str, str]:
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "STRIPE_API_BASE": standin.url,
        "STRIPE_API_KEY": STRIPE_TEST_KEY,
        "STRIPE_MAX_RETRIES": "0",
        "STRIPE_USER_METADATA_KEY": KEY,
        "STRIPE_SYNC_REQUESTS_PER_SECOND": FAST,
    }
    full_env.update(env)
    full_env = {k: v for k, v in full_env.items() if v != ""}
    # Not subprocess.run: the stand-in answers from this very event loop.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *(args or ("sync", "--from-stripe")),
        cwd=REPO,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _control(standin: Standin, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{standin.url}/_standin/{path}", json=body) as resp,
    ):
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 200, answer
        return answer


def _customer(cid: str, created: int, user: str | None = None, **extra: Any) -> dict[str, Any]:
    seed: dict[str, Any] = {"id": cid, "created": created, **extra}
    if user is not None:
        seed["metadata"] = {KEY: user}
    return seed


def _batch(count: int, prefix: str = "s") -> list[dict[str, Any]]:
    """cus_{prefix}0000 (newest) … naming u_{prefix}0000 …"""
    return [_customer(f"cus_{prefix}{n:04d}", BASE - n, f"u_{prefix}{n:04d}") for n in range(count)]


def _subscription(sub: str, customer: str, status: str = "active") -> dict[str, Any]:
    return {
        "id": sub,
        "customer": customer,
        "status": status,
        "items": [{"id": "si_" + sub[4:], "price": "price_basic", "quantity": 2}],
    }


async def _seed(
    standin: Standin,
    customers: list[dict[str, Any]],
    subs: list[dict[str, Any]] | None = None,
) -> None:
    await _control(standin, "customers", {"customers": customers})
    if subs:
        await _control(standin, "subscriptions", {"subscriptions": subs})


def _pages(standin: Standin) -> list[str | None]:
    """The starting_after of every GET /v1/customers received, in order."""
    return [
        r.params.get("starting_after") if r.params else None
        for r in standin.requests("/v1/customers")
    ]


async def _mappings(conn: asyncpg.Connection) -> dict[str, tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT user_id, stripe_customer_id, source, connected_account, stale_at FROM customers"
    )
    return {r["user_id"]: tuple(r.values())[1:] for r in rows}


async def _subscriptions(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    rows = await conn.fetch("SELECT * FROM subscriptions ORDER BY stripe_subscription_id")
    return [tuple(r.values()) for r in rows]


async def _actions(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT action, count(*) AS n FROM audit_events GROUP BY action")
    return {r["action"]: r["n"] for r in rows}


async def _cursor(conn: asyncpg.Connection) -> list[tuple[str, str | None]]:
    rows = await conn.fetch("SELECT name, cursor FROM sync_cursors")
    return [(r["name"], r["cursor"]) for r in rows]


def _summary(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sync")]
    assert lines, err
    return lines[-1]


def _without_time(line: str) -> str:
    return re.sub(r"in \d+\.\d s", "in T s", line)


# --- the walk ------------------------------------------------------------------


async def test_sync_links_every_page_and_backfills(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    customers = _batch(250)
    # Oldest, so listed last: customers that name nobody we could map.
    customers += [
        _customer("cus_nokey", BASE - 1000, email="nokey@example.com"),
        _customer("cus_otherkey", BASE - 1001, metadata={"crm_id": "42"}),
        _customer("cus_toolong", BASE - 1002, "u" * 129),
        _customer("cus_gone", BASE - 1003, "u_gone", deleted=True),  # Stripe doesn't list it
    ]
    subs = [_subscription(f"sub_s{n:04d}", f"cus_s{n:04d}") for n in range(0, 250, 10)]
    subs.append(_subscription("sub_s0001old", "cus_s0001", "canceled"))
    await _seed(standin, customers, subs)

    code, out, err = await _sync(database_url, standin)
    assert code == 0, err
    # stdout: the audit line of every row (SPEC §6), as JSON.
    logged = [orjson.loads(line) for line in out.splitlines()]
    audit_lines = [line["action"] for line in logged if line["logger"] == "audit"]
    assert len(audit_lines) == 250 + 250 + 1
    # Not a terminal: a line per page, then the summary.
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in err.splitlines()[:3]] == [
        "sync: page 1",
        "sync: page 2",
        "sync: page 3",
    ]
    assert _without_time(_summary(err)) == (
        "sync: 253 customers in 3 pages: linked 250, 0 unchanged, 0 conflicts,"
        " 3 skipped (2 no key, 0 deleted, 1 invalid user id); 250 backfilled;"
        " 253 Stripe calls in T s (cap 1000/s)"
    )
    assert _pages(standin) == [None, "cus_s0099", "cus_s0199"]
    assert next(r.params for r in standin.requests("/v1/customers")) == {"limit": "100"}
    assert len(standin.requests("/v1/subscriptions")) == 250  # one backfill per user linked

    rows = await conn.fetch(
        "SELECT user_id, stripe_customer_id, source_at FROM customers"
        " WHERE source = 'stripe_metadata' ORDER BY user_id"
    )
    assert [(r["user_id"], r["stripe_customer_id"]) for r in rows] == [
        (f"u_s{n:04d}", f"cus_s{n:04d}") for n in range(250)
    ]
    assert len({r["source_at"] for r in rows}) == 1  # one fact time: the run's
    backfilled = await conn.fetch(
        "SELECT user_id, stripe_subscription_id, status, item_id, quantity, deleted_at IS NULL"
        " AS open FROM subscriptions WHERE user_id LIKE 'u_s%' ORDER BY 2"
    )
    assert len(backfilled) == 26
    assert tuple(backfilled[0].values()) == ("u_s0000", "sub_s0000", "active", "si_s0000", 2, True)
    assert ("u_s0001", "sub_s0001old", "canceled") in [tuple(r.values())[:3] for r in backfilled]

    assert await _cursor(conn) == []  # finished: the next run starts over
    assert await _actions(conn) == {"mapping.link": 250, "mapping.backfill": 250, "mapping.sync": 1}
    run = await conn.fetchrow("SELECT * FROM audit_events WHERE action = 'mapping.sync'")
    assert run is not None
    assert (run["principal_type"], run["principal_id"], run["outcome"]) == (
        "cli",
        "sync",
        "applied",
    )
    detail = orjson.loads(run["detail"])
    assert {k: detail[k] for k in ("customers", "linked", "skipped", "backfilled", "pages")} == {
        "customers": 253,
        "linked": 250,
        "skipped": 3,
        "backfilled": 250,
        "pages": 3,
    }
    assert detail["stripe_calls"] == 253
    # Every row of the run carries the run's id.
    ids = await conn.fetchval(
        "SELECT count(DISTINCT request_id) FROM audit_events WHERE principal_id = 'sync'"
    )
    assert ids == 1


async def test_dry_run_writes_nothing(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _seed(
        standin,
        [*_batch(150), _customer("cus_elsewhere", BASE - 500, "u_42")],  # u_42 is imported
        [_subscription("sub_s0000", "cus_s0000")],
    )
    before = (await _mappings(conn), await _subscriptions(conn), await _actions(conn))

    code, _out, err = await _sync(database_url, standin, "sync", "--from-stripe", "--dry-run")
    assert code == 0, err
    assert _without_time(_summary(err)) == (
        "sync --dry-run (nothing written): 151 customers in 2 pages: would link 150,"
        " 0 unchanged, 1 conflicts, 0 skipped (0 no key, 0 deleted, 0 invalid user id);"
        " 2 Stripe calls in T s (cap 1000/s)"
    )
    assert (await _mappings(conn), await _subscriptions(conn), await _actions(conn)) == before
    assert await _cursor(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM deployment") == 0  # the mode not recorded
    assert standin.requests("/v1/subscriptions") == []  # no backfill
    assert _pages(standin) == [None, "cus_s0099"]


async def test_an_interrupted_sync_resumes_from_its_cursor(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _seed(standin, _batch(250), [_subscription("sub_s0150", "cus_s0150")])
    # Page 1 and its 100 backfills go through; the next call (page 2) fails.
    await _control(
        standin, "faults", {"faults": [{"latency_ms": 0, "repeat": 101}, {"status": 500}]}
    )
    code, _, err = await _sync(database_url, standin)
    assert code == 1
    assert err.splitlines()[-1] == (
        "error: sync stopped: Stripe: upstream_unavailable listing customers after cus_s0099;"
        " run it again to resume after the last page done"
    )
    assert "Traceback" not in err
    assert await _cursor(conn) == [("customers", "cus_s0099")]
    assert len(await _mappings(conn)) == 6 + 100
    stopped = await conn.fetchrow(
        "SELECT outcome, detail FROM audit_events WHERE action = 'mapping.sync'"
    )
    assert stopped is not None
    assert stopped["outcome"] == "failed"
    assert orjson.loads(stopped["detail"])["linked"] == 100

    standin.state.clear_requests()
    code, _out, err = await _sync(database_url, standin)
    assert code == 0, err
    assert _pages(standin) == ["cus_s0099", "cus_s0199"]  # from the stored cursor
    assert _without_time(_summary(err)) == (
        "sync: 150 customers in 2 pages, resumed after cus_s0099: linked 150, 0 unchanged,"
        " 0 conflicts, 0 skipped (0 no key, 0 deleted, 0 invalid user id); 150 backfilled;"
        " 152 Stripe calls in T s (cap 1000/s)"
    )
    assert len(await _mappings(conn)) == 6 + 250
    assert (
        await conn.fetchval(
            "SELECT user_id FROM subscriptions WHERE stripe_subscription_id = 'sub_s0150'"
        )
        == "u_s0150"
    )
    assert await _cursor(conn) == []


async def test_a_run_cut_between_link_and_backfill_backfills_on_resume(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    subs = [_subscription(f"sub_s{n:04d}", f"cus_s{n:04d}") for n in range(40)]
    await _seed(standin, _batch(40), subs)
    # The page goes through, 10 backfills too, then Stripe fails: every link of
    # the page is written, not every backfill.
    await _control(
        standin, "faults", {"faults": [{"latency_ms": 0, "repeat": 11}, {"status": 503}]}
    )
    code, _, err = await _sync(database_url, standin)
    assert code == 1
    assert "backfill: upstream_unavailable; run it again to resume" in err
    assert await _cursor(conn) == [("customers", None)]  # cut short before any page was done
    linked = await conn.fetchval("SELECT count(*) FROM customers WHERE user_id LIKE 'u_s%'")
    assert linked == 40
    assert await conn.fetchval("SELECT count(*) FROM subscriptions WHERE user_id LIKE 'u_s%'") < 40

    code, _, err = await _sync(database_url, standin)
    assert code == 0, err
    assert "resumed after nothing done (first page again): linked 0, 40 unchanged" in err
    assert await conn.fetchval("SELECT count(*) FROM subscriptions WHERE user_id LIKE 'u_s%'") == 40


async def test_a_backfill_stripe_refuses_is_reported_and_the_run_goes_on(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _seed(standin, _batch(3), [_subscription("sub_s0002", "cus_s0002")])
    # Listed, but GET /v1/subscriptions?customer=cus_s0001 answers 404 resource_missing.
    await _control(standin, "missing", {"ids": ["cus_s0001"]})
    code, _, err = await _sync(database_url, standin)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-3].startswith("backfill failed: u_s0001: backfill: upstream_rejected")
    assert "linked 3," in lines[-2]
    assert "2 backfilled, 1 backfills failed" in lines[-2]
    assert lines[-1] == (
        "error: 1 backfills failed; the mappings are linked:"
        " `portal-gateway resync --user ID` retries one"
    )
    assert await _cursor(conn) == []  # the run finished
    subscribed = await conn.fetch("SELECT user_id FROM subscriptions WHERE user_id LIKE 'u_s%'")
    assert [r["user_id"] for r in subscribed] == ["u_s0002"]
    # Stripe does not know the customer: the mapping stays, marked stale.
    stale = await conn.fetchval("SELECT stale_at FROM customers WHERE user_id = 'u_s0001'")
    assert stale is not None


async def test_a_rerun_changes_nothing(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    subs = [_subscription(f"sub_s{n:04d}", f"cus_s{n:04d}") for n in range(0, 120, 3)]
    await _seed(standin, _batch(120), subs)
    code, _, err = await _sync(database_url, standin)
    assert code == 0, err
    before = (await _mappings(conn), await _subscriptions(conn), await _actions(conn))

    standin.state.clear_requests()
    code, _, err = await _sync(database_url, standin)
    assert code == 0, err
    assert _without_time(_summary(err)) == (
        "sync: 120 customers in 2 pages: linked 0, 120 unchanged, 0 conflicts,"
        " 0 skipped (0 no key, 0 deleted, 0 invalid user id); 0 backfilled;"
        " 2 Stripe calls in T s (cap 1000/s)"
    )
    mappings, subscriptions, actions = before
    actions["mapping.sync"] += 1  # the rerun's own summary row, nothing else
    assert (await _mappings(conn), await _subscriptions(conn), await _actions(conn)) == (
        mappings,
        subscriptions,
        actions,
    )
    assert standin.requests("/v1/subscriptions") == []


async def test_restart_starts_over(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _seed(standin, _batch(120))
    await conn.execute("INSERT INTO sync_cursors (name, cursor) VALUES ('customers', 'cus_s0099')")
    code, _, err = await _sync(database_url, standin, "sync", "--from-stripe", "--restart")
    assert code == 0, err
    assert _pages(standin) == [None, "cus_s0099"]
    assert "linked 120" in _summary(err)
    assert await _cursor(conn) == []


async def test_conflicts_are_counted_and_audited(
    database_url: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    # world: u_42 -> cus_42 and u_7 -> cus_7, imported (explicit).
    await _seed(
        standin,
        [
            _customer("cus_42", BASE, "u_42"),  # says what the import says
            _customer("cus_elsewhere", BASE - 1, "u_42"),  # u_42 is cus_42's: explicit wins
            _customer("cus_7", BASE - 2, "u_new7"),  # cus_7 is u_7's: explicit wins
            _customer("cus_dupnew", BASE - 3, "u_dup"),  # newest customer naming u_dup
            _customer("cus_dupold", BASE - 4, "u_dup"),  # a second one: a conflict
        ],
    )
    before = await _mappings(conn)
    code, _, err = await _sync(database_url, standin)
    assert code == 0, err
    assert "linked 1, 1 unchanged, 3 conflicts," in _summary(err)

    after = await _mappings(conn)
    assert after.pop("u_dup") == ("cus_dupnew", "stripe_metadata", None, None)
    assert after == before  # explicit mappings untouched
    rows = await conn.fetch(
        "SELECT user_id, stripe_customer_id, outcome, detail FROM audit_events"
        " WHERE action = 'mapping_conflict' ORDER BY stripe_customer_id"
    )
    assert [(r["user_id"], r["stripe_customer_id"], r["outcome"]) for r in rows] == [
        ("u_new7", "cus_7", "conflict"),
        ("u_dup", "cus_dupold", "conflict"),
        ("u_42", "cus_elsewhere", "conflict"),
    ]
    reasons = [orjson.loads(r["detail"])["reason"] for r in rows]
    assert reasons == ["explicit_mapping", "claimed_by_two_customers", "explicit_mapping"]

    # A rerun decides the same way.
    code, _, err = await _sync(database_url, standin)
    assert code == 0, err
    assert "linked 0, 2 unchanged, 3 conflicts," in _summary(err)
    assert (await _mappings(conn))["u_dup"][0] == "cus_dupnew"


async def test_a_user_linked_by_sync_opens_a_subscription_flow_at_once(
    database_url: str, standin: Standin, service: Any, token: str
) -> None:
    await _seed(
        standin,
        [_customer("cus_fresh", BASE, "u_fresh")],
        [
            _subscription("sub_fresh", "cus_fresh"),
            _subscription("sub_freshold", "cus_fresh", "canceled"),
        ],
    )
    code, _, err = await _sync(database_url, standin)
    assert code == 0, err

    flow = {"type": "subscription_cancel"}  # names no subscription: the only open one
    await created(await post_session(service, {"user_id": "u_fresh", "flow": flow}, token))
    (sent,) = standin.requests()
    assert sent.params["customer"] == "cus_fresh"
    assert sent.params["flow_data"]["subscription_cancel"]["subscription"] == "sub_fresh"


# --- configuration, the cap, progress -----------------------------------------------


async def test_sync_needs_the_metadata_key(database_url: str, standin: Standin) -> None:
    no_key, no_source = await asyncio.gather(
        _sync(database_url, standin, STRIPE_USER_METADATA_KEY=""),
        _sync(database_url, standin, "sync"),
    )
    assert no_key[0] == 2
    assert no_key[2].strip().splitlines() == [
        "configuration error: STRIPE_USER_METADATA_KEY: sync --from-stripe links customers"
        " by this metadata key; set it (e.g. user_id)"
    ]
    assert no_source[0] == 2  # argparse: --from-stripe is required
    assert standin.state.requests == []


async def test_every_stripe_call_waits_for_the_rate_cap(
    database_url: str, standin: Standin
) -> None:
    # 3 pages and 2 backfills: 5 calls at 4/s take at least a second.
    await _seed(
        standin,
        [_customer(f"cus_n{n:03d}", BASE - n) for n in range(200)]
        + [_customer("cus_s0000", BASE - 300, "u_s0000")]
        + [_customer("cus_s0001", BASE - 301, "u_s0001")],
    )
    started = time.monotonic()
    code, _, err = await _sync(database_url, standin, STRIPE_SYNC_REQUESTS_PER_SECOND="4")
    assert code == 0, err
    assert time.monotonic() - started >= 1.0
    assert "5 Stripe calls in" in _summary(err)
    seconds = float(re.search(r"in (\d+\.\d) s", _summary(err)).group(1))  # type: ignore[union-attr]
    assert seconds >= 0.9  # rounded to a tenth


async def test_rate_cap_spaces_calls_evenly() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    cap = RateCap(4, clock=lambda: now[0], sleep=sleep)
    await cap.wait()  # at once
    await cap.wait()
    await cap.wait()
    now[0] += 2.0  # idle: no credit saved up beyond one call
    await cap.wait()
    await cap.wait()
    assert slept == [0.25, 0.25, 0.25]
    assert cap.calls == 5
    # Callers arriving together reserve successive slots.
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(round(seconds, 6))

    together = RateCap(10, clock=lambda: now[0], sleep=record)
    await asyncio.gather(*(together.wait() for _ in range(3)))
    assert waits == [0.1, 0.2]


def test_facts_and_skips() -> None:
    now = datetime.now(UTC)
    fact = fact_of({"id": "cus_1", "metadata": {KEY: "u_1"}}, KEY, now)
    assert not isinstance(fact, str)
    assert (fact.customer, fact.user_id) == ("cus_1", "u_1")
    assert fact_of({"id": "cus_1", "metadata": {}}, KEY, now) == "no_key"
    assert fact_of({"id": "cus_1", "metadata": {KEY: ""}}, KEY, now) == "no_key"
    assert fact_of({"id": "cus_1", "deleted": True}, KEY, now) == "deleted"
    assert fact_of({"id": "cus_1", "metadata": {KEY: "u" * 129}}, KEY, now) == "invalid_user_id"
    assert fact_of({"id": "xyz", "metadata": {KEY: "u_1"}}, KEY, now) == "invalid_user_id"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the width of this fake terminal
    tally = Tally(dry_run=False, rate_cap=10, pages=1, customers=100, linked=90, skipped_no_key=10)
    terminal = _Terminal()
    bar = progress_for(terminal)
    assert isinstance(bar, TerminalBar)
    bar.step(tally, "linking", 50, 100)
    bar.step(tally, "linking", 100, 100)  # a phase's end is always drawn
    bar.step(tally, "backfilling", 90, 90)
    bar.page_done(tally)
    bar.finished(tally)
    drawn = terminal.getvalue()
    assert drawn.startswith(
        "\rsync page 1 linking     [##########----------] 50/100 · 100 customers · linked 90"
    )
    assert "\rsync page 1 linking     [####################] 100/100 ·" in drawn
    assert "\rsync page 1 backfilling [####################] 90/90 ·" in drawn
    assert drawn.endswith("\n")
    assert drawn.count("\n") == 1
    # Never wider than the terminal: a wrapped line could not be redrawn.
    monkeypatch.setenv("COLUMNS", "40")
    narrow = _Terminal()
    TerminalBar(narrow).step(tally, "linking", 100, 100)
    assert narrow.getvalue() == "\rsync page 1 linking     [##############\x1b[K"

    plain = io.StringIO()
    lines = progress_for(plain)
    assert isinstance(lines, PageLines)
    lines.step(tally, "linking", 50, 100)
    lines.page_done(tally)
    lines.finished(tally)
    assert plain.getvalue() == (
        "sync: page 1: 100 customers · linked 90 · unchanged 0 · conflicts 0 · skipped 10"
        " · 0 Stripe calls\n"
    )
    assert summary(tally).startswith("sync: 100 customers in 1 pages: linked 90, 0 unchanged")
