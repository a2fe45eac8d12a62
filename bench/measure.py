"""One phase: a load generator against one target, and what the requests cost.

A phase reads the counters (:class:`Tally`: requests the target answered,
Postgres CPU; :class:`Clock`: /proc CPU times of the target and the stand-in,
the machine's busy time, our children's CPU), runs the load, waits for what
is still in flight, reads them again, and :func:`figures` turns the two
readings into figures per request. The slow reads (an HTTP scrape of the
target, queries on the monitoring connection) stay outside the /proc window,
so their CPU is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import procstat
from harness import log
from stack import Stack, Target

DB_QUERIES = ("find_client", "resolve", "resolve_idempotent", "insert_audit")


@dataclass(frozen=True)
class Scenario:
    latency_ms: float
    mode: str  # "closed" or "open"
    level: float  # concurrency (closed) or requests/s (open)

    @property
    def key(self) -> str:
        load = f"c{self.level:g}" if self.mode == "closed" else f"rate{self.level:g}"
        return f"upstream{self.latency_ms:g}ms-{self.mode}-{load}"

    @property
    def title(self) -> str:
        load = (
            f"closed loop, concurrency {self.level:g}"
            if self.mode == "closed"
            else f"open loop, {self.level:g} req/s"
        )
        return f"upstream latency {self.latency_ms:g} ms, {load}"


async def wait_quiet(max_cores: float, timeout: float) -> None:
    """Wait (bounded) until the machine's load is below ``max_cores`` over 2 s."""
    deadline = time.monotonic() + timeout
    while True:
        busy0, _, _ = procstat.machine_busy_us()
        await asyncio.sleep(2.0)
        busy1, _, _ = procstat.machine_busy_us()
        cores = (busy1 - busy0) / 2e6
        if cores <= max_cores:
            return
        if time.monotonic() > deadline:
            log(f"the machine is busy ({cores:.2f} cores) before we start: figures will be noisy")
            return
        log(f"waiting for a quieter machine ({cores:.2f} cores busy)")


def load_command(
    scenario: Scenario, url: str, requests: Path, seconds: float, wrk: str, seed: str
) -> list[str]:
    """wrk with ``mix.lua`` (closed loop) or ``openloop.py`` (open loop)."""
    if scenario.mode == "closed":
        script = str(harness.BENCH / "mix.lua")
        return [
            *(wrk, "-t1", f"-c{scenario.level:g}", f"-d{seconds:g}s", "--timeout", "10s"),
            *("-s", script, url, "--", str(requests), seed),
        ]
    return [
        *(harness.PYTHON, str(harness.BENCH / "openloop.py"), url, str(requests)),
        *("--rate", f"{scenario.level:g}", "--duration", f"{seconds:g}", "--seed", seed),
    ]


async def run_load(cmd: list[str], cpus: set[int] | None = None) -> dict[str, Any]:
    """Run a load generator (on ``cpus`` if given); its ``BENCH_JSON`` line."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, cpus)
    out, err = await proc.communicate()
    for line in out.decode().splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            return result
    raise RuntimeError(f"load generator failed ({proc.returncode}): {err.decode()[-2000:]}")


@dataclass(frozen=True)
class Tally:
    """The slow reads: the target's request counts, Postgres CPU by pid (µs)."""

    counts: dict[str, float]
    pg: dict[int, float]
    pg_background: dict[int, float]


async def read_tally(stack: Stack, target: Target) -> Tally:
    counts = await target.counts(stack.session)
    return Tally(counts, await stack.pg_cpu(), await stack.pg_cpu(background=True))


@dataclass(frozen=True)
class Clock:
    """The /proc window: CPU times in µs, wall time in s."""

    user_us: float
    sys_us: float
    standin_us: float
    redis_us: float  # the Redis phase's redis-server (0 without one)
    machine_us: tuple[float, float, float]  # busy, total, steal
    loadgen_us: float  # our finished children: the load generators
    wall: float


def read_clock(stack: Stack, target: Target) -> Clock:
    user, sys_ = procstat.cpu_split_us(target.proc.pid) or (0.0, 0.0)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Clock(
        user,
        sys_,
        procstat.cpu_us(stack.standin.pid) or 0.0,
        (procstat.cpu_us(stack.redis.pid) or 0.0) if stack.redis is not None else 0.0,
        procstat.machine_busy_us(),
        (children.ru_utime + children.ru_stime) * 1e6,
        time.perf_counter(),
    )


def _pg_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def _load_outcome(mode: str, load: dict[str, Any]) -> tuple[float, float, float]:
    """(requests/s, failed as the caller saw them, non-2xx) from the generator."""
    seconds = load["duration_us"] / 1e6
    socket_errors = sum(load["errors"].values())
    if mode == "closed":
        return load["requests"] / seconds, socket_errors, load["errors"]["status"]
    not_ok = load["requests"] - load["ok"]
    return load["ok"] / seconds, socket_errors + not_ok, not_ok - socket_errors


def _service_figures(c0: dict[str, float], c1: dict[str, float], per: float) -> dict[str, Any]:
    """DB queries per request and the statuses the service answered."""
    out: dict[str, Any] = {
        f"db_{q}_per_request": (c1.get(f"db_{q}", 0) - c0.get(f"db_{q}", 0)) / per
        for q in DB_QUERIES
    }
    # The Redis phase: decisions made in Redis, and Redis errors (fallbacks).
    for key in ("limit_decisions_redis", "limit_decisions_local", "redis_errors"):
        out[key] = c1.get(key, 0.0) - c0.get(key, 0.0)
    out["statuses"] = {
        k[len("status_") :]: c1[k] - c0.get(k, 0.0)
        for k in c1
        if k.startswith("status_") and c1[k] - c0.get(k, 0.0) > 0
    }
    return out


def figures(
    target: str,
    scenario: Scenario,
    load: dict[str, Any],
    readings: tuple[Tally, Clock, Clock, Tally],
    peak_kb: int | None,
) -> dict[str, Any]:
    """A phase's figures from its readings (``peak_kb``: None if VmHWM was not reset)."""
    t0, k0, k1, t1 = readings
    answered = t1.counts["answered"] - t0.counts["answered"]
    target_failed = t1.counts["failed"] - t0.counts["failed"]
    per = max(answered, 1.0)
    wall_us = (k1.wall - k0.wall) * 1e6
    cpu = (k1.user_us + k1.sys_us) - (k0.user_us + k0.sys_us)
    standin = k1.standin_us - k0.standin_us
    redis = k1.redis_us - k0.redis_us
    pg, pg_background = _pg_delta(t0.pg, t1.pg), _pg_delta(t0.pg_background, t1.pg_background)
    loadgen = k1.loadgen_us - k0.loadgen_us
    busy, total, steal = (b - a for a, b in zip(k0.machine_us, k1.machine_us, strict=True))
    rps, failed, non2xx = _load_outcome(scenario.mode, load)
    lat = load["latency_us"]
    result: dict[str, Any] = {
        "requests_per_s": rps,
        **{f"{p}_ms": lat[p] / 1000 for p in ("p50", "p95", "p99", "max")},
        "cpu_us_per_request": cpu / per,
        "cpu_user_us_per_request": (k1.user_us - k0.user_us) / per,
        "cpu_sys_us_per_request": (k1.sys_us - k0.sys_us) / per,
        "pg_cpu_us_per_request": pg / per,
        "pg_background_cpu_us_per_request": pg_background / per,
        "standin_cpu_us_per_request": standin / per,
        "redis_cpu_us_per_request": redis / per,
        "loadgen_cpu_us_per_request": loadgen / per,
        "peak_rss_mb": peak_kb / 1024 if peak_kb is not None else math.nan,
        "answered": answered,
        "load": load,
        "load_errors": failed,
        "non_2xx": non2xx,
        "target_failed": target_failed,
        "pg_backends": len(t1.pg),
        "pg_backends_vanished": len([pid for pid in t0.pg if pid not in t1.pg]),
        "machine_busy_cores": busy / wall_us,
        "other_cpu_cores": max(0.0, busy - (cpu + standin + redis + pg + pg_background + loadgen))
        / wall_us,
        "machine_cores_seen": total / wall_us,
        "steal_cores": steal / wall_us,
        "wall_s": wall_us / 1e6,
    }
    if target in ("service", "redis"):
        result.update(_service_figures(t0.counts, t1.counts, per))
    # A failure is what a caller saw: a socket error, a timeout or a non-2xx.
    # The target's own non-2xx count also holds requests the load generator
    # abandoned when its time was up (wrk closes its connections then), so
    # it is reported but does not fail the run.
    result["failed"] = failed
    result["target_non_2xx"] = target_failed
    return result


async def phase(
    stack: Stack,
    target: Target,
    scenario: Scenario,
    seconds: float,
    wrk: str,
    *,
    measure: bool = True,
    load_cpus: set[int] | None = None,
) -> dict[str, Any]:
    """Run one phase; with ``measure``, its failed requests count against the run."""
    await stack.reset_standin(scenario.latency_ms)
    seed = str(random.randrange(1, 1_000_000))
    cmd = load_command(scenario, target.url, stack.data.requests_path, seconds, wrk, seed)
    pid = target.proc.pid
    before = await read_tally(stack, target)
    hwm = procstat.status_kb(pid, "VmHWM") or 0
    target.peak_rss_since_start_kb = max(target.peak_rss_since_start_kb, hwm)
    rss_reset = procstat.reset_peak_rss(pid)
    start = read_clock(stack, target)

    load = await run_load(cmd, load_cpus)
    # Let what is still in flight finish inside the window (the target's
    # counters count it, so CPU and requests stay matched).
    await asyncio.sleep(0.3 + scenario.latency_ms / 1000 * 3)

    end = read_clock(stack, target)
    peak_kb = procstat.status_kb(pid, "VmHWM") or 0
    after = await read_tally(stack, target)
    target.peak_rss_since_start_kb = max(target.peak_rss_since_start_kb, peak_kb)
    readings = (before, start, end, after)
    result = figures(target.name, scenario, load, readings, peak_kb if rss_reset else None)
    if target.name != "floor":
        hot = await stack.round_trip_cpu_us(300)
        paced = await stack.round_trip_cpu_us(100, gap_s=0.005)
        if hot is not None and paced is not None:
            result["pg_round_trip_us"] = hot
            result["pg_round_trip_paced_us"] = paced
    if measure and result["failed"]:
        target.failures.append(
            f"{scenario.key}: {result['failed']} failed requests ({load.get('errors')},"
            f" non-2xx {result['non_2xx']}; target statuses {result.get('statuses', {})})"
        )
    return result
