"""The webhook use case: verify a Stripe event, then apply it to the mapping.

Reads top to bottom: check ``Stripe-Signature`` against every configured
secret → parse the event → in one transaction claim its id (a replay changes
nothing), apply it (ordering is left to the SQL in ``db/webhooks.py``), write
the audit row → count it. It knows nothing of HTTP beyond the errors it raises;
``handlers/webhooks.py`` reads the body and writes the answer.

Anything Stripe sent and signed that we cannot use (an unknown customer, an
event type we do not handle, an object we cannot read) is recorded and
answered 200: a non-2xx would only make Stripe retry it for days.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from service.audit import AuditEvent, clean_ip
from service.config import Secret, Settings
from service.db import webhooks as wdb
from service.db.pool import Database
from service.db.webhooks import SubscriptionState
from service.errors import BadRequest
from service.metrics import Metrics
from service.schemas import SUBSCRIPTION_STATUSES

log = structlog.get_logger("app")
audit_log = structlog.get_logger("audit")

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
HANDLED_EVENTS = SUBSCRIPTION_EVENTS | {CUSTOMER_DELETED}
# Metric label for requests refused before the event could be read.
UNVERIFIED = "unverified"

PRINCIPAL_STRIPE = "stripe"
ACTION_MAPPING_CREATE = "mapping.create"
ACTION_MAPPING_UPDATE = "mapping.update"
ACTION_MAPPING_DELETE = "mapping.delete"


@dataclass(frozen=True, slots=True)
class WebhookDeps:
    """What the use case needs from the application."""

    settings: Settings
    db: Database
    metrics: Metrics


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
    return event_type if event_type in HANDLED_EVENTS else "other"


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
    return Event(
        id=event_id,
        type=event_type,
        created=datetime.fromtimestamp(created, UTC),
        livemode=livemode,
        object=obj,
        request_id=request_id if isinstance(request_id, str) else None,
    )


def _invalid(why: str) -> BadRequest:
    return BadRequest("invalid_event", f"Not a Stripe event: {why}.")


def subscription_state(obj: dict[str, Any]) -> SubscriptionState | None:
    """A Stripe subscription object as a mapping row; None if it is not one we can store."""
    sub_id, status = obj.get("id"), obj.get("status")
    if not isinstance(sub_id, str) or not sub_id.startswith("sub_") or len(sub_id) <= 4:
        return None
    if status not in SUBSCRIPTION_STATUSES:
        return None
    customer = _stripe_id(obj.get("customer"), "cus_")
    account = _stripe_id(obj.get("customer_account"), "acct_")
    if customer is None and account is None:
        return None
    items = obj.get("items")
    items = items if isinstance(items, dict) else {}
    data = items.get("data")
    item_id = price_id = quantity = None
    # Exactly one item is updatable through the portal; several are recorded
    # as item_id NULL (SPEC §4: "not updatable").
    if isinstance(data, list) and len(data) == 1 and not items.get("has_more"):
        item = data[0] if isinstance(data[0], dict) else {}
        item_id = _stripe_id(item.get("id"), "si_")
        # Legacy plan-based prices can carry custom ids; only price_ ids are stored.
        price_id = _stripe_id(item.get("price"), "price_")
        raw_quantity = item.get("quantity")
        if isinstance(raw_quantity, int) and not isinstance(raw_quantity, bool):
            quantity = raw_quantity if raw_quantity >= 0 else None
    return SubscriptionState(
        id=sub_id,
        customer=customer,
        account=account,
        status=str(status),
        item_id=item_id,
        price_id=price_id,
        quantity=quantity,
    )


def _stripe_id(value: Any, prefix: str) -> str | None:
    """An id given as a string or as an expanded object, if it has the prefix."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, str) and value.startswith(prefix) and len(value) > len(prefix):
        return value
    return None


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
        result, audit = await _apply(deps, event, request_id, client_ip, user_agent)
    except Exception:
        # Stripe retries a non-2xx: the transaction rolled back, so the retry starts clean.
        metrics.labels(type=label, result="error").inc()
        raise
    metrics.labels(type=label, result=result).inc()
    log.info("webhook_event", event_id=event.id, event_type=event.type, result=result)
    if audit is not None:
        deps.metrics.audit_events.labels(outcome=audit.outcome).inc()
        fields = asdict(audit)
        fields["occurred_at"] = audit.occurred_at.isoformat()
        audit_log.info("audit", **fields)
    return Receipt(event.id, event.type, result)


async def _apply(
    deps: WebhookDeps,
    event: Event,
    request_id: str,
    client_ip: str | None,
    user_agent: str | None,
) -> tuple[str, AuditEvent | None]:
    """One transaction: claim the id, apply, audit, record the result."""
    db = deps.db
    sub = subscription_state(event.object) if event.type in SUBSCRIPTION_EVENTS else None
    customer = (sub.customer or sub.account) if sub else _stripe_id(event.object.get("id"), "cus_")
    object_id = event.object.get("id")
    audit: AuditEvent | None = None
    started = time.perf_counter()
    async with db.connection() as conn, conn.transaction():
        claimed = await wdb.claim_event(
            conn,
            event.id,
            event.type,
            event.created,
            customer if event.type in HANDLED_EVENTS else None,
            object_id if isinstance(object_id, str) else None,
        )
        if not claimed:
            return "duplicate", None
        if event.livemode != deps.settings.livemode:
            # Signed with this endpoint's secret, but for the other mode's ids.
            result = "livemode_mismatch"
        elif event.type in SUBSCRIPTION_EVENTS:
            result, audit = await _apply_subscription(conn, event, sub)
        elif event.type == CUSTOMER_DELETED:
            result, audit = await _apply_customer_deleted(conn, event, customer)
        else:
            result = "unhandled"
        if audit is not None:
            audit.request_id = request_id
            audit.client_ip = clean_ip(client_ip)
            audit.user_agent = user_agent[:512] if user_agent else None
            audit.duration_ms = (time.perf_counter() - started) * 1000
            await wdb.insert_audit(conn, audit)
        await wdb.finish_event(conn, event.id, result)
    deps.metrics.db_duration.labels(query="webhook_apply").observe(time.perf_counter() - started)
    if result == "unknown_customer":
        log.warning("webhook_unknown_customer", event_id=event.id, customer=customer)
    return result, audit


async def _apply_subscription(
    conn: wdb.Conn, event: Event, sub: SubscriptionState | None
) -> tuple[str, AuditEvent | None]:
    if sub is None:
        log.warning("webhook_invalid_object", event_id=event.id, event_type=event.type)
        return "invalid_object", None
    applied = await wdb.apply_subscription(
        conn,
        sub,
        event.created,
        deletion=event.type == "customer.subscription.deleted",
        creation=event.type == "customer.subscription.created",
    )
    if applied.user_id is None:
        return "unknown_customer", None
    if not applied.applied:
        # Older than what the row holds, or the subscription is already deleted.
        return "superseded", None
    audit = _audit(
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
    return "applied", audit


async def _apply_customer_deleted(
    conn: wdb.Conn, event: Event, customer: str | None
) -> tuple[str, AuditEvent | None]:
    if customer is None:
        log.warning("webhook_invalid_object", event_id=event.id, event_type=event.type)
        return "invalid_object", None
    deleted = await wdb.delete_customer(conn, customer)
    if deleted is None:
        return "unknown_customer", None
    user_id, subscriptions = deleted
    audit = _audit(
        event, ACTION_MAPPING_DELETE, user_id, customer, {"subscriptions": subscriptions}
    )
    return "applied", audit


def _audit(
    event: Event, action: str, user_id: str, customer: str | None, detail: dict[str, Any]
) -> AuditEvent:
    return AuditEvent(
        request_id="",
        principal_type=PRINCIPAL_STRIPE,
        principal_id=event.id,
        action=action,
        client_ip=None,
        user_agent=None,
        user_id=user_id,
        outcome="applied",
        http_status=200,
        stripe_customer_id=customer,
        stripe_request_id=event.request_id,
        detail={"event_type": event.type, "event_created": int(event.created.timestamp())} | detail,
    )
