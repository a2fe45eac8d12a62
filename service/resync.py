"""``portal-gateway resync``: rewrite subscription mappings from what Stripe has now.

The tool for after a webhook outage, a bad import or stale marks: for each
user, read every subscription of their customer from Stripe
(``GET /v1/subscriptions?customer=…&status=all``, all pages), then in one
transaction upsert what Stripe lists (our ``external_ref`` stays with ids that
remain), remove the rows Stripe does not list, clear stale marks, and write an
audit row. A row that a webhook event newer than the read has already changed
is left alone, so running it while events flow is safe.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from service import audit
from service.audit import ACTION_MAPPING_RESYNC, AuditEvent
from service.config import ConfigError, Settings
from service.db import deployment, mappings
from service.db.mappings import CustomerMapping
from service.db.pool import Database
from service.domain import SubscriptionState, subscription_state
from service.errors import ServiceError
from service.stripe import StripeClient, upstream_error_code

# Users resynced at once by --all: Stripe's rate limit is 25 requests/s in
# test mode and 100/s live, shared with the serving replicas.
ALL_CONCURRENCY = 4
_PAGE = 500


class ResyncFailed(Exception):
    """One user could not be resynced; the message is one line naming it."""


@dataclass(frozen=True, slots=True)
class UserResynced:
    user_id: str
    written: int
    removed: list[str]


@dataclass(slots=True)
class Summary:
    resynced: int = 0
    skipped: int = 0
    failed: int = 0


async def resync_user(db: Database, stripe: StripeClient, user_id: str) -> UserResynced:
    """Rewrite one user's subscription rows from Stripe."""
    async with db.connection() as conn:
        customer = await mappings.find_customer(conn, user_id)
    if customer is None:
        raise ResyncFailed(f"{user_id}: no customer is mapped for this user")
    return await _resync(db, stripe, customer)


async def _resync(db: Database, stripe: StripeClient, customer: CustomerMapping) -> UserResynced:
    user_id, stripe_id = customer.user_id, customer.stripe_customer_id
    if stripe_id is None:
        raise ResyncFailed(
            f"{user_id}: mapped to an Accounts v2 account; resync lists subscriptions by customer"
        )
    read_at = datetime.now(UTC)
    try:
        listed = await stripe.list_subscriptions(stripe_id)
    except ServiceError as exc:
        if upstream_error_code(exc) == "resource_missing":
            await mappings.mark_stale(db, "customer", user_id, stripe_id)
            raise ResyncFailed(
                f"{user_id}: Stripe has no customer {stripe_id}; the mapping is marked stale"
            ) from None
        code = upstream_error_code(exc)
        raise ResyncFailed(f"{user_id}: Stripe: {exc.code}{f' ({code})' if code else ''}") from None
    subs: list[SubscriptionState] = []
    for obj in listed:
        state = subscription_state(obj)
        if state is None:
            raise ResyncFailed(f"{user_id}: Stripe listed a subscription we cannot store")
        if state.customer == stripe_id:
            subs.append(state)
    try:
        rewritten = await _rewrite(db, customer, subs, read_at)
    except asyncpg.PostgresError as exc:
        # A constraint the rows broke: name it, roll back this user, go on with the others.
        raise ResyncFailed(f"{user_id}: the database refused the rewrite ({exc})") from None
    return UserResynced(user_id, len(rewritten.written), rewritten.removed)


async def _rewrite(
    db: Database, customer: CustomerMapping, subs: list[SubscriptionState], read_at: datetime
) -> mappings.Rewritten:
    user_id, stripe_id = customer.user_id, customer.stripe_customer_id
    async with db.connection() as conn, conn.transaction():
        rewritten = await mappings.rewrite_subscriptions(conn, customer, subs, read_at)
        if rewritten is None:
            raise ResyncFailed(f"{user_id}: the customer mapping changed meanwhile; run it again")
        await audit.emit(
            conn,
            None,
            AuditEvent(
                request_id=uuid.uuid4().hex,
                principal_type="cli",
                principal_id="resync",
                action=ACTION_MAPPING_RESYNC,
                user_id=user_id,
                outcome="applied",
                http_status=200,
                stripe_customer_id=stripe_id,
                detail={
                    "listed": [s.id for s in subs],
                    "written": rewritten.written,
                    "removed": rewritten.removed,
                },
            ),
        )
    return rewritten


async def resync_all(db: Database, stripe: StripeClient, report: Callable[[str], None]) -> Summary:
    """Every user with a customer mapping, a few at a time; failures are reported, not fatal."""
    summary = Summary()
    gate = asyncio.Semaphore(ALL_CONCURRENCY)

    async def one(customer: CustomerMapping) -> None:
        if customer.stripe_customer_id is None:
            summary.skipped += 1
            return
        async with gate:
            try:
                await _resync(db, stripe, customer)
            except ResyncFailed as exc:
                summary.failed += 1
                report(str(exc))
            else:
                summary.resynced += 1

    after = ""
    while True:
        async with db.connection() as conn:
            page = await mappings.customers_after(conn, after, _PAGE)
        if not page:
            return summary
        await asyncio.gather(*(one(c) for c in page))
        after = page[-1].user_id


async def run(settings: Settings, user_id: str | None, report: Callable[[str], None]) -> Summary:
    """Open the pool and the Stripe session, check the mode, resync one user or all."""
    db = await Database.connect(
        settings.database_url.reveal(), query_timeout=10, min_size=1, max_size=ALL_CONCURRENCY + 1
    )
    session = StripeClient.new_session(settings)
    try:
        if await deployment.record_mode(db, settings.livemode) != settings.livemode:
            mode = "test" if settings.livemode else "live"
            raise ConfigError("STRIPE_API_KEY", f"the database maps {mode}-mode Stripe ids")
        stripe = StripeClient(session, settings, None)
        if user_id is None:
            return await resync_all(db, stripe, report)
        done = await resync_user(db, stripe, user_id)
        report(f"{done.user_id}: {done.written} subscriptions written, {len(done.removed)} removed")
        return Summary(resynced=1)
    finally:
        await session.close()
        await db.close()
