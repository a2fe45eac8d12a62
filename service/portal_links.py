"""The use case of SPEC §13: portal links, decided now, opened at the click.

``create_link`` decides everything ``POST /v1/portal-sessions`` would (the
same :func:`~service.portal.prepare_session`) and stores the validated request
under the hash of a fresh token, without calling Stripe. ``open_link``
consumes the link (one click of many wins), prepares the session again for
the link's creator — a mapping may have changed since — and calls Stripe; when
that fails the link is given back, so the person can try again. ``view_link``
only reads. Like :mod:`service.portal`, this knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from service.audit import AuditEvent
from service.auth import SCOPE_CREATE_SESSIONS, Principal, hash_token
from service.db import portal_links
from service.db.portal_links import Link
from service.errors import DatabaseUnavailable, Gone, NotConfigured, NotFound, ServiceError
from service.portal import OpenedSession, PortalDeps, call_stripe, prepare_session

# 32 random bytes, URL-safe base64 without padding: 256 bits (SPEC §13).
TOKEN_BYTES = 32
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
LINK_PATH = "/v1/portal-links/"
# What a link's creator must still hold when the link is viewed or opened.
LINK_SCOPE = SCOPE_CREATE_SESSIONS


@dataclass(frozen=True, slots=True)
class CreatedLink:
    url: str
    expires_at: datetime


async def create_link(
    deps: PortalDeps, principal: Principal, body: dict[str, object], *, audit: AuditEvent
) -> CreatedLink:
    """Decide the request as a session would be, store it, return the link; no Stripe call."""
    base = deps.settings.public_base_url
    if base is None:
        raise NotConfigured(
            detail="Portal links are off on this deployment: PUBLIC_BASE_URL is not set."
        )
    prepared = await prepare_session(deps, principal, body, idempotency_key=None, audit=audit)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    link_id, expires_at = await portal_links.insert_link(
        deps.db,
        token_hash=hash_token(token),
        principal_type=principal.type,
        principal_id=principal.id,
        user_id=prepared.user_id,
        request=body,
        return_url=prepared.params["return_url"],
        request_id=audit.request_id,
        ttl_seconds=deps.settings.portal_link_ttl_seconds,
    )
    audit.detail = {**(audit.detail or {}), "link_id": link_id}
    deps.metrics.portal_link("created")
    return CreatedLink(f"{base}{LINK_PATH}{token}", expires_at)


async def view_link(deps: PortalDeps, token: str) -> Link:
    """The link behind ``token`` if it can still be opened; else 404 or 410. Changes nothing."""
    link = await portal_links.view_link(deps.db, _token_hash(token), LINK_SCOPE)
    usable = link is not None and not (
        link.opened_at is not None or link.expired or not link.creator_active
    )
    _check_open(deps, link, usable=usable)
    assert link is not None  # _check_open raised otherwise
    return link


async def open_link(
    deps: PortalDeps, token: str, *, audit: AuditEvent, deadline: float
) -> OpenedSession:
    """Consume the link, prepare the session again as its creator, and open it at Stripe.

    ``audit`` is filled in as the link's creator once the link is found
    (before that the request is anonymous: 404/410 are logged and counted by
    the caller, never stored).
    """
    link = await portal_links.consume_link(deps.db, _token_hash(token), LINK_SCOPE)
    _check_open(deps, link, usable=link is not None and link.taken_at is not None)
    assert link is not None
    assert link.taken_at is not None
    audit.principal_type = link.principal_type
    audit.principal_id = link.principal_id
    audit.user_id = link.user_id
    creator = Principal(link.principal_type, link.principal_id, frozenset({LINK_SCOPE}), 0)
    try:
        prepared = await prepare_session(
            deps, creator, link.request, idempotency_key=None, audit=audit
        )
        opened = await call_stripe(deps, prepared, audit=audit, deadline=deadline)
    except BaseException as exc:
        if isinstance(exc, ServiceError):
            # The page saying so offers the way back.
            exc.extra.setdefault("return_url", link.return_url)
        # No portal URL left: the link is theirs to click again (a fresh upstream
        # key each time, since the mapping may change between tries).
        deps.metrics.portal_link("failed")
        with contextlib.suppress(DatabaseUnavailable):
            await asyncio.shield(portal_links.release_link(deps.db, link.id, link.taken_at))
        raise
    audit.detail = {**(audit.detail or {}), "link_id": link.id}
    deps.metrics.portal_link("opened")
    return opened


def _token_hash(token: str) -> bytes:
    # Anything not shaped like our tokens can't be one: no database round trip.
    if not _TOKEN.fullmatch(token):
        raise LinkNotFound()
    return hash_token(token)


def _check_open(deps: PortalDeps, link: Link | None, *, usable: bool) -> None:
    """Raise the 404/410 this link gets, counted by its event; nothing if ``usable``."""
    if link is None:
        deps.metrics.portal_link("unknown")
        raise LinkNotFound()
    if usable:
        return
    back = {"return_url": link.return_url}
    if not link.creator_active:
        deps.metrics.portal_link("revoked")
        raise Gone(
            "portal_link_revoked", "This link's creator may no longer open portals.", extra=back
        )
    if link.expired and link.opened_at is None:
        deps.metrics.portal_link("expired")
        raise Gone("portal_link_expired", "This link has expired; ask for a new one.", extra=back)
    # Opened already, or open when read yet not ours to take: a concurrent click won.
    deps.metrics.portal_link("used")
    raise Gone("portal_link_used", "This link was used already; ask for a new one.", extra=back)


class LinkNotFound(NotFound):
    """404: no link has this token (or never could)."""

    def __init__(self) -> None:
        super().__init__("portal_link_not_found", "There is no such portal link.")
