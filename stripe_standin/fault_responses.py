"""What each scripted :class:`~stripe_standin.faults.Fault` does on the wire.

Stripe-shaped error statuses, an HTML page from a "proxy", a body with the
wrong ``object``, truncated bodies (half the JSON, or a short read against
``Content-Length``), requests that hang until the client gives up, and
connections reset with a TCP RST.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any, cast

from aiohttp import web

from .faults import Fault
from .responses import current_request_id, dumps, json_response
from .state import StandinState
from .stripe_errors import error_body_for

__all__ = ["fault_response"]

# How often a hanging request looks whether its client has given up.
_HANG_POLL_SECONDS = 0.02

_HTML_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    "<body><h1>502 Bad Gateway</h1><p>The proxy could not reach the upstream.</p></body>"
    "</html>\n"
)


async def fault_response(
    request: web.Request,
    state: StandinState,
    fault: Fault,
    fake_body: Callable[[], dict[str, Any]],
    api_headers: Mapping[str, str],
) -> web.StreamResponse | None:
    """The response a fault gives, or None to answer normally (latency only).

    ``fake_body`` makes the body a wrong_object/truncated fault distorts;
    ``api_headers`` are the headers every API answer carries, sent here only
    when the response is streamed (prepared before the caller could add them).
    """
    if fault.kind == "latency":
        return None
    if fault.kind == "status":
        status = cast(int, fault.status)
        body = fault.body
        if body is None:
            body = error_body_for(status, fault.code, current_request_id.get())
        return json_response(body, status, fault.headers)
    if fault.kind == "hang":
        await _hang(request, state)
        return web.Response(status=504)  # goes nowhere: the connection is gone
    if fault.kind == "reset":
        _reset(request)
        return web.Response(status=502)  # goes nowhere: the connection is gone
    status = fault.status or 200
    if fault.kind == "non_json":
        return web.Response(
            text=_HTML_ERROR_PAGE,
            status=status,
            content_type="text/html",
            headers=fault.headers,
        )
    body_obj = fake_body()
    if fault.kind == "wrong_object":
        return json_response({**body_obj, "object": fault.wrong_object}, status, fault.headers)
    payload = dumps(body_obj).encode()
    cut = payload[: len(payload) // 2]
    if fault.truncated == "json":
        # A complete HTTP response whose JSON stops half way.
        return web.Response(
            body=cut,
            status=status,
            content_type="application/json",
            charset="utf-8",
            headers=fault.headers,
        )
    # Promise the whole body, send half, then close: the client sees a short read.
    response = web.StreamResponse(status=status, headers={**api_headers, **fault.headers})
    response.content_type = "application/json"
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(cut)
    transport = request.transport
    if transport is not None:
        transport.close()  # close() (not abort()) so the half body is flushed first
    return response


async def _hang(request: web.Request, state: StandinState) -> None:
    """Answer nothing until the client gives up (or the server stops)."""
    while not state.closing.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await state.pause(_HANG_POLL_SECONDS)
    # Shutting down with the client still waiting: drop it rather than answer.
    _reset(request)


def _reset(request: web.Request) -> None:
    """Drop the connection with a TCP RST, no response."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns close() into an RST, like a crashed proxy, not a polite FIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
