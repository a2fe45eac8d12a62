"""Request heads (SPEC §2, §5): a tracing header never fails a request, and a head the
HTTP parser refuses still gets a problem+json 400 with a request id."""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from service.logs import tee
from service.schemas import ProblemSchema
from tests.helpers import created, metric_value, post_session, problem

pytestmark = pytest.mark.usefixtures("world")

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


async def test_an_invalid_request_id_is_replaced_not_refused(
    service: TestClient[Any, Any], token: str
) -> None:
    for incoming in ["bad id with spaces", "x" * 129, "semi;colon", ""]:
        resp = await post_session(service, {"user_id": "u_42"}, token, {"X-Request-ID": incoming})
        await created(resp)
        assert GENERATED_ID.fullmatch(resp.headers["X-Request-ID"]), incoming
    resp = await post_session(service, {"user_id": "u_42"}, token, {"X-Request-ID": "trace-1:a.b"})
    await created(resp)
    assert resp.headers["X-Request-ID"] == "trace-1:a.b"


async def test_a_header_over_the_parser_limit_is_problem_json(
    service: TestClient[Any, Any], token: str
) -> None:
    with tee(log := io.StringIO()):
        resp = await post_session(
            service, {"user_id": "u_42"}, token, {"X-Padding": "Z" * 20 * 1024}
        )
        body = await problem(resp, 400, "header_too_large")
    assert GENERATED_ID.fullmatch(body["request_id"])
    assert "ZZZZZZZZ" not in log.getvalue()  # the oversized value is not logged
    lines = [orjson.loads(line) for line in log.getvalue().splitlines()]
    (access,) = [line for line in lines if line.get("logger") == "access"]
    assert access["status"] == 400
    assert access["error_code"] == "header_too_large"
    assert access["request_id"] == body["request_id"]
    assert [line for line in lines if line["level"] == "error"] == []
    refused = {"method": "other", "route": "unmatched", "status": "400"}
    assert await metric_value(service, "portal_gateway_http_requests_total", **refused) == 1


async def _raw(service: TestClient[Any, Any], head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` as is; the status, headers and body of the answer (read to the close)."""
    reader, writer = await asyncio.open_connection(service.host, service.port)
    try:
        writer.write(head)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 15)  # the parser's answer closes
    finally:
        writer.close()
    head_part, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_part.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("head", "code"),
    [
        # More header fields than the parser takes.
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
            + b"\r\n",
            "header_too_large",
        ),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "header_too_large"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", "invalid_header"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x01Name: v\r\n\r\n", "invalid_header"),
    ],
    ids=["too-many-headers", "request-line-too-long", "no-colon", "control-character"],
)
async def test_a_head_the_parser_refuses_is_problem_json(
    service: TestClient[Any, Any], head: bytes, code: str
) -> None:
    status, headers, body = await _raw(service, head)
    assert status == 400, body
    assert headers["content-type"].startswith("application/problem+json")
    problem_doc = orjson.loads(body)
    assert ProblemSchema().validate(problem_doc) == {}
    assert problem_doc["code"] == code
    assert problem_doc["request_id"] == headers["x-request-id"]


async def test_the_service_answers_after_a_refused_head(
    service: TestClient[Any, Any], token: str
) -> None:
    await _raw(service, b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")
    await created(await post_session(service, {"user_id": "u_42"}, token))
