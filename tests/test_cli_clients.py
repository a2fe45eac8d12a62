"""Service clients through the real CLI (SPEC §4, §5): create, list, revoke, and
what the running service makes of the tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.helpers import created, post_session, problem

REPO = Path(__file__).resolve().parent.parent
TOKEN_PREFIX = "pgw_"
CLI_TIMEOUT = 30


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def clients(database_url: str, *args: str) -> Result:
    """Run ``python -m service clients ARGS`` as an operator would; no Stripe key needed."""
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "clients",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


async def create_token(database_url: str, name: str, *options: str) -> str:
    result = await clients(database_url, "create", name, *options)
    assert result.returncode == 0, result
    return one_line(result.stdout)


async def test_create_prints_the_token_once_and_stores_only_its_hash(
    database_url: str, conn: asyncpg.Connection
) -> None:
    result = await clients(database_url, "create", "billing-frontend")
    assert result.returncode == 0, result
    assert result.stderr == ""
    token = one_line(result.stdout)
    assert result.stdout == token + "\n"  # alone, so `$(portal-gateway clients create x)` works
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) - len(TOKEN_PREFIX) >= 43  # 256 bits in URL-safe base64

    row = await conn.fetchrow("SELECT * FROM api_clients WHERE name = 'billing-frontend'")
    assert row is not None
    assert bytes(row["token_hash"]) == hashlib.sha256(token.encode()).digest()
    for column, value in dict(row).items():
        text = value.hex() if isinstance(value, bytes) else str(value)
        assert token not in text, column
        assert token[len(TOKEN_PREFIX) :] not in text, column
    # SPEC §4 defaults.
    assert list(row["scopes"]) == ["portal_sessions:create"]
    assert row["rate_limit_per_minute"] == 600
    assert row["revoked_at"] is None

    again = await clients(database_url, "create", "billing-frontend")
    assert again.returncode == 1
    assert again.stdout == ""  # no token that would not work
    assert "billing-frontend" in one_line(again.stderr)
    # The first client is untouched.
    assert await conn.fetchval("SELECT count(*) FROM api_clients") == 1
    stored = await conn.fetchval("SELECT token_hash FROM api_clients")
    assert bytes(stored) == hashlib.sha256(token.encode()).digest()


@pytest.mark.usefixtures("world")
async def test_scopes_and_rate_limit_are_stored_listed_and_enforced(
    database_url: str, conn: asyncpg.Connection, make_service: Any
) -> None:
    token = await create_token(
        database_url,
        "reports",
        "--scope",
        "mappings:write",
        "--scope",
        "mappings:read",
        "--rate-limit",
        "42",
    )
    row = await conn.fetchrow(
        "SELECT scopes, rate_limit_per_minute FROM api_clients WHERE name = 'reports'"
    )
    assert row is not None
    assert list(row["scopes"]) == ["mappings:write", "mappings:read"]
    assert row["rate_limit_per_minute"] == 42

    listed = await clients(database_url, "list")
    assert listed.returncode == 0, listed
    line = one_line(listed.stdout)
    assert line.split("\t")[0] == "reports"
    assert "mappings:write,mappings:read" in line
    assert "42" in line
    assert "active" in line
    assert token not in listed.stdout + listed.stderr
    assert token[len(TOKEN_PREFIX) :] not in listed.stdout

    # Without portal_sessions:create the token authenticates but may not open sessions.
    service = await make_service()
    await problem(
        await post_session(service, {"user_id": "u_42"}, token), 403, "insufficient_scope"
    )


async def test_an_unknown_scope_is_a_one_line_usage_error(
    database_url: str, conn: asyncpg.Connection
) -> None:
    result = await clients(
        database_url, "create", "typo", "--scope", "mappings:read", "--scope", "mapping:write"
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert "'mapping:write'" in line
    assert "portal_sessions:create, mappings:write, mappings:read" in line
    assert await conn.fetchval("SELECT count(*) FROM api_clients") == 0


@pytest.mark.usefixtures("world")
async def test_revoked_token_is_refused_on_the_very_next_request(
    database_url: str, conn: asyncpg.Connection, make_service: Any
) -> None:
    token, unknown = await asyncio.gather(
        create_token(database_url, "billing-frontend"),
        clients(database_url, "revoke", "no-such-client"),
    )
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert "no-such-client" in one_line(unknown.stderr)

    service = await make_service()
    body = await created(await post_session(service, {"user_id": "u_42"}, token))
    assert body["user_id"] == "u_42"

    revoked = await clients(database_url, "revoke", "billing-frontend")
    assert revoked.returncode == 0, revoked
    assert revoked.stdout == ""
    assert revoked.stderr == ""

    # No grace period: the very next request is refused, like a bad token (the token
    # came from the cache; the resolving statement itself found it revoked).
    refused = await problem(
        await post_session(service, {"user_id": "u_42"}, token), 401, "unauthenticated"
    )
    assert "revoked" not in refused["detail"].lower()  # never says which
    assert await conn.fetchval(
        "SELECT revoked_at IS NOT NULL FROM api_clients WHERE name = 'billing-frontend'"
    )

    # Revoking twice is an error, not a silent success.
    twice = await clients(database_url, "revoke", "billing-frontend")
    assert twice.returncode == 1
    one_line(twice.stderr)
