"""The webhook use case: verify a Stripe event, then apply it to the mapping.

Reads top to bottom: check ``Stripe-Signature`` against every configured
secret → parse the event → in one transaction claim its id (a replay changes
nothing), apply it (ordering is left to the SQL in ``db/mappings.py``, and for
``customer.created|updated`` metadata facts to ``linking.py``, for
``billing_portal.configuration.created|updated`` snapshots to
``profile_snapshots.py``), emit the audit
events → count it, and schedule a backfill for every user it linked. It knows
nothing of HTTP beyond the errors it raises; ``handlers/webhooks.py`` reads the
body and writes the answer.

Connect: an event with a top-level ``account`` touches only mappings (and portal
profiles) on that connected account, one without only the platform's
(``connected_account`` NULL).

Anything Stripe sent and signed that we cannot use (an unknown customer, an
event type we do not handle, an object we cannot read) is recorded and
answered 200: a non-2xx would only make Stripe retry it for days.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from service import audit, linking, profile_snapshots
from service.audit import (
    ACTION_MAPPING_CREATE,
    ACTION_MAPPING_DELETE,
    ACTION_MAPPING_UPDATE,
    ACTION_PROFILE_SNAPSHOT,
    AuditEvent,
)
from service.backfill import Actor
from service.backfiller import Backfiller
from service.config import Secret, Settings
from service.db import events, mappings
from service.db.pool import Connection, Database
from service.domain import SubscriptionState, stripe_id, subscription_state
from service.errors import BadRequest
from service.metrics import Metrics

log = structlog.get_logger("app")

SIGNATURE_TOLERANCE_SECONDS = 300
SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
    }
)
CUSTOMER_DELETED = "customer.deleted"
CONFIGURATION_EVENTS = frozenset(profile_snapshots.CONFIGURATION_EVENTS)
HANDLED_EVENTS = SUBSCRIPTION_EVENTS | {CUSTOMER_DELETED} | CONFIGURATION_EVENTS
# Handled when STRIPE_USER_METADATA_KEY is set (else 'unhandled'): metadata links.
CUSTOMER_FACT_EVENTS = frozenset(linking.FACT_EVENTS)
# Metric label for requests refused before the event could be read.
UNVERIFIED = "unverified"

PRINCIPAL_STRIPE = "stripe"


@dataclass(frozen=True, slots=True)
class WebhookDeps:
    """What the use case needs from the application."""

    settings: Settings
    db: Database
    metrics: Metrics
    # Backfills the users an event linked, after its transaction (None: nobody does).
    backfiller: Backfiller | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """The parts of a Stripe event we use."""

    id: str
    type: str
    created: datetime
    livemode: bool
    object: dict[str, Any]
    # The API request that caused the event, when there was one.
    request_id: str | None
    # Connect: the connected account (`acct_…`) the event happened on; None for
    # the platform's own. It scopes which mappings the event may touch.
    account: str | None = None
    # data.previous_attributes of an *.updated event: what changed, and from what.
    previous_attributes: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """What happened to one delivery."""

    event_id: str
    event_type: str
    result: str


class SignatureInvalid(BadRequest):
    """400 ``invalid_signature``; ``reason`` is for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__("invalid_signature", detail)
        self.reason = reason


def metric_type(event_type: str) -> str:
    """A bounded label: the types we handle as-is, anything else ``other``."""
    return event_type if event_type in HANDLED_EVENTS | CUSTOMER_FACT_EVENTS else "other"


def handles(settings: Settings, event_type: str) -> bool:
    """Whether this service applies events of this type (metadata links only with a key)."""
    if event_type in CUSTOMER_FACT_EVENTS:
        return settings.stripe_user_metadata_key is not None
    return event_type in HANDLED_EVENTS


# --- verification ------------------------------------------------------------


def verify_signature(
    payload: bytes,
    header: str | None,
    secrets: Sequence[Secret],
    *,
    now: float | None = None,
    tolerance: int = SIGNATURE_TOLERANCE_SECONDS,
) -> int:
    """Check ``Stripe-Signature`` the way Stripe's libraries do; return its timestamp.

    The header is ``t=<unix time>,v1=<hex>[,v1=<hex>...]`` (other schemes are
    ignored); a ``v1`` is HMAC-SHA256 of ``"{t}.{payload}"`` under an endpoint
    secret. Any configured secret may match, so a rotated secret and its
    successor both work while Stripe signs with both.
    """
    if not secrets:
        raise SignatureInvalid("not_configured", "No webhook signing secret is configured.")
    if not header:
        raise SignatureInvalid("missing_header", "The Stripe-Signature header is missing.")
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value.encode("utf-8", "surrogateescape"))
    if timestamp is None or not candidates:
        raise SignatureInvalid(
            "malformed_header", "The Stripe-Signature header needs t= and at least one v1=."
        )
    signed = str(timestamp).encode() + b"." + payload
    expected = [
        hmac.new(secret.reveal().encode(), signed, hashlib.sha256).hexdigest().encode()
        for secret in secrets
    ]
    # Every pair is compared (no early exit) in constant time.
    matched = False
    for want in expected:
        for got in candidates:
            matched |= hmac.compare_digest(want, got)
    if not matched:
        raise SignatureInvalid("no_match", "No signature matches the payload.")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureInvalid(
            "timestamp_outside_tolerance", "The signature timestamp is outside the tolerance."
        )
    return timestamp


def parse_event(payload: bytes) -> Event:
    """The event in a verified payload; 400 if it is not a Stripe event."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadRequest("malformed_json", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise _invalid("the body is not a JSON object")
    event_id, event_type, created = data.get("id"), data.get("type"), data.get("created")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > 255:
        raise _invalid("id must be an evt_ id")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 255:
        raise _invalid("type must be a string")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise _invalid("created must be a unix time")
    livemode = data.get("livemode")
    if not isinstance(livemode, bool):
        raise _invalid("livemode must be a boolean")
    obj = (data.get("data") or {}).get("object") if isinstance(data.get("data"), dict) else None
    if not isinstance(obj, dict):
        raise _invalid("data.object must be an object")
    request = data.get("request")
    request_id = request.get("id") if isinstance(request, dict) else None
    previous = data["data"].get("previous_attributes")
    account = data.get("account")
    if account is not None and (
        not isinstance(account, str) or stripe_id(account, "acct_") is None or len(account) > 255
    ):
        raise _invalid("account must be an acct_ id")
    return Event(
        id=event_id,
        type=event_type,
        created=datetime.fromtimestamp(created, UTC),
        livemode=livemode,
        object=obj,
        request_id=request_id if isinstance(request_id, str) else None,
        account=account,
        previous_attributes=previous if isinstance(previous, dict) else None,
    )


def _invalid(why: str) -> BadRequest:
    return BadRequest("invalid_event", f"Not a Stripe event: {why}.")


# --- application -------------------------------------------------------------


async def receive(
    deps: WebhookDeps,
    payload: bytes,
    signature: str | None,
    *,
    request_id: str,
    client_ip: str | None,
    user_agent: str | None,
) -> Receipt:
    """Verify, parse and apply one delivery; raise a 400 with nothing applied if unverified."""
    metrics = deps.metrics.webhook_events
    try:
        verify_signature(payload, signature, deps.settings.stripe_webhook_secrets)
    except SignatureInvalid as exc:
        metrics.labels(type=UNVERIFIED, result="invalid_signature").inc()
        level = log.error if exc.reason == "not_configured" else log.warning
        level("webhook_refused", reason=exc.reason, client_ip=client_ip)
        raise
    try:
        event = parse_event(payload)
    except BadRequest as exc:
        metrics.labels(type=UNVERIFIED, result=exc.code).inc()
        raise
    label = metric_type(event.type)
    try:
        outcome = await _apply(deps, event, request_id, client_ip, user_agent)
    except Exception:
        # Stripe retries a non-2xx: the transaction rolled back, so the retry starts clean.
        metrics.labels(type=label, result="error").inc()
        raise
    result = outcome.result
    metrics.labels(type=label, result=result).inc()
    if outcome.links is not None:
        # Committed: count it, then fetch the linked users' subscriptions in the background.
        linking.count(deps.metrics, outcome.links)
        for user_id in outcome.links.linked_users:
            _schedule_backfill(deps, event, request_id, user_id)
    log.info("webhook_event", event_id=event.id, event_type=event.type, result=result)
    return Receipt(event.id, event.type, result)


def _schedule_backfill(deps: WebhookDeps, event: Event, request_id: str, user_id: str) -> None:
    """Backfill after commit, never failing the delivery: Stripe wants 2xx within a second."""
    if deps.backfiller is None:
        log.warning("backfill_not_scheduled", user_id=user_id, reason="no_backfiller")
        return
    try:
        deps.backfiller.schedule(
            user_id, actor=Actor(PRINCIPAL_STRIPE, event.id, request_id=request_id)
        )
    except Exception:  # the link is committed; sync or resync repairs a missed backfill
        log.exception("backfill_not_scheduled", user_id=user_id, event_id=event.id)


@dataclass(slots=True)
class _Outcome:
    """What applying one event did, for the answer and for after the commit."""

    result: str
    records: list[AuditEvent] = field(default_factory=list)
    # A metadata fact's decision (customer.created|updated).
    links: linking.Decided | None = None


async def _apply(
    deps: WebhookDeps,
    event: Event,
    request_id: str,
    client_ip: str | None,
    user_agent: str | None,
) -> _Outcome:
    """One transaction: claim the id, apply, audit, record the result."""
    db = deps.db
    key = deps.settings.stripe_user_metadata_key
    handled = handles(deps.settings, event.type)
    sub = subscription_state(event.object) if event.type in SUBSCRIPTION_EVENTS else None
    customer = (sub.customer or sub.account) if sub else stripe_id(event.object.get("id"), "cus_")
    object_id = event.object.get("id")
    started = time.perf_counter()
    async with db.connection() as conn, conn.transaction():
        claimed = await events.claim_event(
            conn,
            event.id,
            event.type,
            event.created,
            customer if handled else None,
            object_id if isinstance(object_id, str) else None,
        )
        if not claimed:
            return _Outcome("duplicate")
        fact = (
            linking.fact_from_customer(
                event.object,
                key,
                at=event.created,
                connected_account=event.account,
                previous_attributes=event.previous_attributes,
            )
            if key is not None and event.type in CUSTOMER_FACT_EVENTS
            else None
        )
        if event.livemode != deps.settings.livemode:
            # Signed with this endpoint's secret, but for the other mode's ids.
            outcome = _Outcome("livemode_mismatch")
        elif not handled:
            outcome = _Outcome("unhandled")
        elif sub is not None:
            outcome = await _apply_subscription(conn, event, sub)
        elif event.type == CUSTOMER_DELETED and customer is not None:
            outcome = await _apply_customer_deleted(conn, event, customer)
        elif event.type in CONFIGURATION_EVENTS:
            outcome = await _apply_configuration(conn, event)
        elif fact is not None:
            outcome = await _apply_metadata_fact(conn, event, fact)
        else:
            outcome = _Outcome("invalid_object")
        if outcome.result == "invalid_object":
            log.warning("webhook_invalid_object", event_id=event.id, event_type=event.type)
        for record in outcome.records:
            record.request_id = request_id
            record.client_ip = client_ip
            record.user_agent = user_agent
            record.duration_ms = (time.perf_counter() - started) * 1000
            await audit.emit(conn, deps.metrics, record)
        await events.finish_event(conn, event.id, outcome.result)
    deps.metrics.db_query("webhook_apply", time.perf_counter() - started)
    if outcome.result == "unknown_customer":
        log.warning("webhook_unknown_customer", event_id=event.id, customer=customer)
    return outcome


async def _apply_subscription(conn: Connection, event: Event, sub: SubscriptionState) -> _Outcome:
    applied = await mappings.apply_subscription(
        conn,
        sub,
        event.created,
        deletion=event.type == "customer.subscription.deleted",
        creation=event.type == "customer.subscription.created",
        connected_account=event.account,
    )
    if applied.user_id is None:
        # Not mapped, or mapped on another Connect account than the event's.
        return _Outcome("unknown_customer")
    if not applied.applied:
        # Older than what the row holds, or the subscription is already deleted.
        return _Outcome("superseded")
    record = _audit(
        event,
        ACTION_MAPPING_CREATE if applied.inserted else ACTION_MAPPING_UPDATE,
        applied.user_id,
        sub.customer or sub.account,
        {
            "subscription": sub.id,
            "external_ref": applied.external_ref,
            "status": sub.status,
            "item_id": sub.item_id,
            "price_id": sub.price_id,
            "quantity": sub.quantity,
            "deleted": event.type == "customer.subscription.deleted",
        },
    )
    return _Outcome("applied", [record])


async def _apply_customer_deleted(conn: Connection, event: Event, customer: str) -> _Outcome:
    # Whatever the mapping's source: the customer is gone in Stripe.
    deleted = await mappings.delete_customer(conn, customer, connected_account=event.account)
    if deleted is None:
        return _Outcome("unknown_customer")
    user_id, subscriptions = deleted
    record = _audit(
        event, ACTION_MAPPING_DELETE, user_id, customer, {"subscriptions": subscriptions}
    )
    return _Outcome("applied", [record])


async def _apply_metadata_fact(
    conn: Connection, event: Event, fact: linking.MetadataFact
) -> _Outcome:
    decided = await linking.apply_fact(conn, fact, event_id=event.id)
    records = [
        _audit(event, e.action, e.user_id, e.customer, e.detail, outcome=e.outcome)
        for e in linking.audit_entries(decided)
    ]
    return _Outcome(decided.result, records, decided)


async def _apply_configuration(conn: Connection, event: Event) -> _Outcome:
    stored = await profile_snapshots.apply_configuration(
        conn, event.object, connected_account=event.account
    )
    if stored.result != profile_snapshots.APPLIED:
        return _Outcome(stored.result)
    record = _audit(
        event,
        ACTION_PROFILE_SNAPSHOT,
        None,
        None,
        {
            "configuration": stored.configuration_id,
            "connected_account": event.account,
            "updated": event.object.get("updated"),
            # profile → fields that differ from what the file applied (None: not managed).
            "profiles": stored.profiles,
        },
    )
    return _Outcome("applied", [record])


def _audit(
    event: Event,
    action: str,
    user_id: str | None,
    customer: str | None,
    detail: dict[str, Any],
    *,
    outcome: str = "applied",
) -> AuditEvent:
    return AuditEvent(
        request_id="",
        principal_type=PRINCIPAL_STRIPE,
        principal_id=event.id,
        action=action,
        user_id=user_id,
        outcome=outcome,
        http_status=200,
        stripe_customer_id=customer,
        stripe_request_id=event.request_id,
        detail={"event_type": event.type, "event_created": int(event.created.timestamp())} | detail,
    )
