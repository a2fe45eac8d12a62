"""Small helpers shared by the test modules."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from service.schemas import PortalSessionSchema, ProblemSchema

PATH = "/v1/portal-sessions"


async def post_session(
    client: TestClient[Any, Any],
    body: Any,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> ClientResponse:
    """POST /v1/portal-sessions with a bearer token and a JSON body."""
    all_headers = {"Content-Type": "application/json"}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    data = body if isinstance(body, bytes | str) else orjson.dumps(body)
    return await client.post(PATH, data=data, headers=all_headers)


async def created(resp: ClientResponse) -> dict[str, Any]:
    """Assert a 201 with the documented body and headers; return the body."""
    text = await resp.text()
    assert resp.status == 201, text
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers.get("X-Request-ID")
    body: dict[str, Any] = await resp.json()
    assert PortalSessionSchema().validate(body) == {}, body
    assert body["url"].startswith("https://billing.stripe.com/p/session/")
    assert body["id"].startswith("bps_")
    return body


async def problem(resp: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """Assert a problem+json error with this status and code; return the body."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.headers["Content-Type"].startswith("application/problem+json"), text
    body: dict[str, Any] = await resp.json()
    assert ProblemSchema().validate(body) == {}, body
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body
