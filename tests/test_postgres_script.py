"""scripts/postgres.sh: which PostgreSQL server `make run/test/bench` use (SPEC §9).

The rule: DATABASE_URL, else the local server if it takes a passwordless login,
else a throwaway cluster. These tests run the real script against real
servers. They never touch the machine's own cluster: the "local server" of the
throwaway cases is a dead port or a password-only cluster started here, and
every throwaway cluster lives in a temporary folder on a free port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "postgres.sh"
MACHINE_LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Bounds for one call of the script: creating and starting a cluster takes
# about a second here; the rest is a psql round trip.
START_TIMEOUT = 45
CALL_TIMEOUT = 15

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")


def _bindir() -> str | None:
    """Folder of the installed server binaries, found the way the script does."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()],
    )
    if found:
        return os.path.dirname(found[-1])
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and os.access(os.path.join(out.stdout.strip(), "initdb"), os.X_OK):
            return out.stdout.strip()
    return None


# Installing PostgreSQL is the script's job on a fresh machine, not a test's.
needs_server_binaries = pytest.mark.skipif(
    _bindir() is None, reason="no PostgreSQL server binaries installed"
)


def _env(**overrides: str) -> dict[str, str]:
    """This process's environment without anything that picks a server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(overrides)
    return env


def _run(
    *args: str, env: dict[str, str], timeout: float = CALL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _psql(url: str, sql: str, **env: str) -> subprocess.CompletedProcess[str]:
    """psql -w: succeeds only if the URL works without typing a password."""
    return subprocess.run(
        ["psql", "-X", "-w", "-A", "-t", "-c", sql, url],
        env=_env(PGCONNECT_TIMEOUT="3", **env),
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT,
        check=False,
    )


def _answers(url: str) -> bool:
    return _psql(url, "select 1").returncode == 0


def _free_port() -> int:
    """A port nothing listens on (the kernel's pick, so free right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_leftover(base: Path) -> None:
    """Safety net when `stop` failed: leave no server behind."""
    pidfile = base / "data" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(pidfile.read_text().splitlines()[0]), signal.SIGQUIT)


@pytest.fixture
def throwaway_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment in which nothing answers on the "local" URL, with the
    throwaway cluster in a temporary folder; stops and removes it afterwards.

    As root, tmp_path sits in a 0700 folder the postgres user cannot enter, so
    this also exercises the script's fallback folder under /tmp.
    """
    pg_dir = tmp_path / "pg"
    env = _env(
        PG_LOCAL_URL=f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres",
        PG_THROWAWAY_DIR=str(pg_dir),
        PG_THROWAWAY_PORT=str(_free_port()),
    )
    try:
        yield env
    finally:
        location = pg_dir / "location"
        base = Path(location.read_text().strip()) if location.exists() else pg_dir
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run("stop", env=env)
        _kill_leftover(base)
        if base != pg_dir:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder every user can enter (tmp_path's parents are 0700 as root)."""
    path = Path(tempfile.mkdtemp(prefix="pgs-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def password_only_server(reachable_dir: Path) -> Iterator[str]:
    """A cluster of our own that demands a password (scram) on 127.0.0.1,
    standing in for a 5432 that refuses passwordless logins. Yields its URL."""
    bindir = _bindir()
    assert bindir is not None
    base = reachable_dir / "scram"
    base.mkdir()
    (base / "pw").write_text("s3cret\n")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        pg = pwd.getpwnam("postgres")
        for p in (base, base / "pw"):
            os.chown(p, pg.pw_uid, pg.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()

    def pg(*cmd: str, timeout: float = START_TIMEOUT) -> None:
        subprocess.run([*prefix, *cmd], cwd="/", capture_output=True, timeout=timeout, check=True)

    pg(
        f"{bindir}/initdb",
        *("-D", str(data), "-U", "postgres", "--auth=scram-sha-256"),
        *(f"--pwfile={base / 'pw'}", "--locale=C", "--encoding=UTF8"),
    )
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    pg(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "-o", opts, "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            pg(f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        _kill_leftover(base)


def test_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    if shutil.which("shellcheck"):
        out = subprocess.run(
            ["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stdout


def test_unknown_command_is_a_usage_error() -> None:
    out = _run("frobnicate", env=_env())
    assert out.returncode == 2
    assert out.stdout == ""
    assert "usage" in out.stderr


def test_local_server_is_used_when_it_takes_a_passwordless_login(tmp_path: Path) -> None:
    if not _answers(MACHINE_LOCAL_URL):
        pytest.skip("no passwordless PostgreSQL on 127.0.0.1:5432 here")
    env = _env(PG_THROWAWAY_DIR=str(tmp_path / "pg"))
    started = time.monotonic()
    out = _run("url", env=env)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert out.stdout == MACHINE_LOCAL_URL + "\n"
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert not (tmp_path / "pg").exists()  # no throwaway cluster made
    status = _run("status", env=env)
    assert status.returncode == 0
    assert status.stdout.startswith("local server")


@needs_server_binaries
def test_throwaway_cluster_when_nothing_answers(throwaway_env: dict[str, str]) -> None:
    env = throwaway_env
    port = env["PG_THROWAWAY_PORT"]

    out = _run("url", env=env, timeout=START_TIMEOUT)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert out.stdout == f"postgresql://postgres@127.0.0.1:{port}/postgres\n"
    assert _psql(url, "select 1").stdout.strip() == "1"
    # The role must be able to create the test and demo databases.
    assert _psql(url, "create database pgs_probe").returncode == 0
    assert _psql(url, "drop database pgs_probe").returncode == 0

    # Idempotent and fast once it runs.
    started = time.monotonic()
    again = _run("url", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == url
    assert time.monotonic() - started < 1.5
    assert "creating" not in again.stderr
    assert "starting" not in again.stderr

    status = _run("status", env=env)
    assert status.returncode == 0
    assert status.stdout.startswith(f"throwaway cluster {url}, running")

    # DATABASE_URL wins, printed unchanged, even naming a database not made yet.
    db_url = url.removesuffix("/postgres") + "/not_created_yet?application_name=pgs"
    echoed = _run("url", env={**env, "DATABASE_URL": db_url})
    assert echoed.returncode == 0, echoed.stderr
    assert echoed.stdout == db_url + "\n"

    stopped = _run("stop", env=env, timeout=START_TIMEOUT)
    assert stopped.returncode == 0, stopped.stderr
    assert not _answers(url)
    assert "not running" in _run("status", env=env).stdout
    assert _run("stop", env=env).returncode == 0  # a second stop is a no-op

    # The next call starts the same cluster again rather than making a new one.
    restarted = _run("url", env=env, timeout=START_TIMEOUT)
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.strip() == url
    assert "creating" not in restarted.stderr
    assert _answers(url)


@needs_server_binaries
def test_throwaway_cluster_when_local_server_demands_a_password(
    password_only_server: str, reachable_dir: Path
) -> None:
    # The stand-in for 5432 is up and refuses a passwordless login.
    refused = _psql(password_only_server, "select 1")
    assert refused.returncode != 0
    assert "password" in refused.stderr
    assert _psql(password_only_server, "select 1", PGPASSWORD="s3cret").returncode == 0

    pg_dir = reachable_dir / "throwaway"
    env = _env(
        PG_LOCAL_URL=password_only_server,
        PG_THROWAWAY_DIR=str(pg_dir),
        PG_THROWAWAY_PORT=str(_free_port()),
        # A password in the environment must not count as "passwordless":
        # the printed URL carries none.
        PGPASSWORD="s3cret",
    )
    try:
        out = _run("url", env=env, timeout=START_TIMEOUT)
        assert out.returncode == 0, out.stderr
        url = out.stdout.strip()
        assert url == f"postgresql://postgres@127.0.0.1:{env['PG_THROWAWAY_PORT']}/postgres"
        assert _answers(url)
        # Reachable by the postgres user: the cluster lives right there.
        assert not (pg_dir / "location").exists()
        assert (pg_dir / "data" / "PG_VERSION").exists()
        assert _run("stop", env=env, timeout=START_TIMEOUT).returncode == 0
        assert not _answers(url)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run("stop", env=env)
        _kill_leftover(pg_dir)


def test_database_url_that_does_not_answer_fails_clearly(tmp_path: Path) -> None:
    dead = f"postgresql://app:hunter2@127.0.0.1:{_free_port()}/portal_gateway"
    env = _env(DATABASE_URL=dead, PG_THROWAWAY_DIR=str(tmp_path / "pg"))
    out = _run("url", env=env)
    assert out.returncode != 0
    assert out.stdout == ""
    assert "DATABASE_URL" in out.stderr
    assert "hunter2" not in out.stderr  # never echo a password
    assert not (tmp_path / "pg").exists()  # no fallback behind the user's back


def test_stop_without_a_throwaway_cluster_is_a_no_op(tmp_path: Path) -> None:
    out = _run("stop", env=_env(PG_THROWAWAY_DIR=str(tmp_path / "pg")))
    assert out.returncode == 0
    assert out.stdout == ""
