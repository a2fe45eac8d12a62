"""The use case: open a portal session for one of our users.

Reads top to bottom: who is the target user → check return URLs → resolve our
ids to Stripe ids (one round trip) → for an end user, hide what is not
self-serve → build Stripe's params → refuse what the profile's configuration
would refuse (SPEC §12, from the snapshot facts RESOLVE brought) → call Stripe.
It knows nothing of HTTP; the protected pipeline and the handler around it do
auth, validation, audit and the response.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from service.audit import AuditEvent
from service.auth import Principal, confirm_token
from service.config import Settings
from service.db import mappings, resolve
from service.db.pool import Database
from service.domain import OPEN_STATUSES, SUBSCRIPTION_FLOWS
from service.errors import (
    Conflict,
    DatabaseUnavailable,
    Forbidden,
    NotFound,
    ServiceError,
    ValidationFailed,
)
from service.metrics import Metrics
from service.return_urls import ReturnUrlMalformed, ReturnUrlNotAllowed, check_return_url
from service.stripe import PortalSession, StripeClient, upstream_error_code


@dataclass(frozen=True, slots=True)
class PortalDeps:
    """What the use case needs from the application."""

    settings: Settings
    db: Database
    stripe: StripeClient
    metrics: Metrics


@dataclass(frozen=True, slots=True)
class OpenedSession:
    session: PortalSession
    user_id: str
    flow: str | None


@dataclass(frozen=True, slots=True)
class PreparedSession:
    """A request decided and resolved: Stripe's params, not yet sent."""

    user_id: str
    flow: str | None
    params: dict[str, Any]
    # Connect: a customer on a connected account is only found on that account.
    stripe_account: str | None
    # The Idempotency-Key Stripe gets: the claimed one with a caller key, else fresh.
    upstream_key: str


async def open_portal_session(
    deps: PortalDeps,
    principal: Principal,
    body: dict[str, Any],
    *,
    idempotency_key: str | None,
    audit: AuditEvent,
    deadline: float,
) -> OpenedSession:
    """Resolve, call Stripe and return the session; raise a ServiceError otherwise."""
    prepared = await prepare_session(
        deps, principal, body, idempotency_key=idempotency_key, audit=audit
    )
    return await call_stripe(deps, prepared, audit=audit, deadline=deadline)


async def prepare_session(
    deps: PortalDeps,
    principal: Principal,
    body: dict[str, Any],
    *,
    idempotency_key: str | None,
    audit: AuditEvent,
) -> PreparedSession:
    """Everything short of the Stripe call: target user, return URLs, resolution,
    self-serve hiding, params, the profile's checks. Raises a ServiceError."""
    settings = deps.settings
    user_id = _target_user(principal, body)
    audit.user_id = user_id
    flow: dict[str, Any] | None = body.get("flow")
    flow_type = flow["type"] if flow else None
    audit.flow = flow_type or "home"

    _check_return_urls(settings, body)

    claim = None
    if idempotency_key is not None:
        claim = _idempotency_claim(principal, idempotency_key, user_id, body, settings)
    offer_name = flow.get("retention_offer") or flow.get("discount") if flow else None
    row = await resolve.resolve(
        deps.db,
        user_id=user_id,
        portal=body.get("portal"),
        plan=flow.get("plan") if flow else None,
        offer=offer_name,
        with_subscriptions=flow_type in SUBSCRIPTION_FLOWS,
        claim=claim,
        token_hash=principal.pending.token_hash if principal.pending else None,
    )
    # A client token from the cache is confirmed by this same round trip: revoked → 401.
    confirm_token(principal, resolve.client_of(row))
    if claim is not None and row["idem_request_hash"] != claim.request_hash:
        raise Conflict(
            "idempotency_conflict",
            "This Idempotency-Key was used with a different request body.",
        )
    if not row["customer_found"]:
        raise NotFound("unknown_user", "No Stripe customer is mapped for this user.")
    if principal.type == "user":
        _self_service_only(row)
    audit.stripe_customer_id = row["stripe_customer_id"] or row["stripe_account_id"]
    if body.get("portal") and row["profile_name"] is None:
        raise NotFound(
            "unknown_portal", "No portal profile has this name.", extra={"field": "portal"}
        )

    params: dict[str, Any] = {
        "customer": row["stripe_customer_id"],
        "customer_account": row["stripe_account_id"],
        "configuration": row["configuration_id"],
        "on_behalf_of": row["on_behalf_of"],
        "locale": body.get("locale") or row["customer_locale"],
        "return_url": body.get("return_url")
        or row["default_return_url"]
        or settings.default_return_url,
    }
    if flow is not None:
        params["flow_data"] = _flow_data(flow, row)
    _check_profile(row, flow_type, params, audit)

    # With a caller key, the stored upstream key (ours or an earlier request's).
    upstream_key = row["idem_upstream_key"] if claim is not None else os.urandom(16).hex()
    return PreparedSession(user_id, flow_type, params, row["connected_account"], upstream_key)


async def call_stripe(
    deps: PortalDeps, prepared: PreparedSession, *, audit: AuditEvent, deadline: float
) -> OpenedSession:
    """Open the prepared session at Stripe; a refusal naming a mapping marks it stale."""
    try:
        session = await deps.stripe.create_portal_session(
            prepared.params,
            idempotency_key=prepared.upstream_key,
            deadline=deadline,
            stripe_account=prepared.stripe_account,
        )
    except ServiceError as exc:
        audit.stripe_request_id = exc.stripe_request_id
        if exc.code == "upstream_rejected" and upstream_error_code(exc) == "resource_missing":
            await _mark_stale(deps, audit, prepared.user_id, prepared.params, exc)
        raise
    audit.stripe_session_id = session.id
    audit.stripe_request_id = session.request_id
    audit.detail = {"attempts": session.attempts}
    return OpenedSession(session, prepared.user_id, prepared.flow)


async def _mark_stale(
    deps: PortalDeps,
    audit: AuditEvent,
    user_id: str,
    params: dict[str, Any],
    error: ServiceError,
) -> None:
    """Stripe does not know an id we mapped: mark that mapping stale, count it, audit it.

    A stale subscription is no longer picked as the default; a stale mapping
    heals with the next webhook for it, ``resync`` or a re-import.
    """
    upstream = error.extra.get("upstream")
    param = upstream.get("param") if isinstance(upstream, dict) else None
    target = _stale_target(param, params)
    if target is None:
        return  # a price, coupon or configuration: not a customer or subscription mapping
    kind, stripe_id = target
    try:
        newly_marked = await mappings.mark_stale(deps.db, kind, user_id, stripe_id)
    except DatabaseUnavailable:
        newly_marked = False  # the caller still gets the 502; the next refusal marks it
    if newly_marked:
        deps.metrics.stale_mappings.labels(kind=kind).inc()
    audit.detail = {
        **(audit.detail or {}),
        "stale": {"kind": kind, "id": stripe_id, "param": param, "newly_marked": newly_marked},
    }
    error.detail = f"Stripe has no such {kind} for this user; the mapping is marked stale."


def _stale_target(param: str | None, params: dict[str, Any]) -> tuple[str, str] | None:
    """Which of our mappings Stripe's ``param`` of a ``resource_missing`` points at."""
    if param in ("customer", "customer_account"):
        value = params.get(param)
        return ("customer", value) if isinstance(value, str) else None
    flow_data = params.get("flow_data") or {}
    flow_type = flow_data.get("type")
    flow = flow_data.get(flow_type) if isinstance(flow_type, str) else None
    sub = flow.get("subscription") if isinstance(flow, dict) else None
    if not isinstance(sub, str) or param is None or not param.startswith(f"flow_data[{flow_type}]"):
        return None
    # The subscription itself, or its mapped item (an item id Stripe no longer
    # knows means the mapping is out of date just the same).
    if param.endswith("[subscription]") or ("[items]" in param and param.endswith("[id]")):
        return "subscription", sub
    return None


def _self_service_only(row: dict[str, Any]) -> None:
    """Hide from an end user every plan, offer and profile not marked self-serve (SPEC §5).

    Done once, before anything reads the row, so such an item takes exactly the
    path of a name that does not exist: the same 404, the same body, no probing.
    The user's own profile and the default profile are always theirs.
    """
    profile = row["profile_name"]
    if profile is not None and not (
        row["profile_self_serve"] or row["profile_is_default"] or profile == row["customer_portal"]
    ):
        for column in (
            "profile_name",
            "configuration_id",
            "on_behalf_of",
            "default_return_url",
            "profile_connected_account",
            "profile_has_snapshot",
        ):
            row[column] = None
    if not row["plan_self_serve"]:
        row["plan_price_id"] = row["plan_active"] = None
    if not row["offer_self_serve"]:
        row["offer_kind"] = row["offer_stripe_id"] = None


# The feature a deep link needs enabled in the configuration (Stripe refuses it otherwise).
FLOW_FEATURES = {
    "payment_method_update": "payment_method_update",
    "subscription_cancel": "subscription_cancel",
    "subscription_update": "subscription_update",
    "subscription_update_confirm": "subscription_update",
}


def _check_profile(
    row: dict[str, Any], flow_type: str | None, params: dict[str, Any], audit: AuditEvent
) -> None:
    """Refuse, before Stripe, a session the profile's configuration makes impossible (SPEC §12).

    Only with a snapshot (what Stripe last reported of the configuration):
    without one the call goes to Stripe as before. The refusal's audit row
    names the profile, its configuration and what was checked.
    """
    if not row["profile_has_snapshot"]:
        return
    profile = row["profile_name"]
    audit.detail = {
        **(audit.detail or {}),
        "profile": profile,
        "configuration": row["configuration_id"],
    }
    if not row["snapshot_active"]:
        raise Conflict(
            "portal_inactive",
            f"The configuration of portal profile {profile!r} is inactive.",
            extra={"field": "portal"},
        )
    if row["profile_connected_account"] != row["connected_account"]:
        audit.detail["profile_account"] = row["profile_connected_account"]
        audit.detail["customer_account"] = row["connected_account"]
        raise Conflict(
            "portal_account_mismatch",
            f"Portal profile {profile!r} is on another Stripe account than this user's customer.",
            extra={"field": "portal"},
        )
    feature = FLOW_FEATURES.get(flow_type or "")
    if feature is not None and not row[f"snapshot_{feature}"]:
        audit.detail["feature"] = feature
        raise Conflict(
            "portal_feature_disabled",
            f"Portal profile {profile!r} does not enable {feature}, which this flow needs.",
            extra={"field": "flow.type"},
        )
    if flow_type == "subscription_update_confirm":
        confirm = params["flow_data"]["subscription_update_confirm"]
        price = confirm["items"][0].get("price")
        if price is not None and price not in (row["snapshot_prices"] or []):
            audit.detail["price"] = price
            raise Conflict(
                "plan_not_offered",
                f"Portal profile {profile!r} does not offer this plan's price.",
                extra={"field": "flow.plan"},
            )


def _target_user(principal: Principal, body: dict[str, Any]) -> str:
    requested = body.get("user_id")
    if principal.type == "user":
        if requested is not None and requested != principal.id:
            raise Forbidden("forbidden_user", "End users may open only their own portal.")
        return principal.id
    if requested is None:
        raise ValidationFailed({"user_id": ["Missing data for required field."]})
    return str(requested)


def _check_return_urls(settings: Settings, body: dict[str, Any]) -> None:
    urls = {"return_url": body.get("return_url")}
    after = (body.get("flow") or {}).get("after_completion") or {}
    urls["flow.after_completion.return_url"] = after.get("return_url")
    for path, url in urls.items():
        if url is None:
            continue
        try:
            check_return_url(
                url,
                settings.return_url_allowlist,
                allow_http_localhost=settings.allow_http_localhost,
            )
        except ReturnUrlMalformed as exc:
            raise ValidationFailed({path: [f"Not a valid return URL: {exc}."]}) from None
        except ReturnUrlNotAllowed as exc:
            raise Forbidden(
                "return_url_not_allowed", f"{path} is not allowed: {exc}.", extra={"field": path}
            ) from None


def _idempotency_claim(
    principal: Principal, key: str, user_id: str, body: dict[str, Any], settings: Settings
) -> resolve.IdempotencyClaim:
    request_hash = hashlib.sha256(
        orjson.dumps({"user_id": user_id, "body": body}, option=orjson.OPT_SORT_KEYS)
    ).digest()
    # Derived from principal + key + a fresh nonce: two callers never share an
    # upstream key, and a key reused after its TTL gets a new session.
    upstream_key = hashlib.sha256(f"{principal.key}\0{key}\0{uuid.uuid4()}".encode()).hexdigest()
    return resolve.IdempotencyClaim(
        principal.key, key, request_hash, upstream_key, settings.idempotency_ttl_seconds
    )


def _flow_data(flow: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    flow_type: str = flow["type"]
    data: dict[str, Any] = {"type": flow_type}
    after = flow.get("after_completion")
    if after is not None:
        data["after_completion"] = _after_completion(after)
    if flow_type not in SUBSCRIPTION_FLOWS:
        return data
    sub = _pick_subscription(row["subscriptions"] or [], flow.get("subscription"))
    if flow_type == "subscription_cancel":
        cancel: dict[str, Any] = {"subscription": sub["id"]}
        if "retention_offer" in flow:
            coupon = _offer(row, flow["retention_offer"], "flow.retention_offer", coupon_only=True)
            cancel["retention"] = {"type": "coupon_offer", "coupon_offer": {"coupon": coupon[1]}}
        data["subscription_cancel"] = cancel
    elif flow_type == "subscription_update":
        data["subscription_update"] = {"subscription": sub["id"]}
    else:
        if sub["item_id"] is None:
            raise Conflict(
                "subscription_not_updatable",
                "This subscription has several items; Stripe can't update it through the portal.",
            )
        item: dict[str, Any] = {"id": sub["item_id"]}
        if "plan" in flow:
            if row["plan_price_id"] is None or not row["plan_active"]:
                raise NotFound(
                    "unknown_plan", "No active plan has this name.", extra={"field": "flow.plan"}
                )
            item["price"] = row["plan_price_id"]
        if "quantity" in flow:
            item["quantity"] = flow["quantity"]
        confirm: dict[str, Any] = {"subscription": sub["id"], "items": [item]}
        if "discount" in flow:
            kind, stripe_id = _offer(row, flow["discount"], "flow.discount", coupon_only=False)
            confirm["discounts"] = [{kind: stripe_id}]
        data["subscription_update_confirm"] = confirm
    return data


def _after_completion(after: dict[str, Any]) -> dict[str, Any]:
    kind = after["type"]
    if kind == "redirect":
        return {"type": kind, "redirect": {"return_url": after["return_url"]}}
    if kind == "hosted_confirmation" and "message" in after:
        return {"type": kind, "hosted_confirmation": {"custom_message": after["message"]}}
    return {"type": kind}


def _pick_subscription(subs: list[dict[str, Any]], ref: str | None) -> dict[str, Any]:
    """The named subscription of this user, or the only open one."""
    if ref is not None:
        for sub in subs:
            if ref in (sub["ref"], sub["id"]):
                if sub["status"] not in OPEN_STATUSES or sub["stale"]:
                    raise Conflict(
                        "subscription_not_open",
                        f"The subscription is {sub['status']}, not open.",
                        extra={"field": "flow.subscription"},
                    )
                return sub
        # Same answer for another user's subscription and a made-up one.
        raise NotFound(
            "unknown_subscription",
            "This user has no such subscription.",
            extra={"field": "flow.subscription"},
        )
    open_subs = [s for s in subs if s["status"] in OPEN_STATUSES and not s["stale"]]
    if not open_subs:
        raise NotFound("no_open_subscription", "This user has no open subscription.")
    if len(open_subs) > 1:
        raise Conflict(
            "subscription_ambiguous",
            "This user has several open subscriptions; name one in flow.subscription.",
            extra={"subscriptions": [s["ref"] or s["id"] for s in open_subs]},
        )
    return open_subs[0]


def _offer(row: dict[str, Any], name: str, path: str, *, coupon_only: bool) -> tuple[str, str]:
    if row["offer_kind"] is None:
        raise NotFound("unknown_offer", "No offer has this name.", extra={"field": path})
    if coupon_only and row["offer_kind"] != "coupon":
        raise ValidationFailed(
            {path: ["A retention offer must be a coupon, not a promotion code."]}
        )
    kind = "coupon" if row["offer_kind"] == "coupon" else "promotion_code"
    return kind, row["offer_stripe_id"]
