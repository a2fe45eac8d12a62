"""``portal-gateway resync``: rewrite subscription mappings from what Stripe has now.

The tool for after a webhook outage, a bad import or stale marks: for each
user, the backfill of SPEC §11 (``service.backfill``, the one implementation):
read every subscription of their customer from Stripe, all pages, and rewrite
the user's rows in one transaction, audited as ``mapping.resync``. Here every
failure is one line naming the user; ``--all`` reports it and goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from service import upstream_budget
from service.audit import ACTION_MAPPING_RESYNC
from service.backfill import Actor, BackfillError, NoCustomerMapping, backfill_customer
from service.config import ConfigError, Settings
from service.db import deployment, mappings
from service.db.mappings import CustomerMapping
from service.db.pool import Database
from service.errors import ServiceError
from service.stripe import StripeClient, upstream_error_code

# Users resynced at once by --all: Stripe's rate limit is 25 requests/s in
# test mode and 100/s live, shared with the serving replicas.
ALL_CONCURRENCY = 4
_PAGE = 500
_CLI = Actor("cli", "resync")


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
        raise ResyncFailed(str(NoCustomerMapping(user_id)))
    return await _resync(db, stripe, customer)


async def _resync(db: Database, stripe: StripeClient, customer: CustomerMapping) -> UserResynced:
    try:
        done = await backfill_customer(
            db, stripe, None, customer, action=ACTION_MAPPING_RESYNC, actor=_CLI
        )
    except BackfillError as exc:
        raise ResyncFailed(str(exc)) from None
    except ServiceError as exc:
        user_id, code = customer.user_id, upstream_error_code(exc)
        if code == "resource_missing":
            # backfill_customer has marked the mapping stale.
            raise ResyncFailed(
                f"{user_id}: Stripe has no customer {customer.stripe_customer_id};"
                " the mapping is marked stale"
            ) from None
        raise ResyncFailed(f"{user_id}: Stripe: {exc.code}{f' ({code})' if code else ''}") from None
    return UserResynced(done.user_id, len(done.written), done.removed)


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
        async with upstream_budget.for_tool(settings) as budget:
            pace = budget.wait if budget is not None else None
            stripe = StripeClient(session, settings, None, pace=pace, background=True)
            if user_id is None:
                return await resync_all(db, stripe, report)
            done = await resync_user(db, stripe, user_id)
            report(
                f"{done.user_id}: {done.written} subscriptions written, {len(done.removed)} removed"
            )
            return Summary(resynced=1)
    finally:
        await session.close()
        await db.close()
