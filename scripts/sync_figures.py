"""Figures for ``portal-gateway sync --from-stripe``: time and Stripe calls for N customers.

Not part of ``make test`` (a measurement, not a test). It makes a throwaway
database on the server ``scripts/postgres.sh url`` names (or PG_ADMIN_URL),
migrates it, starts the Stripe stand-in in this process, seeds N customers that
all carry the metadata key (one in ``--subscribed-every`` with a subscription),
runs the real CLI as a subprocess, then reruns it (which must change nothing),
and prints one table: wall time, the CLI's own count of Stripe calls, what the
stand-in received by endpoint, and the mappings written.

    .venv/bin/python scripts/sync_figures.py                      # 10,000 at 1000/s
    .venv/bin/python scripts/sync_figures.py --customers 2000 --cap 10

At the default cap (10/s, STRIPE_SYNC_REQUESTS_PER_SECOND) 10,000 customers
are 100 pages + 10,000 backfills ≈ 17 minutes by design; the default here
raises the cap to 1000/s so the run measures the work, not the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service import migrations  # noqa: E402
from stripe_standin import STATE  # noqa: E402
from stripe_standin import create_app as create_standin  # noqa: E402

KEY = "user_id"
STRIPE_KEY = "sk_test_syncfigures0000000000"


def _admin_url() -> str:
    url = os.environ.get("PG_ADMIN_URL")
    if url:
        return url
    found = subprocess.run(  # noqa: S603 - our own script, no outside input
        [str(REPO / "scripts" / "postgres.sh"), "url"],
        check=True,
        capture_output=True,
        text=True,
    )
    return found.stdout.strip()


def _database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(_database(url, "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _seed(state: object, customers: int, subscribed_every: int) -> int:
    base = 1_760_000_000
    seeds = [
        {"id": f"cus_fig{n:06d}", "created": base - n, "metadata": {KEY: f"u_fig{n:06d}"}}
        for n in range(customers)
    ]
    subs = [
        {
            "id": f"sub_fig{n:06d}",
            "customer": f"cus_fig{n:06d}",
            "items": [{"id": f"si_fig{n:06d}", "price": "price_basic", "quantity": 1}],
        }
        for n in range(0, customers, subscribed_every)
    ]
    state.seed_customers(seeds)  # type: ignore[attr-defined]
    state.seed_subscriptions(subs)  # type: ignore[attr-defined]
    return len(subs)


async def _sync(database_url: str, standin_url: str, cap: float) -> tuple[float, float, int, str]:
    """One CLI run: wall seconds, the CLI's CPU seconds, exit code, summary line."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "STRIPE_API_BASE": standin_url,
        "STRIPE_API_KEY": STRIPE_KEY,
        "STRIPE_USER_METADATA_KEY": KEY,
        "STRIPE_SYNC_REQUESTS_PER_SECOND": str(cap),
        "LOG_LEVEL": "WARNING",  # the audit lines are rows too; not what is measured
    }
    cpu_before = _children_cpu()
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "sync",
        "--from-stripe",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    seconds = time.perf_counter() - started
    assert proc.returncode is not None
    summary = err.decode().strip().splitlines()[-1] if err.strip() else ""
    return seconds, _children_cpu() - cpu_before, proc.returncode, summary


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _calls(summary: str) -> str:
    found = re.search(r"(\d+) Stripe calls in (\d+\.\d) s", summary)
    return f"{found.group(1)} (in {found.group(2)} s)" if found else "?"


def main(customers: int, cap: float, subscribed_every: int) -> int:
    """A throwaway database around the measurement (alembic runs its own event loop)."""
    admin = _admin_url()
    name = f"pgw_syncfig_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(admin, f'CREATE DATABASE "{name}"'))
    try:
        database_url = _database(admin, name)
        migrations.upgrade(database_url)
        return asyncio.run(_measure(database_url, customers, cap, subscribed_every))
    finally:
        asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _measure(database_url: str, customers: int, cap: float, subscribed_every: int) -> int:
    app = create_standin()
    runner = web.AppRunner(app, access_log=None)
    try:
        subscribed = _seed(app[STATE], customers, subscribed_every)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        standin_url = f"http://127.0.0.1:{port}"

        rows = []
        for label in ("first run", "rerun"):
            app[STATE].clear_requests()
            seconds, cpu, code, summary = await _sync(database_url, standin_url, cap)
            if code != 0:
                print(f"{label}: exit {code}: {summary}", file=sys.stderr)
                return 1
            received = Counter(r.path for r in app[STATE].requests)
            rows.append((label, seconds, cpu, summary, received))

        conn = await asyncpg.connect(database_url)
        try:
            linked = await conn.fetchval(
                "SELECT count(*) FROM customers WHERE source = 'stripe_metadata'"
            )
            subs = await conn.fetchval("SELECT count(*) FROM subscriptions")
        finally:
            await conn.close()
    finally:
        await runner.cleanup()

    print(
        f"sync --from-stripe: {customers:,} stand-in customers, all with metadata[{KEY}],"
        f" {subscribed:,} with a subscription; cap STRIPE_SYNC_REQUESTS_PER_SECOND={cap:g}"
    )
    print(f"mappings written: {linked:,}; subscription rows: {subs:,}\n")
    print(
        "| run | wall s | CLI CPU s | Stripe calls (CLI count) | GET /v1/customers"
        " | GET /v1/subscriptions |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, seconds, cpu, summary, received in rows:
        print(
            f"| {label} | {seconds:.1f} | {cpu:.1f} | {_calls(summary)}"
            f" | {received['/v1/customers']:,} | {received['/v1/subscriptions']:,} |"
        )
    print()
    for label, _, _, summary, _ in rows:
        print(f"{label}: {summary}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--cap", type=float, default=1000.0, help="Stripe calls per second")
    parser.add_argument(
        "--subscribed-every", type=int, default=5, help="one customer in N has a subscription"
    )
    args = parser.parse_args()
    sys.exit(main(args.customers, args.cap, args.subscribed_every))
