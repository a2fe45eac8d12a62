"""Portal links (SPEC §13): ``POST /v1/portal-links`` and the two routes a person's
browser takes, ``GET`` and ``POST /v1/portal-links/{token}``.

The creation is a protected route like ``POST /v1/portal-sessions``. The click
routes carry no credential but the token in their path, so they have a path of
their own, read top to bottom: rate limit per client IP → the use case → the
audit row (once the link is found: before that the request is anonymous and is
only logged and counted, like a 401) → the answer, as an HTML page for a
browser or problem+json for a client that asks for JSON.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web
from aiohttp_apigami import response_schema

from service import keys
from service.audit import ACTION_PORTAL_LINK_CREATE, ACTION_PORTAL_LINK_OPEN, AuditEvent
from service.auth import SCOPE_CREATE_SESSIONS
from service.client_ip import client_ip
from service.errors import (
    MAPPING_API_CODES,
    PORTAL_LINK_CODES,
    RateLimited,
    ServiceError,
    codes_by_status,
)
from service.handlers.openapi import (
    IDEMPOTENCY_KEY_PARAMETER,
    REQUEST_ID_PARAMETER,
    docs,
    problem_responses,
)
from service.link_pages import message_page, open_page
from service.middlewares import log_fields
from service.portal_links import create_link, open_link, view_link
from service.protected import Call, decided, protected
from service.ratelimit import retry_after_seconds
from service.schemas import PortalLinkSchema, PortalSessionRequestSchema

_CREATE_CODES = codes_by_status(
    excluding=MAPPING_API_CODES | (PORTAL_LINK_CODES - {"portal_links_disabled"})
)
_NOTES = {429: " (with `Retry-After`)", 503: " (with `Retry-After`)"}
# A click answers the session route's errors, less what only a caller's request can cause.
_CLICK_ONLY = {"portal_link_not_found", "portal_link_used", "portal_link_expired"}
_VIEW_CODES = codes_by_status(
    only={*_CLICK_ONLY, "portal_link_revoked", "rate_limited", "database_unavailable"}
)
_OPEN_CODES = codes_by_status(
    excluding=MAPPING_API_CODES
    | {
        "portal_links_disabled",
        "malformed_json",
        "invalid_header",
        "unauthenticated",
        "insufficient_scope",
        "forbidden_user",
        "return_url_not_allowed",
        "request_timeout",
        "payload_too_large",
        "unsupported_media_type",
        "validation_failed",
        "idempotency_conflict",
    }
)
_TOKEN_PARAMETER = {
    "in": "path",
    "name": "token",
    "required": True,
    "description": "The link's token, as `POST /v1/portal-links` returned it in `url`.",
    # Anything else is answered 404 without a database round trip.
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"},
}
_HTML = {"text/html": {"schema": {"type": "string"}}}


def _with_html(responses: dict[int, dict[str, object]]) -> dict[int, dict[str, object]]:
    """Error answers of the click routes: an HTML page, or problem+json when asked for."""
    for response in responses.values():
        response["content"] = {**_HTML, **response["content"]}  # type: ignore[dict-item]
        response["description"] = (
            f"{response['description']} — an HTML page, or problem+json with "
            "`Accept: application/json`"
        )
    return responses


@docs(
    tags=["portal links"],
    summary="Make a link that opens a customer-portal session when clicked",
    description=(
        "The same body, headers and authorization as `POST /v1/portal-sessions`, decided "
        "the same way now (errors come here, not at the click), but no Stripe call: the "
        "click opens the session. Single use, valid for `PORTAL_LINK_TTL_SECONDS`. "
        "`Idempotency-Key` is checked like the session route's, but a link costs no "
        "Stripe call: a retried creation makes a second link, each good for one click."
    ),
    parameters=[
        IDEMPOTENCY_KEY_PARAMETER,
        REQUEST_ID_PARAMETER,
    ],
    security=[{"bearerAuth": []}],
    responses=problem_responses(_CREATE_CODES, _NOTES),
)
@response_schema(PortalLinkSchema, 201, description="The link was made.")
@protected(
    scope=SCOPE_CREATE_SESSIONS,
    action=ACTION_PORTAL_LINK_CREATE,
    body=PortalSessionRequestSchema,
    idempotent=True,
    confirms_token=True,
)
async def create_portal_link(call: Call) -> web.Response:
    """Decide and store the request; answer 201 with the link and its expiry."""
    created = await create_link(
        call.request.app[keys.PORTAL], call.principal, call.body, audit=call.audit
    )
    body = {"url": created.url, "expires_at": int(created.expires_at.timestamp())}
    return web.Response(
        status=201,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@docs(
    tags=["portal links"],
    summary="The page a portal link shows: it opens the portal by POSTing to itself",
    description=(
        "No credential but the token. Changes nothing, so link scanners and chat "
        "previews never spend the link: the page's form POSTs to the same URL, "
        "submitted by its script at once, by its button when scripts are off. "
        "Rate-limited per client IP (`PORTAL_LINK_OPENS_PER_MINUTE`)."
    ),
    parameters=[_TOKEN_PARAMETER, REQUEST_ID_PARAMETER],
    responses={
        200: {
            "description": "The page (strict Content-Security-Policy, no external asset).",
            "content": _HTML,
        },
        **_with_html(problem_responses(_VIEW_CODES, _NOTES)),
    },
)
async def show_portal_link(request: web.Request) -> web.StreamResponse:
    """The self-submitting page, or why the link can't be opened."""
    try:
        await _limit_clicks(request)
        await view_link(request.app[keys.PORTAL], request.match_info["token"])
    except ServiceError as exc:
        return _refused(request, exc)
    request.app[keys.METRICS].portal_link("viewed")
    return open_page()


@docs(
    tags=["portal links"],
    summary="Open the portal: consume the link and redirect to a new portal session",
    description=(
        "What the page's form sends. Consumes the link (of concurrent clicks, one "
        "opens a session, the others see it used), resolves the request again, calls "
        "Stripe and answers `303 See Other` to the portal URL. A failure after the "
        "link was taken gives it back: the person may click again."
    ),
    parameters=[_TOKEN_PARAMETER, REQUEST_ID_PARAMETER],
    responses={
        303: {
            "description": "To the portal (`Location`); `Cache-Control: no-store`, "
            "`Referrer-Policy: no-referrer`.",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        **_with_html(problem_responses(_OPEN_CODES, _NOTES)),
    },
)
async def open_portal_link(request: web.Request) -> web.StreamResponse:
    """Consume the link, open the session, redirect; audited once the link is found."""
    app = request.app
    deadline = asyncio.get_running_loop().time() + app[keys.SETTINGS].request_deadline_seconds
    # The principal is the link's creator, known once the link is found.
    event = AuditEvent(
        request_id=request[keys.REQUEST_ID],
        principal_type="link",
        principal_id="",
        action=ACTION_PORTAL_LINK_OPEN,
        client_ip=client_ip(request),
        user_agent=request.headers.get("User-Agent"),
    )
    started = time.perf_counter()
    try:
        await _limit_clicks(request)
        opened = await open_link(
            app[keys.PORTAL], request.match_info["token"], audit=event, deadline=deadline
        )
        log_fields(
            request,
            upstream_request_id=opened.session.request_id,
            attempts=opened.session.attempts,
        )
        app[keys.METRICS].session_created(opened.flow or "home", event.principal_type)
        # No answer leaves without its audit row: a failed write is a 503 instead.
        await decided(request, event, started, 303, None, strict=True)
    except ServiceError as exc:
        # 303 already: the strict audit write itself failed (logged and counted there).
        if event.principal_id and event.http_status != 303:
            await decided(request, event, started, exc.status, exc)
        return _refused(request, exc, counted=bool(event.principal_id))
    except asyncio.CancelledError:
        if event.principal_id:
            await asyncio.shield(
                decided(request, event, started, 499, None, "client_closed_request")
            )
        raise
    except Exception:
        if event.principal_id:
            await decided(request, event, started, 500, None, "internal_error")
        raise
    return web.Response(
        status=303,
        headers={
            "Location": opened.session.url,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )


async def _limit_clicks(request: web.Request) -> None:
    """PORTAL_LINK_OPENS_PER_MINUTE per client IP, on both click routes (fleet-wide
    with Redis, like the callers' limits)."""
    app = request.app
    verdict = await app[keys.RATE_LIMITER].acquire(
        f"link-ip:{client_ip(request)}", app[keys.SETTINGS].portal_link_opens_per_minute
    )
    if verdict.wait > 0:
        app[keys.METRICS].portal_link("rate_limited")
        raise RateLimited(retry_after_seconds(verdict.wait))


_TITLES = {
    "portal_link_not_found": "This link does not exist",
    "portal_link_used": "This link was used already",
    "portal_link_expired": "This link has expired",
    "portal_link_revoked": "This link is no longer valid",
    "rate_limited": "Too many attempts",
}


def _refused(request: web.Request, error: ServiceError, *, counted: bool = False) -> web.Response:
    """The error as a page, or raised for the error middleware's problem+json."""
    if not counted:
        request.app[keys.METRICS].session_error(error.code)
    log_fields(request, error_code=error.code)
    if _wants_json(request):
        raise error
    title = _TITLES.get(error.code, "The billing portal could not be opened")
    text = error.detail if error.status < 500 else f"{error.detail} Please try again."
    back = error.extra.get("return_url")
    return message_page(
        error.status,
        title,
        text,
        back_url=back if isinstance(back, str) else None,
        headers=error.headers,
    )


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "json" in accept and "text/html" not in accept
