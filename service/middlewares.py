"""Cross-cutting concerns, outermost first.

request id → access log + metrics → errors → load shedding → authentication
→ audit → scope + rate limit → JSON body guard → (aiohttp-apigami validation)
→ handler. The last five apply only to handlers marked with :func:`protected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service import audit, keys
from service.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    DatabaseUnavailable,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    ServiceUnavailable,
    Unauthenticated,
    UnsupportedMediaType,
    problem_body,
)
from service.metrics import method_label
from service.ratelimit import retry_after_seconds

access_log = structlog.get_logger("access")
app_log = structlog.get_logger("app")
auth_log = structlog.get_logger("audit")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_UNSHED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
JSON_BODY_LIMIT = 16 * 1024

H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What a protected handler requires before it runs."""

    scope: str
    action: str
    body_limit: int = JSON_BODY_LIMIT


def protected(scope: str, action: str) -> Callable[[H], H]:
    """Mark a handler as authenticated, audited, rate limited, with a JSON body."""

    def mark(handler: H) -> H:
        handler.__dict__["route_policy"] = RoutePolicy(scope, action)
        return handler

    return mark


def _policy(request: web.Request) -> RoutePolicy | None:
    handler = request.match_info.handler
    return getattr(handler, "route_policy", None)


def _route(request: web.Request) -> str:
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


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take or make the request id, bind it to every log line, echo it back."""
    incoming = request.headers.get("X-Request-ID")
    valid = incoming is not None and _REQUEST_ID.fullmatch(incoming) is not None
    request_id = incoming if valid and incoming else uuid.uuid4().hex
    request[keys.REQUEST_ID] = request_id
    request[keys.LOG_FIELDS] = {}
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    if incoming is not None and not valid:
        response: web.StreamResponse = problem_response(
            BadRequest("invalid_header", "X-Request-ID must be 1-128 of [A-Za-z0-9._:-]."),
            request_id,
        )
    else:
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
        route = _route(request)
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
            **request[keys.LOG_FIELDS],
        )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes problem+json; nothing escapes as a traceback."""
    request_id = request[keys.REQUEST_ID]
    try:
        return await handler(request)
    except ServiceError as exc:
        return problem_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(_from_http_exception(exc), request_id)
    except Exception:
        app_log.exception("unhandled_exception", route=_route(request))
        request.app[keys.METRICS].session_errors.labels(code="internal_error").inc()
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
    """Refuse at once above MAX_IN_FLIGHT instead of queueing without bound, and
    refuse new work while draining. Probes and /metrics always pass, uncounted."""
    if request.path in _UNSHED_PATHS:
        return await handler(request)
    lifecycle = request.app[keys.LIFECYCLE]
    error: ServiceError | None = None
    if lifecycle.draining:
        error = ServiceUnavailable(
            "draining",
            "This instance is shutting down; retry.",
            headers={"Retry-After": "1", "Connection": "close"},
        )
    elif lifecycle.in_flight >= request.app[keys.SETTINGS].max_in_flight:
        error = ServiceUnavailable(
            "overloaded",
            "Too many requests in flight; retry shortly.",
            headers={"Retry-After": "1"},
        )
    if error is not None:
        # Refused before auth and audit: counted here (the shed panel and alerts).
        request.app[keys.METRICS].session_errors.labels(code=error.code).inc()
        raise error
    lifecycle.enter()
    try:
        response = await handler(request)
    finally:
        lifecycle.leave()
    if lifecycle.draining:
        # Finished during a drain: the client reconnects, to another replica.
        response.force_close()
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate protected routes; 401s are logged and counted, not stored."""
    if _policy(request) is None:
        return await handler(request)
    try:
        principal = await request.app[keys.AUTHENTICATOR].authenticate(
            request.headers.get("Authorization")
        )
    except Unauthenticated as exc:
        metrics = request.app[keys.METRICS]
        metrics.auth_failures.labels(reason=exc.reason).inc()
        metrics.session_errors.labels(code=exc.code).inc()
        # Logged, not stored (SPEC §6): anonymous traffic can't fill the database.
        metrics.audit_events.labels(outcome="unauthenticated").inc()
        auth_log.warning(
            "audit",
            outcome="unauthenticated",
            http_status=401,
            error_code=exc.code,
            reason=exc.reason,
            route=_route(request),
            client_ip=request.remote,
        )
        raise
    request[keys.PRINCIPAL] = principal
    structlog.contextvars.bind_contextvars(principal_type=principal.type, principal_id=principal.id)
    return await handler(request)


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One audit row per decided request of an authenticated principal."""
    policy = _policy(request)
    if policy is None:
        return await handler(request)
    principal = request[keys.PRINCIPAL]
    started = time.perf_counter()
    event = audit.AuditEvent(
        request_id=request[keys.REQUEST_ID],
        principal_type=principal.type,
        principal_id=principal.id,
        action=policy.action,
        client_ip=request.remote,
        user_agent=request.headers.get("User-Agent"),
    )
    request[keys.AUDIT] = event
    metrics = request.app[keys.METRICS]
    error: ServiceError | None = None
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        event.http_status = response.status
    except ServiceError as exc:
        error = exc
        event.http_status, event.error_code = exc.status, exc.code
        event.stripe_request_id = event.stripe_request_id or exc.stripe_request_id
        upstream = exc.extra.get("upstream")
        if isinstance(upstream, dict) and upstream.get("code"):
            event.detail = {**(event.detail or {}), "upstream_code": upstream["code"]}
    except Exception:
        event.http_status, event.error_code = 500, "internal_error"
        event.duration_ms = (time.perf_counter() - started) * 1000
        await _record_quietly(request, event)
        raise
    except asyncio.CancelledError:
        # The caller hung up (aiohttp cancels the handler). Stripe may already
        # have opened a session nobody will see: the row still gets written.
        event.http_status, event.error_code = 499, "client_closed_request"
        event.duration_ms = (time.perf_counter() - started) * 1000
        await asyncio.shield(_record_quietly(request, event))
        raise
    if error is not None:
        metrics.session_errors.labels(code=error.code).inc()
    event.duration_ms = (time.perf_counter() - started) * 1000
    request[keys.LOG_FIELDS].update(user_id=event.user_id, flow=event.flow)
    if event.stripe_request_id is not None:
        # Failures too: the Request-Id is what Stripe support asks for.
        request[keys.LOG_FIELDS].setdefault("upstream_request_id", event.stripe_request_id)
    if error is not None:
        await _record_quietly(request, event)
        raise error
    try:
        await audit.record(request.app[keys.DB], metrics, event)
    except DatabaseUnavailable:
        # No portal URL leaves without its audit row.
        metrics.session_errors.labels(code="database_unavailable").inc()
        raise
    assert response is not None
    return response


async def _record_quietly(request: web.Request, event: audit.AuditEvent) -> None:
    # A failed write is already logged and counted; the caller gets the original error.
    with contextlib.suppress(DatabaseUnavailable):
        await audit.record(request.app[keys.DB], request.app[keys.METRICS], event)


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Scope check and the principal's token bucket."""
    policy = _policy(request)
    if policy is None:
        return await handler(request)
    principal = request[keys.PRINCIPAL]
    if policy.scope not in principal.scopes:
        raise Forbidden("insufficient_scope", f"This client lacks the {policy.scope} scope.")
    wait = request.app[keys.RATE_LIMITER].try_acquire(
        principal.key, principal.rate_limit_per_minute
    )
    if wait > 0:
        raise RateLimited(retry_after_seconds(wait))
    return await handler(request)


@web.middleware
async def json_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for other media types, 413 before parsing, 400 for malformed JSON."""
    policy = _policy(request)
    if policy is None:
        return await handler(request)
    mime = request.content_type
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        raise UnsupportedMediaType(detail="Send the body as application/json.")
    limit = policy.body_limit
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(detail=f"The body must be at most {limit} bytes.")
    raw = await _read_limited(request, limit)
    try:
        request[keys.JSON_BODY] = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("malformed_json", "The body is not valid JSON.") from None
    return await handler(request)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await request.content.readany()
        except ConnectionResetError:
            # The caller hung up mid-body: nobody will read the answer, but the
            # request is still decided (and audited) as malformed, not as a crash.
            raise BadRequest("malformed_json", "The request body ended early.") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(detail=f"The body must be at most {limit} bytes.")
        chunks.append(chunk)


def log_fields(request: web.Request, **fields: Any) -> None:
    """Add fields to this request's canonical access line."""
    request[keys.LOG_FIELDS].update(fields)
