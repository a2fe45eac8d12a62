"""Optional diagnostics, after the measured phases: where a request's cost goes.

None of them is a measured phase, and each runs only when asked (``run.py``'s
flags; all on by default):

* round trips: ``sendto()`` calls of the bench database's backends per
  request, counted by strace (``--no-round-trips``);
* statement costs: Postgres backend CPU per execution of each statement of the
  request path (``--no-statement-costs``);
* profile: py-spy on the service and on the floor (``profiling.py``;
  ``--no-profile``).

A diagnostic that fails is logged and recorded (``diagnostic_errors``), and the
run goes on: the measured figures are not lost to it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import random
import signal
import subprocess
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

import dataset
import harness
import procstat
import profiling
import scheme
from harness import log
from stack import Stack

Statements = dict[str, tuple[str, Callable[[], tuple[Any, ...]]]]
BATCH_ROWS = 16


async def run(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """The diagnostics ``args`` ask for, by their key in the results file."""
    wanted: dict[str, Callable[[], Awaitable[Any]]] = {}
    if args.round_trips:
        wanted["round_trips"] = lambda: round_trips_by_principal(stack, args.strace)
    if args.statement_costs:
        wanted["postgres_statement_cpu_us"] = lambda: statement_costs(stack.data, 2000)
    if args.profile:
        wanted["profile"] = lambda: profiling.profile(stack, args)
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, diagnostic in wanted.items():
        try:
            out[key] = await diagnostic()
        except Exception as exc:  # reported, and the run exits 1
            log(f"diagnostic {key} failed:\n{traceback.format_exc()}")
            errors[key] = f"{type(exc).__name__}: {exc}"
    if errors:
        out["diagnostic_errors"] = errors
    return out


# --- round trips: strace on the backends -------------------------------------


async def round_trips_by_principal(stack: Stack, strace: str) -> dict[str, Any]:
    return {p: await round_trips(stack, strace, p, 200) for p in ("client", "user")}


async def round_trips(
    stack: Stack, strace: str, principal: str, count: int
) -> dict[str, Any] | None:
    """sendto() calls of the bench database's backends per request: each
    round trip ends with the server flushing its answer once."""
    target = stack.targets["service"]
    pool = [
        (t, b)
        for t, b in dataset.read_requests(stack.data.requests_path)
        if t.startswith("pgw_") == (principal == "client")
    ][:count]
    await stack.reset_standin(0)
    cmd = [strace, "-f", "-qq", "-c", "-e", "trace=sendto,recvfrom"]
    for pid in await stack.backend_pids():
        cmd += ["-p", str(pid)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        return None
    await asyncio.sleep(1.0)  # attach
    for token, body in pool:
        await stack.post(target, token, body)
    await asyncio.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = await proc.communicate()
    sends = None
    for line in err.decode().splitlines():
        parts = line.split()
        if parts and parts[-1] == "sendto":
            sends = int(parts[3])
    if sends is None:
        return None
    return {"requests": len(pool), "round_trips_per_request": sends / len(pool)}


# --- Postgres CPU per statement ----------------------------------------------


def statements(data: harness.Data) -> Statements:
    """The statements of the request path, with arguments like the service's:
    the one place the bench imports the service's SQL."""
    from service.db.audit import INSERT_AUDIT, INSERT_AUDIT_BATCH
    from service.db.clients import FIND_CLIENT
    from service.db.resolve import RESOLVE, RESOLVE_BATCH, RESOLVE_GROUPED

    token_hash = hashlib.sha256(data.credentials.client_token.encode()).digest()
    rng = random.Random(1)

    def user() -> str:
        return scheme.user_id(rng.randrange(data.users))

    def audit_row() -> tuple[Any, ...]:
        return (
            dt.datetime.now(dt.UTC),
            "0123456789abcdef0123456789abcdef",
            "client",
            "bench",
            user(),
            "portal_session.create",
            "home",
            "created",
            201,
            None,
            "cus_bench1",
            "bps_1abcdefghijklmnopqrstuvw",
            "req_abcdefghijklmn",
            "127.0.0.1",
            "portal-gateway-bench/1",
            12.5,
            '{"attempts": 1}',
        )

    return {
        "SELECT 1 (a round trip, nothing else)": ("SELECT 1", lambda: ()),
        "find_client (token hash lookup)": (FIND_CLIENT, lambda: (token_hash,)),
        # The last argument: a cached client token the statement confirms (issue 17).
        "resolve, portal home": (RESOLVE, lambda: (user(), None, None, None, False, None)),
        "resolve, portal home + client token check": (
            RESOLVE,
            lambda: (user(), None, None, None, False, token_hash),
        ),
        "resolve, subscription flow + plan + offer": (
            RESOLVE,
            lambda: (user(), None, "pro-yearly", "stay-20", True, None),
        ),
        # Grouped lookups (service/db/resolve.py): the RESOLVE of concurrent requests in
        # one statement; the whole statement's cost, not per lookup.
        f"resolve, {BATCH_ROWS} lookups in one statement": (
            RESOLVE_BATCH,
            lambda: (
                orjson.dumps(
                    RESOLVE_GROUPED.batch_args(
                        [(user(), None, None, None, False, token_hash) for _ in range(BATCH_ROWS)]
                    )[0]
                ).decode(),
            ),
        ),
        "insert_audit": (INSERT_AUDIT, audit_row),
        # Group commit (service/db/grouping.py): the rows of concurrent requests in
        # one statement and one commit; the whole statement's cost, not per row.
        f"insert_audit, {BATCH_ROWS} rows in one statement": (
            INSERT_AUDIT_BATCH,
            lambda: tuple(zip(*(audit_row() for _ in range(BATCH_ROWS)), strict=True)),
        ),
    }


async def _cpu_us_per_call(
    pid: int,
    repeats: int,
    call: Callable[..., Awaitable[Any]],
    make_args: Callable[[], tuple[Any, ...]],
) -> float | None:
    """On-CPU time of backend ``pid`` (/proc/PID/schedstat) per ``call(*make_args())``, µs."""
    before = procstat.oncpu_ns(pid)
    for _ in range(repeats):
        await call(*make_args())
    after = procstat.oncpu_ns(pid)
    if before is None or after is None:
        return None
    return (after - before) / repeats / 1000


async def statement_costs(data: harness.Data, repeats: int) -> dict[str, float]:
    """Postgres backend CPU (µs) per execution of each statement of the request
    path, one connection, prepared like the service's, plus the reset asyncpg's
    pool runs on every release. Empty if /proc/PID/schedstat is unreadable."""
    cases = statements(data)
    conn = await asyncpg.connect(data.database_url, timeout=10)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        costs: dict[str, float | None] = {}
        for label, (sql, make_args) in cases.items():
            stmt = await conn.prepare(sql)
            for _ in range(50):  # warm the plan cache
                await stmt.fetch(*make_args())
            costs[label] = await _cpu_us_per_call(pid, repeats, stmt.fetch, make_args)
        reset = conn.get_reset_query()
        label = "pool release reset (" + reset.replace("\n", " ").strip() + ")"
        costs[label] = await _cpu_us_per_call(pid, repeats, conn.execute, lambda: (reset,))
    finally:
        await conn.close()
    if any(v is None for v in costs.values()):
        return {}
    return {k: v for k, v in costs.items() if v is not None}
