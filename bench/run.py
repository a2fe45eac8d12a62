"""``make bench``: the service against the floor, in one run (SPEC §10, issue 7).

On loopback: Postgres (``scripts/postgres.sh url``; a dedicated database,
dropped and recreated, migrated, loaded with ``--users`` mappings by COPY),
the Stripe stand-in, the service (``portal-gateway serve``, production
settings: JSON logs to a file, metrics, audit; limits that never trigger) and
the floor (``floor.py``); see ``stack.py``. Load comes from separate
processes: wrk with ``mix.lua`` (closed loop, throughput) and ``openloop.py``
(fixed rate, latency measured from the scheduled send time).

For every scenario (upstream latency × load) and repetition, the service and
the floor take turns. Per phase (``measure.py``): requests/s and latency
percentiles from the load generator; CPU time (user+sys, /proc/PID/stat) of
the target, of the stand-in and of the Postgres backends of the bench
database, divided by the requests the target really answered; peak RSS
(VmHWM, reset at the start of each phase). Medians over the repetitions go
into one table per scenario (``report.py``) and ``bench/results/latest.json``.
Then the Redis phase (SPEC §14): the service as above and the same service
with ``REDIS_URL`` (target ``redis``: rate limits in Redis, the Stripe budget
on through Redis but never throttling), back to back in ``--redis-scenarios``:
the extra CPU and latency per request that sharing limits costs, and the
Redis server's own CPU per request.

Then, outside the measured phases and each only when asked, the diagnostics
(``diagnostics.py``): Postgres round trips per request (strace on the
backends), Postgres CPU per statement, and a py-spy profile of a c=50 phase
(``bench/results/profile.txt``).

Exit status 1 if any request failed (socket error or non-2xx) in any phase,
or a diagnostic failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import re
import sys
import time
from typing import Any

import aiohttp

import diagnostics
import harness
import report
from harness import RESULTS, WORK, log
from measure import Scenario, phase, run_load, wait_quiet
from stack import Stack, Target, parity_check, running

Phases = dict[tuple[str, str], list[dict[str, Any]]]  # (scenario key, target) -> phases


def scenarios_of(args: argparse.Namespace) -> list[Scenario]:
    latencies = [float(x) for x in args.latencies.split(",")]
    concurrencies = [float(x) for x in args.concurrency.split(",")]
    scenarios = [
        *(Scenario(lat, "closed", c) for lat in latencies for c in concurrencies),
        *(Scenario(lat, "open", args.rate) for lat in latencies if args.rate > 0),
    ]
    return sorted(scenarios, key=lambda s: (s.latency_ms, s.mode, s.level))


async def quiet_phase(
    stack: Stack, args: argparse.Namespace, target: Target, scenario: Scenario, retries: int
) -> tuple[dict[str, Any], int]:
    """A measured phase, repeated while other processes took more than
    ``--max-other-load`` cores and retries are left (the quieter one is kept):
    CPU per request holds up under someone else's work, latency and throughput
    do not. Returns the phase and the retries left."""
    seconds = args.duration if scenario.mode == "closed" else args.open_duration
    result = await phase(stack, target, scenario, seconds, args.wrk)
    while result["other_cpu_cores"] > args.max_other_load and retries > 0:
        retries -= 1
        log(
            f"{scenario.key} {target.name}: {result['other_cpu_cores']:.2f} cores of"
            f" other load on the machine; repeating ({retries} retries left)"
        )
        await wait_quiet(args.max_other_load, 10)
        again = await phase(stack, target, scenario, seconds, args.wrk)
        if again["other_cpu_cores"] < result["other_cpu_cores"]:
            result = again
    return result, retries


async def measured_phases(
    stack: Stack, args: argparse.Namespace, scenarios: list[Scenario]
) -> Phases:
    """Warm both targets up, then every scenario × repetition, service and floor
    back to back (which goes first alternates)."""
    for name in ("service", "floor"):
        for level in (50, 200):
            warm = Scenario(0, "closed", level)
            await phase(stack, stack.targets[name], warm, args.warmup, args.wrk, measure=False)
    log("warmed up")
    phases: Phases = {}
    total, done, retries = len(scenarios) * 2 * args.reps, 0, args.retries
    for rep in range(args.reps):
        for scenario in scenarios:
            for name in ("service", "floor") if rep % 2 == 0 else ("floor", "service"):
                target = stack.targets[name]
                result, retries = await quiet_phase(stack, args, target, scenario, retries)
                phases.setdefault((scenario.key, name), []).append(result)
                done += 1
                log(
                    f"[{done}/{total}] rep {rep + 1} {scenario.key} {name}:"
                    f" {result['requests_per_s']:.0f} req/s,"
                    f" p99 {result['p99_ms']:.1f} ms,"
                    f" CPU {result['cpu_us_per_request']:.0f} µs/req,"
                    f" pg {result['pg_cpu_us_per_request']:.0f} µs/req,"
                    f" other load {result['other_cpu_cores']:.2f} cores"
                )
    return phases


def _scenario_of(key: str) -> Scenario:
    match = re.fullmatch(r"upstream([\d.]+)ms-(closed|open)-(?:c|rate)([\d.]+)", key)
    if match is None:
        raise SystemExit(f"--redis-scenarios: not a scenario key: {key!r}")
    return Scenario(float(match[1]), match[2], float(match[3]))


async def redis_phases(stack: Stack, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The service without and with REDIS_URL, back to back (which goes first
    alternates), in each of ``--redis-scenarios``; [] when there is no Redis."""
    keys = [k for k in args.redis_scenarios.split(",") if k]
    if "redis" not in stack.targets or not keys or args.reps == 0:
        return []
    scenarios = [_scenario_of(k) for k in keys]
    for level in (50, 200):
        warm = Scenario(0, "closed", level)
        await phase(stack, stack.targets["redis"], warm, args.warmup, args.wrk, measure=False)
    phases: Phases = {}
    retries = args.retries
    for rep in range(args.reps):
        for scenario in scenarios:
            for name in ("service", "redis") if rep % 2 == 0 else ("redis", "service"):
                target = stack.targets[name]
                result, retries = await quiet_phase(stack, args, target, scenario, retries)
                phases.setdefault((scenario.key, name), []).append(result)
                log(
                    f"redis phase, rep {rep + 1} {scenario.key} {name}:"
                    f" {result['requests_per_s']:.0f} req/s,"
                    f" p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms,"
                    f" CPU {result['cpu_us_per_request']:.0f} µs/req,"
                    f" redis {result['redis_cpu_us_per_request']:.0f} µs/req,"
                    f" decisions in Redis {result.get('limit_decisions_redis', 0):.0f},"
                    f" Redis errors {result.get('redis_errors', 0):.0f}"
                )
    return [
        report.redis_result(
            {"key": s.key, "title": s.title, **dataclasses.asdict(s)},
            phases[(s.key, "service")],
            phases[(s.key, "redis")],
        )
        for s in scenarios
    ]


def scenario_results(scenarios: list[Scenario], phases: Phases) -> list[dict[str, Any]]:
    return [
        report.scenario_result(
            {"key": s.key, "title": s.title, **dataclasses.asdict(s)},
            phases[(s.key, "service")],
            phases[(s.key, "floor")],
        )
        for s in scenarios
        if (s.key, "service") in phases  # none with --reps 0
    ]


def other_run(users: int) -> dict[str, Any] | None:
    """The last results at the other size (100,000 or 1,000,000 users), if any."""
    path = RESULTS / f"users-{100_000 if users != 100_000 else 1_000_000}.json"
    return json.loads(path.read_text()) if path.exists() else None


async def machine_wakeup() -> dict[str, Any] | None:
    """``wakeup.py``: what waking a process costs the machine now (µs of CPU per
    loopback echo, each side, back to back and paced 5 ms apart); None, logged, if
    it cannot tell (no /proc/PID/schedstat): the run goes on without it."""
    try:
        return await run_load([harness.PYTHON, str(harness.BENCH / "wakeup.py")])
    except RuntimeError as exc:
        log(f"the machine's wake-up cost is not measured: {exc}")
        return None


def meta(
    args: argparse.Namespace,
    data: harness.Data,
    wall: float,
    wakeup: list[dict[str, Any] | None],
) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": harness.git_commit(),
        "users": args.users,
        "reps": args.reps,
        "duration_s": args.duration,
        "open_duration_s": args.open_duration,
        "open_rate": args.rate,
        "request_pool": data.mix,
        "jwts": data.jwts,
        "load_seconds": data.load_seconds,
        "wall_seconds": wall,
        "machine_wakeup_us": wakeup,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "kernel": platform.release(),
    }


async def main_async(args: argparse.Namespace) -> int:
    run_started = time.perf_counter()
    random.seed(args.seed)
    scenarios = scenarios_of(args)
    await wait_quiet(args.max_other_load, 60)
    wakeup = [await machine_wakeup()]
    log(f"loading {args.users:,} user mappings into {args.database}")
    data = await harness.prepare_data(
        database=args.database,
        users=args.users,
        jwts=args.jwts,
        pool_size=args.pool,
        seed=args.seed,
    )
    log(f"loaded in {data.load_seconds:.1f} s (COPY); request pool: {data.mix}")
    async with running(data, args.database) as stack:
        extra: dict[str, Any] = {"parity": await parity_check(stack)}
        log("parity: the floor sends Stripe the same params as the service")
        phases = await measured_phases(stack, args, scenarios)
        extra["redis"] = await redis_phases(stack, args)
        extra.update(await diagnostics.run(stack, args))
        extra["peak_rss_since_start_mb"] = {
            name: t.peak_rss_since_start_kb / 1024 for name, t in stack.targets.items()
        }
        extra["unreadable_pg_backends"] = sorted(stack.unreadable_pg)
        targets = stack.targets
    wakeup.append(await machine_wakeup())

    results = scenario_results(scenarios, phases)
    failures = [f"{n}: {f}" for n, t in targets.items() for f in t.failures]
    result = {
        "meta": meta(args, data, time.perf_counter() - run_started, wakeup),
        "scenarios": results,
        "targets": report.targets(results, other_run(args.users)),
        "failures": failures,
        **extra,
    }
    print(report.text(result, RESULTS / "profile.txt"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    if args.reps > 0:
        (RESULTS / "latest.json").write_text(text)
        (RESULTS / f"users-{args.users}.json").write_text(text)
    else:
        (RESULTS / "profile-run.json").write_text(text)
    if failures:
        print("\nFAILED requests:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
    for name, error in extra.get("diagnostic_errors", {}).items():
        print(f"diagnostic {name} FAILED: {error}", file=sys.stderr)
    return 1 if failures or "diagnostic_errors" in extra else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=100_000, help="user mappings to load")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (0: diagnostics only)")
    parser.add_argument("--duration", type=float, default=6.0, help="closed-loop phase, s")
    parser.add_argument("--open-duration", type=float, default=10.0, help="open-loop phase, s")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop req/s (0: none)")
    parser.add_argument("--latencies", default="0,50", help="upstream latencies, ms")
    parser.add_argument("--concurrency", default="50,200", help="closed-loop concurrencies")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per target, s")
    parser.add_argument("--jwts", type=int, default=10_000, help="end-user JWT pool")
    parser.add_argument("--pool", type=int, default=20_000, help="request pool size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database", default=harness.DEFAULT_DATABASE)
    parser.add_argument("--wrk", default="wrk")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="retry a phase when other processes took more cores than this",
    )
    parser.add_argument("--retries", type=int, default=4, help="repeats allowed per run")
    parser.add_argument(
        "--redis-scenarios",
        default="upstream0ms-closed-c50,upstream50ms-open-rate200",
        help="scenarios of the Redis phase, service vs service with REDIS_URL ('': none)",
    )
    diag = parser.add_argument_group("diagnostics (after the measured phases; all on by default)")
    diag.add_argument("--no-round-trips", dest="round_trips", action="store_false")
    diag.add_argument("--strace", default="strace")
    diag.add_argument("--no-statement-costs", dest="statement_costs", action="store_false")
    diag.add_argument("--no-profile", dest="profile", action="store_false")
    diag.add_argument("--py-spy", default=str(harness.BENCH / ".venv" / "bin" / "py-spy"))
    diag.add_argument("--profile-duration", type=float, default=10.0)
    diag.add_argument("--profile-rate", type=int, default=250)
    diag.add_argument("--profile-latency", type=float, default=0.0)
    diag.add_argument("--profile-native", action="store_true")
    diag.add_argument(
        "--no-profile-pin",
        dest="profile_pin",
        action="store_false",
        help="do not pin the service to CPU 0 (and the rest to CPU 1) while profiling",
    )
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
