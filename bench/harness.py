"""What ``run.py`` and ``instr.py`` share: Postgres, the data, and the processes.

Everything listens on 127.0.0.1 on free ports. Every process is started in
its own session and stopped by its own pid (SIGTERM, then SIGKILL after a
grace period): nothing else on the machine is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import redis.asyncio

import dataset
import scheme

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
RESULTS = BENCH / "results"
VENV_BIN = Path(sys.executable).parent
PYTHON = sys.executable
STRIPE_KEY = "sk_test_bench_0123456789abcdefghij"
DEFAULT_DATABASE = "portal_gateway_bench"
ROUTE = "/v1/portal-sessions"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None


# --- Postgres ------------------------------------------------------------


def server_url() -> str:
    """The server ``scripts/postgres.sh url`` picks (DATABASE_URL, local, or throwaway)."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "postgres.sh"), "url"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def recreate_database(server: str, name: str) -> str:
    """Drop and create the bench database; return its URL."""
    conn = await asyncpg.connect(with_database(server, "postgres"), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server, name)


def migrate(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    subprocess.run(
        [str(VENV_BIN / "portal-gateway"), "migrate"],
        check=True,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


@dataclass
class Data:
    database_url: str
    users: int
    credentials: dataset.Credentials
    requests_path: Path
    jwts: int
    mix: dict[str, int]
    load_seconds: float


async def prepare_data(*, database: str, users: int, jwts: int, pool_size: int, seed: int) -> Data:
    """A fresh migrated database with ``users`` mappings, and the request pool."""
    WORK.mkdir(parents=True, exist_ok=True)
    server = server_url()
    url = await recreate_database(server, database)
    migrate(url)
    started = time.perf_counter()
    conn = await asyncpg.connect(url, timeout=10)
    try:
        credentials = await dataset.load(conn, users)
    finally:
        await conn.close()
    load_seconds = time.perf_counter() - started
    rng = random.Random(seed)
    tokens = dataset.make_jwts(credentials.jwt_secret, users, jwts, rng)
    path = WORK / "requests.tsv"
    mix = dataset.write_requests(
        path,
        users=users,
        client_token=credentials.client_token,
        jwts=tokens,
        count=pool_size,
        rng=rng,
    )
    return Data(url, users, credentials, path, len(tokens), mix, load_seconds)


async def backend_pids(monitor: asyncpg.Connection, database: str) -> list[int]:
    """Client backends connected to ``database`` (not the monitoring connection)."""
    rows = await monitor.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        database,
    )
    return [row["pid"] for row in rows]


async def background_pids(monitor: asyncpg.Connection) -> list[int]:
    """The server's background processes (WAL writer, checkpointer, autovacuum...)."""
    rows = await monitor.fetch(
        "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'"
    )
    return [row["pid"] for row in rows]


# --- processes -------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM this process (only it), wait, then SIGKILL it."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start(name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> Proc:
    """Start ``cmd`` with stdout+stderr to ``.work/<name>.log``."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{name}.log"
    out = path.open("wb")
    popen = subprocess.Popen(
        list(cmd),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        start_new_session=True,  # a Ctrl-C of make reaches us, not them: we stop them
    )
    return Proc(name, popen, path, out)


async def wait_http(proc: Proc, url: str, timeout: float) -> None:
    """Until ``url`` answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not answer {url} in {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def wait_redis(proc: Proc, port: int, timeout: float) -> None:
    """Until redis-server answers PING; fail early if it died."""
    deadline = time.monotonic() + timeout
    client = redis.asyncio.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            with contextlib.suppress(redis.RedisError, OSError):
                if await client.ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not answer PING in {timeout:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


def standin_cmd(port: int, latency_ms: float) -> list[str]:
    return [PYTHON, "-m", "stripe_standin", "--port", str(port), "--latency-ms", str(latency_ms)]


def service_env(data: Data, port: int, standin_port: int) -> dict[str, str]:
    """Production settings; limits high enough never to trigger."""
    return {
        "DATABASE_URL": data.database_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STRIPE_API_KEY": STRIPE_KEY,
        "STRIPE_API_BASE": f"http://127.0.0.1:{standin_port}",
        "RETURN_URL_ALLOWLIST": scheme.RETURN_ORIGIN,
        "JWT_HS256_SECRET": data.credentials.jwt_secret,
        "JWT_ALGORITHMS": "HS256",
        "JWT_ISSUER": scheme.JWT_ISSUER,
        "JWT_AUDIENCE": scheme.JWT_AUDIENCE,
        "END_USER_RATE_LIMIT_PER_MINUTE": "1000000",
        "MAX_IN_FLIGHT": "10000",
        # Pool matched to the load. A closed loop at c=200 runs the service past
        # its capacity with nothing shed, so requests queue for the event loop
        # and a pooled connection; with the 1.5 s default bound a few of them
        # (1 in ~10,000) were refused as database_unavailable. The bound is for
        # outages, not for queueing, so the bench gives it room.
        "DB_POOL_MIN_SIZE": "10",
        "DB_POOL_MAX_SIZE": "40",
        "DB_TIMEOUT_SECONDS": "5",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }


def redis_cmd(port: int) -> list[str] | None:
    """A throwaway redis-server for the Redis phase (SPEC §14): nothing on disk.
    None when redis-server is not installed (the phase is then left out)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def redis_env(redis_port: int) -> dict[str, str]:
    """The service with REDIS_URL: rate limits in Redis, and the Stripe budget on
    (through Redis too) but far above any rate here, so it costs its round trip
    and never throttles."""
    return {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "STRIPE_MAX_REQUESTS_PER_SECOND": "10000",
    }


def service_cmd() -> list[str]:
    return [str(VENV_BIN / "portal-gateway"), "serve"]


def floor_cmd(port: int, standin_port: int) -> list[str]:
    return [
        PYTHON,
        str(BENCH / "floor.py"),
        "--port",
        str(port),
        "--upstream",
        f"http://127.0.0.1:{standin_port}",
        "--api-key",
        STRIPE_KEY,
    ]


def request_headers(token: str) -> dict[str, str]:
    """The headers of one ``POST ROUTE`` of the request pool."""
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


async def standin_control(base: str, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, json=body) as resp,
    ):
        resp.raise_for_status()
        return await resp.json()
