"""Backfill: make one user's subscription rows what Stripe lists for their customer now.

The one implementation behind every "read it from Stripe" (SPEC §11 backfill
on link, §4 ``resync``): read the user's customer mapping, list every
subscription of that customer (``GET /v1/subscriptions?customer=…&status=all``,
all pages, with ``Stripe-Account`` when the customer lives on a connected
account), then in one transaction upsert what Stripe lists (our
``external_ref`` stays with ids that remain), remove the rows Stripe does not
list, clear stale marks, and write an audit row. A row that a webhook event
newer than the read has already changed is left alone, so running it while
events flow is safe; a mapping that moved while Stripe was read is not
rewritten (:class:`MappingMoved`).

Errors: Stripe's refusals propagate as ``ServiceError`` (a customer Stripe does
not know is first marked stale); everything else is a :class:`BackfillError`
whose message is one line naming the user.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from service import audit
from service.audit import ACTION_MAPPING_BACKFILL, AuditEvent
from service.db import mappings
from service.db.mappings import CustomerMapping
from service.db.pool import Database
from service.domain import SubscriptionState, subscription_state
from service.errors import DatabaseUnavailable, ServiceError
from service.metrics import Metrics
from service.stripe import StripeClient, upstream_error_code


class BackfillError(Exception):
    """The user's rows were not rewritten; ``str()`` is one line naming the user."""

    # A bounded name for logs, audit rows and answers.
    code = "backfill_failed"

    def __init__(self, user_id: str, problem: str) -> None:
        super().__init__(f"{user_id}: {problem}")
        self.user_id = user_id
        self.problem = problem


class NoCustomerMapping(BackfillError):
    """The user has no customer mapping (nothing to backfill)."""

    code = "no_customer_mapping"

    def __init__(self, user_id: str) -> None:
        super().__init__(user_id, "no customer is mapped for this user")


class NotListable(BackfillError):
    """An Accounts v2 mapping: Stripe lists subscriptions by ``cus_`` customer."""

    code = "not_listable"

    def __init__(self, user_id: str) -> None:
        super().__init__(
            user_id,
            "mapped to an Accounts v2 account; Stripe's subscriptions are listed by customer",
        )


class MappingMoved(BackfillError):
    """The customer mapping changed while Stripe was being read; run it again."""

    code = "mapping_moved"

    def __init__(self, user_id: str) -> None:
        super().__init__(user_id, "the customer mapping changed meanwhile; run it again")


class UnstorableSubscription(BackfillError):
    """Stripe listed a subscription our schema cannot hold."""

    code = "unstorable_subscription"

    def __init__(self, user_id: str) -> None:
        super().__init__(user_id, "Stripe listed a subscription we cannot store")


class RewriteRefused(BackfillError):
    """The database refused the rows (a constraint); nothing was changed."""

    code = "rewrite_refused"

    def __init__(self, user_id: str, error: asyncpg.PostgresError) -> None:
        super().__init__(user_id, f"the database refused the rewrite ({error})")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who the audit row names: the CLI, a webhook event, an API client, the app itself."""

    principal_type: str
    principal_id: str
    request_id: str | None = None

    def audit_event(self, action: str, user_id: str, **decided: Any) -> AuditEvent:
        """An audit event of this actor about ``user_id`` (a fresh request id if none)."""
        return AuditEvent(
            request_id=self.request_id or uuid.uuid4().hex,
            principal_type=self.principal_type,
            principal_id=self.principal_id,
            action=action,
            user_id=user_id,
            **decided,
        )


# The app's own background backfills (after a webhook linked a user).
BACKGROUND = Actor("system", "backfill")


@dataclass(frozen=True, slots=True)
class Backfilled:
    """What one backfill did."""

    user_id: str
    stripe_customer_id: str
    connected_account: str | None
    # Every subscription id Stripe listed for the customer.
    listed: list[str]
    # The rows written (an event newer than the read keeps its row and is not here).
    written: list[str]
    # The rows removed because Stripe does not list them.
    removed: list[str]


async def backfill(
    db: Database,
    stripe: StripeClient,
    metrics: Metrics | None,
    user_id: str,
    *,
    action: str = ACTION_MAPPING_BACKFILL,
    actor: Actor = BACKGROUND,
) -> Backfilled:
    """Rewrite ``user_id``'s subscription rows from Stripe; see the module docstring."""
    async with db.connection() as conn:
        customer = await mappings.find_customer(conn, user_id)
    if customer is None:
        raise NoCustomerMapping(user_id)
    return await backfill_customer(db, stripe, metrics, customer, action=action, actor=actor)


async def backfill_customer(
    db: Database,
    stripe: StripeClient,
    metrics: Metrics | None,
    customer: CustomerMapping,
    *,
    action: str = ACTION_MAPPING_BACKFILL,
    actor: Actor = BACKGROUND,
) -> Backfilled:
    """:func:`backfill` for a mapping already read (``resync --all`` pages through them)."""
    user_id, stripe_id = customer.user_id, customer.stripe_customer_id
    if stripe_id is None:
        raise NotListable(user_id)
    read_at = datetime.now(UTC)
    try:
        listed = await stripe.list_subscriptions(
            stripe_id, stripe_account=customer.connected_account
        )
    except ServiceError as exc:
        if upstream_error_code(exc) == "resource_missing":
            await _mark_stale(db, metrics, user_id, stripe_id)
        raise
    subs: list[SubscriptionState] = []
    for obj in listed:
        state = subscription_state(obj)
        if state is None:
            raise UnstorableSubscription(user_id)
        # status=all lists by customer; anything else Stripe sent is not this user's.
        if state.customer == stripe_id:
            subs.append(state)
    try:
        rewritten = await _rewrite(db, metrics, customer, subs, read_at, action, actor)
    except asyncpg.PostgresError as exc:
        # A constraint the rows broke: name it; the transaction rolled back.
        raise RewriteRefused(user_id, exc) from None
    return Backfilled(
        user_id=user_id,
        stripe_customer_id=stripe_id,
        connected_account=customer.connected_account,
        listed=[s.id for s in subs],
        written=rewritten.written,
        removed=rewritten.removed,
    )


async def _mark_stale(db: Database, metrics: Metrics | None, user_id: str, stripe_id: str) -> None:
    """Stripe has no such customer: the mapping is stale (counted once, like the request path)."""
    try:
        newly_marked = await mappings.mark_stale(db, "customer", user_id, stripe_id)
    except DatabaseUnavailable:
        return  # the caller still gets Stripe's error; the next refusal marks it
    if newly_marked and metrics is not None:
        metrics.stale_mappings.labels(kind="customer").inc()


async def _rewrite(
    db: Database,
    metrics: Metrics | None,
    customer: CustomerMapping,
    subs: list[SubscriptionState],
    read_at: datetime,
    action: str,
    actor: Actor,
) -> mappings.Rewritten:
    user_id = customer.user_id
    async with db.connection() as conn, conn.transaction():
        rewritten = await mappings.rewrite_subscriptions(conn, customer, subs, read_at)
        if rewritten is None:
            raise MappingMoved(user_id)
        detail: dict[str, object] = {
            "listed": [s.id for s in subs],
            "written": rewritten.written,
            "removed": rewritten.removed,
        }
        if customer.connected_account is not None:
            detail["stripe_account"] = customer.connected_account
        event = actor.audit_event(
            action,
            user_id,
            outcome="applied",
            http_status=200,
            stripe_customer_id=customer.stripe_customer_id,
            detail=detail,
        )
        await audit.emit(conn, metrics, event)
    return rewritten
