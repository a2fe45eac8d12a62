"""What applies to every request, outermost first.

request id → access log + metrics → errors → load shedding. What applies only
to protected routes (authentication, audit, scope, rate limit, JSON body,
validation) is the pipeline of ``protected.py``, declared on each route.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service import keys, logs
from service.client_ip import client_ip
from service.errors import (
    PROBLEM_CONTENT_TYPE,
    ClientClosedRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    problem_body,
)
from service.metrics import method_label

access_log = structlog.get_logger("access")
app_log = structlog.get_logger("app")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def route_label(request: web.Request) -> str:
    """The route template: a bounded metric label, never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def problem_response(error: ServiceError, request_id: str) -> web.Response:
    """The problem+json response for an error."""
    return web.Response(
        status=error.status,
        body=orjson.dumps(problem_body(error, request_id)),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=error.headers,
    )


def take_request_id(incoming: str | None) -> str:
    """The caller's ``X-Request-ID`` if well-formed, else a generated one: a tracing
    header never fails a request (SPEC §2)."""
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return os.urandom(16).hex()  # 128 random bits, as a UUID4's hex; a fifth of the cost


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take or make the request id, bind it to every log line, echo it back."""
    request_id = take_request_id(request.headers.get("X-Request-ID"))
    request[keys.REQUEST_ID] = request_id
    request[keys.LOG_FIELDS] = {}
    logs.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    response = await handler(request)
    response.headers["X-Request-ID"] = request_id
    return response


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One canonical log line and the HTTP metrics per request."""
    metrics = request.app[keys.METRICS]
    started = time.perf_counter()
    metrics.http_in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the caller went away (nginx's "client closed request")
        raise
    finally:
        metrics.http_in_flight.dec()
        elapsed = time.perf_counter() - started
        route = route_label(request)
        metrics.observe_request(method_label(request.method), route, status, elapsed)
        principal = request.get(keys.PRINCIPAL)
        access_log.info(
            "request",
            method=request.method,
            route=route,
            status=status,
            duration_ms=round(elapsed * 1000, 3),
            principal_type=principal.type if principal else None,
            principal_id=principal.id if principal else None,
            client_ip=client_ip(request),
            **request[keys.LOG_FIELDS],
        )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes problem+json; nothing escapes as a traceback."""
    request_id = request[keys.REQUEST_ID]
    try:
        return await handler(request)
    except ClientClosedRequest:
        # Nobody is left to read an answer: the status is for the access line and metrics.
        return web.Response(status=ClientClosedRequest.status)
    except ServiceError as exc:
        return problem_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(_from_http_exception(exc), request_id)
    except Exception:
        app_log.exception("unhandled_exception", route=route_label(request))
        request.app[keys.METRICS].session_error("internal_error")
        return problem_response(
            InternalError(detail="An unexpected error occurred; it has been logged."),
            request_id,
        )


def _from_http_exception(exc: web.HTTPException) -> ServiceError:
    if exc.status == 404:
        return NotFound("not_found", "No such resource.")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return MethodNotAllowed(detail="Method not allowed.", headers={"Allow": allowed})
    if exc.status == 413:
        return PayloadTooLarge(detail="The request body is too large.")
    error = ServiceError("http_error", exc.reason)
    error.status = exc.status  # type: ignore[misc]
    return error


@web.middleware
async def shed_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse at once past the route's in-flight budget (MAX_IN_FLIGHT, or
    WEBHOOK_MAX_IN_FLIGHT for webhooks) instead of queueing without bound, and
    refuse new work while draining. Probes and /metrics have no budget: they
    always pass, uncounted."""
    lifecycle = request.app[keys.LIFECYCLE]
    budget = lifecycle.budget_for(request.match_info.route)
    if budget is None:
        return await handler(request)
    error: ServiceError | None = None
    if lifecycle.draining:
        error = ServiceUnavailable(
            "draining",
            "This instance is shutting down; retry.",
            headers={"Retry-After": "1", "Connection": "close"},
        )
    elif not lifecycle.try_enter(budget):
        error = ServiceUnavailable(
            "overloaded",
            "Too many requests in flight; retry shortly.",
            headers={"Retry-After": "1"},
        )
    if error is not None:
        # Refused before auth and audit: counted here (the shed panel and alerts).
        request.app[keys.METRICS].session_error(error.code)
        raise error
    try:
        response = await handler(request)
    finally:
        lifecycle.leave(budget)
    if lifecycle.draining:
        # Finished during a drain: the client reconnects, to another replica.
        response.force_close()
    return response


def log_fields(request: web.Request, **fields: Any) -> None:
    """Add fields to this request's canonical access line."""
    request[keys.LOG_FIELDS].update(fields)
