"""``make run`` (``portal-gateway demo``, a real process): its printed commands work as printed.

The demo migrates and seeds the database, starts the Stripe stand-in and the
service, and prints ready-to-paste curls (SPEC §9, §11, §12): a portal session
for the demo user with the ``pro`` profile of ``deploy/profiles.example.yaml``
(which the demo applies to the stand-in); then, for the second demo user,
linking the stand-in's second customer through the mapping API, reading the
mapping back, and a subscription flow on the subscription the link backfilled.
Each printed command is parsed as a shell would and sent as curl would send it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REPO = Path(__file__).resolve().parent.parent
READY_LINE = "Ctrl-C stops the service and the Stripe stand-in."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _commands(printed: str) -> list[list[str]]:
    """Every curl of the printed text, split as a shell would (continuations joined)."""
    joined = printed.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("curl ")]


async def _as_curl(session: aiohttp.ClientSession, argv: list[str]) -> tuple[int, Any]:
    """Send what ``curl -sS -X M URL -H … -d …`` sends."""
    assert argv[:3] == ["curl", "-sS", "-X"]
    method, url = argv[3], argv[4]
    headers: dict[str, str] = {}
    data: str | None = None
    rest = iter(argv[5:])
    for flag in rest:
        value = next(rest)
        if flag == "-H":
            name, _, header = value.partition(": ")
            headers[name] = header
        else:
            assert flag == "-d", flag
            data = value
    async with session.request(method, url, headers=headers, data=data) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def demo(database_url: str) -> Any:
    port, standin_port = _free_port(), _free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "demo",
        "--port",
        str(port),
        "--standin-port",
        str(standin_port),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(60):
            while READY_LINE not in printed:
                line = await proc.stdout.readline()
                assert line, f"the demo ended early: {printed}"
                printed.append(line.decode().rstrip("\n"))
        yield "\n".join(printed)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0


async def test_the_printed_commands_work(demo: str) -> None:
    session_cmd, put_cmd, get_cmd, second_session_cmd, link_cmd = _commands(demo)
    # A profile of deploy/profiles.example.yaml, applied to the stand-in at start (SPEC §12).
    assert json.loads(session_cmd[-1])["portal"] == "pro"
    async with aiohttp.ClientSession() as session:
        status, body = await _as_curl(session, session_cmd)
        assert status == 201, body
        # The stand-in's own portal page: a browser can open it (SPEC §9).
        assert re.match(r"http://127\.0\.0\.1:\d+/p/session/", body["url"]), body["url"]

        # The second demo user: linked through the API, its subscription backfilled.
        assert put_cmd[3] == "PUT"
        assert put_cmd[4].endswith("/v1/users/demo-user-2/customer")
        status, body = await _as_curl(session, put_cmd)
        assert status in (200, 201), body  # 201 the first time on a database
        status, body = await _as_curl(session, get_cmd)
        assert status == 200, body
        assert [s["stripe_subscription_id"] for s in body["subscriptions"]] == ["sub_demo0002"]

        status, body = await _as_curl(session, second_session_cmd)
        assert status == 201, body
        assert body["flow"] == "subscription_cancel"

        # The portal link printed to paste into a browser (SPEC §13), and the curl
        # that makes another.
        (link,) = [line.strip() for line in demo.splitlines() if "/v1/portal-links/" in line]
        async with session.get(link) as page:
            assert page.status == 200
            assert "text/html" in page.headers["Content-Type"]
        async with session.post(link, allow_redirects=False) as opened:
            assert opened.status == 303, await opened.text()
            portal = opened.headers["Location"]
        async with session.get(portal) as shown:  # the stand-in's portal page
            assert shown.status == 200, portal
        async with session.post(link, allow_redirects=False) as again:
            assert again.status == 410
        status, body = await _as_curl(session, link_cmd)
        assert status == 201, body
        assert body["url"].startswith(link.rsplit("/", 1)[0] + "/")
