"""The protected request path, in one place, read top to bottom.

authenticate → open the audit event → scope → rate limit → path parameters →
JSON body → validation → handler → write the audit event.

A route declares what it needs where its handler is defined::

    @protected(scope=SCOPE_CREATE_SESSIONS, action=ACTION_CREATE_SESSION,
               body=PortalSessionRequestSchema, idempotent=True)
    async def create_portal_session(call: Call) -> web.Response: ...

and the handler receives a :class:`Call`: the principal, the validated body and
path parameters, the audit event to fill in, and the request's deadline. A
route without a body (a GET, a DELETE) declares ``body=None``: nothing is read;
one with parameters in its path declares a ``path`` schema, validated like a
body (422 on the parameter's name). Everything that applies
to every request (request id, access log, errors, load shedding) stays in
``middlewares.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_apigami import request_schema
from marshmallow import Schema, ValidationError

from service import audit, keys
from service.audit import AuditEvent
from service.auth import Principal
from service.client_ip import client_ip
from service.errors import (
    BadRequest,
    DatabaseUnavailable,
    Forbidden,
    RateLimited,
    ServiceError,
    Unauthenticated,
    UnsupportedMediaType,
    ValidationFailed,
)
from service.fast_validation import fast_load
from service.middlewares import log_fields, route_label
from service.ratelimit import retry_after_seconds
from service.request_body import read_request_body
from service.schemas import flatten_errors

audit_log = structlog.get_logger("audit")

JSON_BODY_LIMIT = 16 * 1024
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


@dataclass(frozen=True, slots=True)
class Call:
    """A protected request, authenticated and validated, as its handler sees it."""

    request: web.Request
    principal: Principal
    body: dict[str, Any]
    audit: AuditEvent
    # loop.time() by which the whole request must be answered (Stripe retries included).
    deadline: float
    idempotency_key: str | None
    # The route's path parameters as its ``path`` schema loaded them ({} without one).
    path: dict[str, Any]


ProtectedHandler = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """What a protected route requires before its handler runs."""

    scope: str
    action: str
    body: Schema | None
    path: Schema | None
    body_limit: int
    idempotent: bool
    # The handler's own query confirms a cached client token (see auth.Authenticator).
    confirms_token: bool


def protected(
    *,
    scope: str,
    action: str,
    body: type[Schema] | None,
    path: type[Schema] | None = None,
    body_limit: int = JSON_BODY_LIMIT,
    idempotent: bool = False,
    confirms_token: bool = False,
) -> Callable[[ProtectedHandler], Handler]:
    """Run ``handler`` behind the protected path; ``body`` (None: the route takes
    none) and ``path`` also document the request."""
    route = Route(
        scope,
        action,
        body() if body is not None else None,
        path() if path is not None else None,
        body_limit,
        idempotent,
        confirms_token,
    )

    def wrap(handler: ProtectedHandler) -> Handler:
        async def serve(request: web.Request) -> web.StreamResponse:
            return await _serve(request, route, handler)

        serve.__name__ = handler.__name__
        serve.__doc__ = handler.__doc__
        documented: Handler = serve
        if path is not None:
            documented = request_schema(path, location="path")(documented)
        if body is not None:
            documented = request_schema(body, required=True)(documented)
        return documented

    return wrap


async def _serve(
    request: web.Request, route: Route, handler: ProtectedHandler
) -> web.StreamResponse:
    deadline = (
        asyncio.get_running_loop().time() + request.app[keys.SETTINGS].request_deadline_seconds
    )
    authenticator = request.app[keys.AUTHENTICATOR]
    principal = await _authenticate(request, deferred=route.scope if route.confirms_token else None)
    event = AuditEvent(
        request_id=request[keys.REQUEST_ID],
        principal_type=principal.type,
        principal_id=principal.id,
        action=route.action,
        client_ip=client_ip(request),
        user_agent=request.headers.get("User-Agent"),
    )
    started = time.perf_counter()
    try:
        _check_scope(principal, route.scope)
        await _rate_limit(request, principal)
        path: dict[str, Any] = {}
        if route.path is not None:
            path = _validate(route.path, dict(request.match_info), _PATH_NOT_VALID)
            # A user in the path is the action's target: refusals after this name it too.
            event.user_id = path.get("user_id")
        body: dict[str, Any] = {}
        if route.body is not None:
            body = _validate(route.body, await _json_body(request, route.body_limit))
        key = _idempotency_key(request) if route.idempotent else None
        response = await handler(Call(request, principal, body, event, deadline, key, path))
        # No answer before a cached client token is confirmed (usually done already).
        await authenticator.settle(principal)
    except Unauthenticated as exc:
        # A cached client token this request's own query found revoked.
        await authenticator.settle(principal)
        _unauthenticated(request, exc)
        raise
    except ServiceError as exc:
        try:
            # Not after a database failure: the answer is that 503, which tells a
            # revoked client nothing, and a second lookup would double its wait.
            if not isinstance(exc, DatabaseUnavailable):
                await authenticator.settle(principal)
        except Unauthenticated as revoked:
            # Revoked: whatever else was wrong, the answer is the 401 (and no row).
            _unauthenticated(request, revoked)
            raise revoked from None
        store = _stored(exc)
        await decided(request, event, started, exc.status, exc, store=store)
        raise
    except asyncio.CancelledError:
        # The caller hung up (aiohttp cancels the handler). Stripe may already
        # have opened a session nobody will see: the row still gets written.
        await asyncio.shield(decided(request, event, started, 499, None, "client_closed_request"))
        raise
    except Exception:
        await decided(request, event, started, 500, None, "internal_error")
        raise
    # No answer leaves without its audit row: a failed write is a 503 instead.
    await decided(request, event, started, response.status, None, strict=True)
    return response


async def _authenticate(request: web.Request, *, deferred: str | None) -> Principal:
    """The principal; a 401 is logged and counted, never stored (SPEC §6)."""
    try:
        principal = await request.app[keys.AUTHENTICATOR].authenticate(
            request.headers.get("Authorization"), deferred=deferred
        )
    except Unauthenticated as exc:
        _unauthenticated(request, exc)
        raise
    request[keys.PRINCIPAL] = principal
    structlog.contextvars.bind_contextvars(principal_type=principal.type, principal_id=principal.id)
    return principal


def _unauthenticated(request: web.Request, exc: Unauthenticated) -> None:
    """Log and count a 401; anonymous traffic can't fill the database, so no row."""
    request.pop(keys.PRINCIPAL, None)
    structlog.contextvars.unbind_contextvars("principal_type", "principal_id")
    metrics = request.app[keys.METRICS]
    metrics.auth_failures.labels(reason=exc.reason).inc()
    metrics.session_error(exc.code)
    # Anonymous traffic can't fill the database.
    metrics.audit_event("unauthenticated")
    audit_log.warning(
        "audit",
        outcome="unauthenticated",
        http_status=401,
        error_code=exc.code,
        reason=exc.reason,
        route=route_label(request),
        client_ip=client_ip(request),
    )


def _check_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise Forbidden("insufficient_scope", f"This client lacks the {scope} scope.")


async def _rate_limit(request: web.Request, principal: Principal) -> None:
    verdict = await request.app[keys.RATE_LIMITER].acquire(
        principal.key, principal.rate_limit_per_minute
    )
    if verdict.wait > 0:
        raise RateLimited(retry_after_seconds(verdict.wait), first_of_window=verdict.first_refusal)


def _stored(error: ServiceError) -> bool:
    """Whether a refusal gets its audit row: every one but repeated 429s (SPEC §6)
    and answers that are the database's failure.

    A principal past its rate limit writes one row per minute (for the fleet
    with Redis, else per replica), for the first refusal of the window; the rest
    are logged and counted only. After a database failure the row would wait out
    a second timeout to fail the same way: the line is logged, the row skipped.
    """
    if isinstance(error, DatabaseUnavailable):
        return False
    return not isinstance(error, RateLimited) or error.first_of_window


async def _json_body(request: web.Request, limit: int) -> Any:
    """415 for other media types, 413 before parsing, 400 for malformed JSON."""
    mime = request.content_type
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        raise UnsupportedMediaType(detail="Send the body as application/json.")
    raw = await read_request_body(request, limit)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("malformed_json", "The body is not valid JSON.") from None


_PATH_NOT_VALID = "A path parameter is not valid."


def _validate(schema: Schema, body: Any, detail: str = "") -> dict[str, Any]:
    """The body (or path parameters) as the schema loads it; 422 with a field map
    keyed by dotted path."""
    # A body the fast path proves valid, loaded as marshmallow would; anything
    # else (every refusal among it) goes through marshmallow, for its messages.
    fast = fast_load(schema, body)
    if fast is not None:
        return fast
    try:
        data: dict[str, Any] = schema.load(body)
    except ValidationError as exc:
        raise ValidationFailed(flatten_errors(exc.messages), detail) from None
    return data


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest(
            "invalid_header", "Idempotency-Key must be 1-255 printable ASCII characters."
        )
    return key


async def decided(
    request: web.Request,
    event: AuditEvent,
    started: float,
    status: int,
    error: ServiceError | None,
    code: str | None = None,
    *,
    strict: bool = False,
    store: bool = True,
) -> None:
    """Close the audit event with the decision and emit it.

    ``strict`` (a success) lets a failed write become the answer (503); for a
    refusal the caller gets the original error and the failed write is only
    logged and counted. ``store=False`` emits the log line and metric without
    the row.
    """
    metrics = request.app[keys.METRICS]
    event.http_status = status
    event.duration_ms = (time.perf_counter() - started) * 1000
    if error is not None:
        metrics.session_error(error.code)
        event.error_code = error.code
        event.stripe_request_id = event.stripe_request_id or error.stripe_request_id
        upstream = error.extra.get("upstream")
        if isinstance(upstream, dict) and upstream.get("code"):
            event.detail = {**(event.detail or {}), "upstream_code": upstream["code"]}
    elif code is not None:
        event.error_code = code
    log_fields(request, user_id=event.user_id, flow=event.flow)
    if event.stripe_request_id is not None:
        # Failures too: the Request-Id is what Stripe support asks for.
        request[keys.LOG_FIELDS].setdefault("upstream_request_id", event.stripe_request_id)
    if strict:
        try:
            await audit.emit(request.app[keys.DB], metrics, event)
        except DatabaseUnavailable:
            metrics.session_error("database_unavailable")
            raise
        return
    # A failed write is already logged and counted; the caller gets the original error.
    with contextlib.suppress(DatabaseUnavailable, audit.AuditRowRefused):
        await audit.emit(request.app[keys.DB], metrics, event, store=store)
