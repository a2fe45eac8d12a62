"""The HTTP server around the application: requests its parser refuses still get our errors.

aiohttp's HTTP parser refuses a request head over its limits (a header line or
field over 8190 bytes, more than 128 headers) or malformed before any
middleware runs, and ``RequestHandler.handle_error`` answers in text/plain with
a logged traceback; aiohttp has no hook for that answer (aio-libs/aiohttp#3287).
:class:`AppRunner` is ``web.AppRunner`` whose connections answer it like every
other error (SPEC §2): problem+json ``400 header_too_large`` (or
``invalid_header`` for other malformed heads) with a generated ``X-Request-ID``,
one access line and the HTTP metrics, no traceback. ``portal-gateway serve``
and the tests' server both run the application with it.

It leans on aiohttp 3.x's server internals (``AppRunner._make_server``,
``Server._kwargs``, ``RequestHandler.handle_error``); tests/test_headers.py and
the ``serve`` test of tests/test_slow_clients.py pin the behaviour across upgrades.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from service import keys, logs
from service.errors import BadRequest
from service.metrics import method_label
from service.middlewares import access_log, problem_response, take_request_id

# What the parser raises for a head over its limits: a line or field too long,
# or too many header fields (a BadHttpMessage with this text).
_TOO_MANY_HEADERS = "too many headers"


class AppRunner(web.AppRunner):
    """``web.AppRunner`` whose server answers parser errors as problem+json."""

    async def _make_server(self) -> web.Server:
        # aiohttp's own server for the app (this starts the app), rebuilt as ours.
        server = await super()._make_server()
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            app=self.app,
            **server._kwargs,
        )


class _Server(web.Server):
    """aiohttp's server, making our connection handler."""

    def __init__(self, *args: Any, app: web.Application, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = app

    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, with parser errors answered as problem+json."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        manager = self._manager
        if not isinstance(exc, HttpProcessingError) or not isinstance(manager, _Server):
            # Not the parser's: an exception that escaped the middlewares (never expected).
            return super().handle_error(request, status, exc, message)
        started = time.perf_counter()
        request_id = take_request_id(None)
        logs.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        error = _parser_error(exc)
        response = problem_response(error, request_id)
        response.headers["X-Request-ID"] = request_id
        response.force_close()  # the parser's state is lost: no next request on it
        metrics = manager.app[keys.METRICS]
        metrics.session_error(error.code)
        elapsed = time.perf_counter() - started
        metrics.observe_request(method_label(request.method), "unmatched", error.status, elapsed)
        access_log.info(
            "request",
            method=request.method,
            route="unmatched",
            status=error.status,
            duration_ms=round(elapsed * 1000, 3),
            principal_type=None,
            principal_id=None,
            client_ip=request.remote,  # X-Forwarded-For is in the head it could not parse
            error_code=error.code,
            # Not the raw line: it is what was too long or malformed.
            parser_error=type(exc).__name__,
        )
        return response


def _parser_error(exc: HttpProcessingError) -> BadRequest:
    too_many = isinstance(exc, BadHttpMessage) and _TOO_MANY_HEADERS in exc.message.lower()
    if isinstance(exc, LineTooLong) or too_many:
        return BadRequest(
            "header_too_large", "The request line or a header is over the server's limit."
        )
    return BadRequest("invalid_header", "The request line or headers are malformed.")
