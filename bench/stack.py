"""The processes of a ``make bench`` run, and what the run asks of them.

The Stripe stand-in, the service (``portal-gateway serve``) and the floor
(``floor.py``), each started by ``harness`` on a free port; for the Redis
phase (SPEC §14) a throwaway ``redis-server`` and a second service, target
``redis``, configured with ``REDIS_URL`` (when redis-server is installed); one monitoring
connection to Postgres, to another database than the bench one, that finds
the bench database's backends; and the check that the floor sends Stripe the
same thing as the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

import dataset
import harness
import procstat
from harness import ROUTE, log


def service_counts(metrics: str) -> dict[str, float]:
    """From the service's /metrics: requests answered (all, failed, by status)
    and DB queries by name (``db_<query>``)."""
    out: dict[str, float] = {"answered": 0.0, "failed": 0.0}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "portal_gateway_rate_limit_decisions_total":
                key = f"limit_decisions_{labels.get('backend')}"
                out[key] = out.get(key, 0.0) + sample.value
            elif sample.name == "portal_gateway_redis_errors_total":
                out["redis_errors"] = out.get("redis_errors", 0.0) + sample.value
            elif (
                sample.name == "portal_gateway_http_requests_total" and labels.get("route") == ROUTE
            ):
                out["answered"] += sample.value
                if not labels.get("status", "").startswith("2"):
                    out["failed"] += sample.value
                out[f"status_{labels.get('status')}"] = sample.value
            elif sample.name == "portal_gateway_db_query_duration_seconds_count":
                out[f"db_{labels.get('query')}"] = sample.value
    return out


@dataclass
class Target:
    name: str  # "service", "floor", or "redis" (the service with REDIS_URL)
    proc: harness.Proc
    url: str
    peak_rss_since_start_kb: int = 0
    failures: list[str] = field(default_factory=list)

    async def counts(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """Requests answered so far (see :func:`service_counts`; the floor has
        only answered and failed)."""
        if self.name == "floor":
            async with session.get(self.url + "/_count") as resp:
                body = await resp.json()
            return {"answered": body["answered"] + body["failed"], "failed": body["failed"]}
        async with session.get(self.url + "/metrics") as resp:
            return service_counts(await resp.text())


@dataclass
class Stack:
    data: harness.Data
    database: str
    standin: harness.Proc
    standin_url: str
    targets: dict[str, Target]
    session: aiohttp.ClientSession
    monitor: asyncpg.Connection
    unreadable_pg: set[int] = field(default_factory=set)
    # The Redis phase's server (None: redis-server is not installed).
    redis: harness.Proc | None = None

    async def reset_standin(self, latency_ms: float) -> None:
        """Forget recorded requests and stored idempotent answers (they grow
        without bound), then set the latency."""
        await harness.standin_control(self.standin_url, "POST", "/_standin/reset")
        await harness.standin_control(
            self.standin_url, "POST", "/_standin/latency", {"ms": latency_ms}
        )

    async def recorded(self) -> Any:
        """The requests the stand-in received since its last reset."""
        return await harness.standin_control(self.standin_url, "GET", "/_standin/requests")

    async def backend_pids(self) -> list[int]:
        return await harness.backend_pids(self.monitor, self.database)

    async def pg_cpu(self, *, background: bool = False) -> dict[int, float]:
        """CPU so far (µs) of the bench database's client backends (or of the
        server's background processes: WAL writer, checkpointer, autovacuum)."""
        if background:
            pids = await harness.background_pids(self.monitor)
        else:
            pids = await self.backend_pids()
        out: dict[int, float] = {}
        for pid in pids:
            value = procstat.cpu_us(pid)
            if value is None:
                self.unreadable_pg.add(pid)
            else:
                out[pid] = value
        return out

    async def round_trip_cpu_us(self, repeats: int, gap_s: float = 0.0) -> float | None:
        """Backend CPU (µs) of a bare ``SELECT 1`` now, on the monitoring connection,
        back to back or ``gap_s`` apart (an idle backend woken each time, as in the
        open loop): what a round trip costs this machine at the moment, next to each
        phase's Postgres CPU (it moves with the VM, and the figures with it)."""
        pid = await self.monitor.fetchval("SELECT pg_backend_pid()")
        before = procstat.oncpu_ns(pid)
        for _ in range(repeats):
            await self.monitor.fetchval("SELECT 1")
            if gap_s:
                await asyncio.sleep(gap_s)
        after = procstat.oncpu_ns(pid)
        if before is None or after is None:
            return None
        return (after - before) / repeats / 1000

    async def post(self, target: Target, token: str, body: bytes) -> tuple[int, str]:
        """One request of the pool to ``target``: (status, response body)."""
        async with self.session.post(
            target.url + ROUTE, data=body, headers=harness.request_headers(token)
        ) as resp:
            return resp.status, await resp.text()


@contextlib.asynccontextmanager
async def running(data: harness.Data, database: str) -> AsyncIterator[Stack]:
    """Start the stand-in, the service and the floor; stop them (by pid) on exit."""
    procs: list[harness.Proc] = []
    try:
        standin_port = harness.free_port()
        standin_url = f"http://127.0.0.1:{standin_port}"
        standin = harness.start("standin", harness.standin_cmd(standin_port, 0))
        procs.append(standin)
        await harness.wait_http(standin, standin_url + "/_standin/health", 30)
        service_port, floor_port = harness.free_port(), harness.free_port()
        env = harness.service_env(data, service_port, standin_port)
        service = harness.start("service", harness.service_cmd(), env)
        procs.append(service)
        floor = harness.start("floor", harness.floor_cmd(floor_port, standin_port))
        procs.append(floor)
        targets = {
            "service": Target("service", service, f"http://127.0.0.1:{service_port}"),
            "floor": Target("floor", floor, f"http://127.0.0.1:{floor_port}"),
        }
        redis = await _start_redis_target(data, standin_port, targets, procs)
        await harness.wait_http(service, targets["service"].url + "/readyz", 60)
        await harness.wait_http(floor, targets["floor"].url + "/healthz", 60)
        if "redis" in targets:
            await harness.wait_http(targets["redis"].proc, targets["redis"].url + "/readyz", 60)
        monitor_url = harness.with_database(harness.server_url(), "postgres")
        async with aiohttp.ClientSession() as session:
            monitor = await asyncpg.connect(monitor_url, timeout=10)
            try:
                yield Stack(
                    data, database, standin, standin_url, targets, session, monitor, redis=redis
                )
            finally:
                await monitor.close()
    finally:
        for proc in reversed(procs):
            code = proc.stop()
            if code not in (0, -signal.SIGTERM):
                log(f"{proc.name} exited with {code}; log: {proc.log_path}")


async def _start_redis_target(
    data: harness.Data, standin_port: int, targets: dict[str, Target], procs: list[harness.Proc]
) -> harness.Proc | None:
    """redis-server and the service configured with it (target ``redis``), or None."""
    redis_port = harness.free_port()
    cmd = harness.redis_cmd(redis_port)
    if cmd is None:
        log("redis-server is not installed: no Redis phase")
        return None
    redis = harness.start("redis", cmd)
    procs.append(redis)
    await harness.wait_redis(redis, redis_port, 30)
    port = harness.free_port()
    env = {**harness.service_env(data, port, standin_port), **harness.redis_env(redis_port)}
    service = harness.start("service-redis", harness.service_cmd(), env)
    procs.append(service)
    targets["redis"] = Target("redis", service, f"http://127.0.0.1:{port}")
    return redis


async def parity_check(stack: Stack, samples: int = 60) -> dict[str, Any]:
    """Send the same requests to both: Stripe must receive the same form
    params (in any order) and the same set of headers."""
    pool = dataset.read_requests(stack.data.requests_path)[:samples]
    params: dict[str, list[list[list[str]]]] = {}
    headers: dict[str, set[str]] = {}
    for name in ("service", "floor"):
        target = stack.targets[name]
        await stack.reset_standin(0)
        for token, body in pool:
            status, text = await stack.post(target, token, body)
            if status != 201:
                raise RuntimeError(f"{name}: {status} {text}")
        recorded = await stack.recorded()
        params[name] = [sorted(r["raw"]) for r in recorded]
        headers[name] = {k.lower() for r in recorded for k in r["headers"]}
    for i, (a, b) in enumerate(zip(params["service"], params["floor"], strict=True)):
        if a != b:
            raise RuntimeError(
                f"the floor sends other params than the service (request {i}):\n"
                f"  service: {a}\n  floor:   {b}"
            )
    if headers["service"] != headers["floor"]:
        raise RuntimeError(
            f"the floor sends other headers: {sorted(headers['service'] ^ headers['floor'])}"
        )
    return {"requests": len(pool), "identical_params": True, "headers": sorted(headers["floor"])}
