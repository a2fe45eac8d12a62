"""The mapping API's use cases (SPEC §11): put, read and remove one user's customer mapping.

For service clients that register a customer the moment they create it, so the
user's first portal call works without an import:

* :func:`put_customer` checks what it can on our side (another user already
  maps the id → 409; an unknown portal profile → 404), asks Stripe that the
  customer exists, is not deleted and is of our test/live mode (else 422
  ``stripe_customer_not_found``), writes the mapping as an explicit one
  (source ``api``: it wins over metadata) and backfills the user's
  subscriptions inline, within the request's deadline. A backfill that fails
  leaves the mapping written: the answer says ``backfill: "failed"`` and the
  next event, ``sync`` or ``resync`` completes it.
* :func:`read_user` and :func:`delete_customer` are one round trip each.

An Accounts v2 id (``stripe_account_id``, ``acct_…``) is written without a
Stripe check: Stripe has no ``GET /v1`` endpoint for it (Accounts v2 live
under ``/v2/core/accounts``, which neither the client nor the stand-in
speaks), and subscriptions are listed by ``cus_`` customer, so its backfill is
``skipped``. Knows nothing of HTTP: the protected pipeline and the handler in
``handlers/users.py`` do auth, validation, audit and the response.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from service.audit import AuditEvent
from service.auth import Principal
from service.backfill import Actor, BackfillError, NotListable, backfill
from service.config import Settings
from service.db import users
from service.db.pool import Database
from service.db.users import CustomerWrite, PutResult, UserMapping
from service.errors import Conflict, NotFound, ServiceError, StripeCustomerNotFound
from service.metrics import Metrics
from service.stripe import StripeClient, upstream_error_code

log = structlog.get_logger("app")

# The `source` of what the API writes: explicit, it wins over Stripe metadata.
SOURCE_API = "api"
# What the PUT's answer says of the inline backfill.
BACKFILL_OK, BACKFILL_FAILED, BACKFILL_SKIPPED = "ok", "failed", "skipped"


@dataclass(frozen=True, slots=True)
class MappingApiDeps:
    """What the use cases need from the application."""

    settings: Settings
    db: Database
    stripe: StripeClient
    metrics: Metrics


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """A written mapping: new or not, as it now reads, and how the backfill went."""

    created: bool
    mapping: UserMapping
    backfill: str


async def put_customer(
    deps: MappingApiDeps,
    principal: Principal,
    user_id: str,
    body: dict[str, Any],
    *,
    audit: AuditEvent,
    deadline: float,
) -> PutOutcome:
    """Verify with Stripe, write (source ``api``), backfill; raise a ServiceError otherwise."""
    write = CustomerWrite(
        user_id=user_id,
        stripe_customer_id=body.get("stripe_customer_id"),
        stripe_account_id=body.get("stripe_account_id"),
        connected_account=body.get("connected_account"),
        portal=body.get("portal"),
        locale=body.get("locale"),
    )
    audit.user_id = user_id
    audit.stripe_customer_id = write.stripe_customer_id or write.stripe_account_id
    field = "stripe_customer_id" if write.stripe_customer_id else "stripe_account_id"

    # Our own checks first: no Stripe call for a request we would refuse anyway.
    lookup = await users.put_lookup(deps.db, write)
    if lookup.owner is not None:
        audit.detail = {"mapped_to": lookup.owner}
        raise _already_mapped(field)
    if not lookup.portal_found:
        raise _unknown_portal()

    verified = await _verify_with_stripe(deps, write, audit)
    try:
        written = await users.put_customer(deps.db, write)
    except users.CustomerTaken:
        raise _already_mapped(field) from None
    except users.PortalMissing:
        raise _unknown_portal() from None
    change = _change(written, write)
    deps.metrics.mapping_changes.labels(source=SOURCE_API, change=change).inc()

    backfilled = await _backfill(deps, principal, user_id, audit, deadline)
    audit.detail = {
        "change": change,
        "verified": verified,
        "backfill": backfilled,
        "previous": written.previous_customer_id or written.previous_account_id,
        "dropped_subscriptions": written.dropped,
    }
    mapping = await users.read_user(deps.db, user_id)
    if mapping is None:
        # A DELETE for this user committed between our write and this read.
        raise NotFound("unknown_user", "The mapping was removed while it was being written.")
    return PutOutcome(created=written.inserted, mapping=mapping, backfill=backfilled)


async def read_user(deps: MappingApiDeps, user_id: str, *, audit: AuditEvent) -> UserMapping:
    """The user's mapping and subscriptions; 404 ``unknown_user`` without a mapping."""
    audit.user_id = user_id
    mapping = await users.read_user(deps.db, user_id)
    if mapping is None:
        raise _unknown_user()
    audit.stripe_customer_id = mapping.stripe_customer_id or mapping.stripe_account_id
    return mapping


async def delete_customer(deps: MappingApiDeps, user_id: str, *, audit: AuditEvent) -> None:
    """Remove the user's mapping and subscriptions; 404 ``unknown_user`` without a mapping."""
    audit.user_id = user_id
    deleted = await users.delete_user_customer(deps.db, user_id)
    if deleted is None:
        raise _unknown_user()
    deps.metrics.mapping_changes.labels(source=SOURCE_API, change="unlinked").inc()
    audit.stripe_customer_id = deleted.stripe_customer_id or deleted.stripe_account_id
    audit.detail = {
        "change": "unlinked",
        "source": deleted.source,
        "subscriptions": deleted.subscriptions,
    }


async def _verify_with_stripe(
    deps: MappingApiDeps, write: CustomerWrite, audit: AuditEvent
) -> bool:
    """That Stripe has the customer (on the connected account, if named), not
    deleted, in our mode; False for an Accounts v2 id, which is not checked."""
    customer_id = write.stripe_customer_id
    if customer_id is None:
        return False
    account = write.connected_account
    where = f" on the connected account {account}" if account else ""
    try:
        customer = await deps.stripe.retrieve_customer(customer_id, stripe_account=account)
    except ServiceError as exc:
        audit.stripe_request_id = exc.stripe_request_id
        if upstream_error_code(exc) == "resource_missing":
            raise _customer_not_found(f"Stripe has no customer {customer_id}{where}.") from None
        raise
    if customer.get("deleted") is True:
        raise _customer_not_found(f"The customer {customer_id} is deleted in Stripe.")
    ours = deps.settings.livemode
    if customer.get("livemode") is not ours:
        theirs, mode = ("test", "live") if ours else ("live", "test")
        raise _customer_not_found(
            f"The customer {customer_id} is a {theirs}-mode customer; "
            f"this service maps {mode}-mode ids."
        )
    return True


async def _backfill(
    deps: MappingApiDeps, principal: Principal, user_id: str, audit: AuditEvent, deadline: float
) -> str:
    """The user's subscriptions from Stripe, within the request's deadline.

    Never fails the request: the mapping is written already, and a failed
    backfill is completed by the next event for the user, ``sync`` or ``resync``.
    """
    actor = Actor(principal.type, principal.id, audit.request_id)
    try:
        async with asyncio.timeout_at(deadline):
            await backfill(deps.db, deps.stripe, deps.metrics, user_id, actor=actor)
    except NotListable:
        return BACKFILL_SKIPPED
    except (BackfillError, ServiceError, TimeoutError) as exc:
        reason = exc.code if isinstance(exc, ServiceError) else type(exc).__name__
        log.warning("mapping_backfill_failed", user_id=user_id, reason=reason)
        return BACKFILL_FAILED
    return BACKFILL_OK


def _change(written: PutResult, write: CustomerWrite) -> str:
    """linked (new), relinked (another customer, or the same id on another account), unchanged."""
    if written.inserted:
        return "linked"
    same = (
        written.previous_customer_id == write.stripe_customer_id
        and written.previous_account_id == write.stripe_account_id
        and written.previous_connected_account == write.connected_account
    )
    return "unchanged" if same else "relinked"


def _already_mapped(field: str) -> Conflict:
    return Conflict(
        "customer_already_mapped",
        "Another user is mapped to this Stripe id; delete that mapping first.",
        extra={"field": field},
    )


def _unknown_portal() -> NotFound:
    return NotFound("unknown_portal", "No portal profile has this name.", extra={"field": "portal"})


def _unknown_user() -> NotFound:
    return NotFound("unknown_user", "No Stripe customer is mapped for this user.")


def _customer_not_found(detail: str) -> StripeCustomerNotFound:
    return StripeCustomerNotFound(detail=detail, extra={"field": "stripe_customer_id"})
