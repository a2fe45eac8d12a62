"""``portal-gateway sync --from-stripe``: link every Stripe customer that names one of our users.

The bootstrap of SPEC §11. It pages through ``GET /v1/customers`` (100 a
page, newest first) and, for each customer whose
``metadata[STRIPE_USER_METADATA_KEY]`` holds a user id, applies that fact by
the metadata webhooks' own rule (:mod:`service.linking`, one implementation):
an explicit mapping (``import``, ``api``) wins and the fact is a conflict
(audited ``mapping_conflict``); between metadata facts the newer wins. A
sync's fact time is the time its run started reading Stripe, one time for the
whole run, so a webhook decided meanwhile is newer and stands. A customer
naming nobody (no key, deleted, not a user id) is skipped: a sync links, the
webhooks also unlink. When two Stripe customers name one user, the first
listed (the newest customer) is applied and the other is a conflict, so reruns
decide the same way. Each user linked is then backfilled
(``service.backfill``): their subscriptions are read from Stripe so the first
portal call works.

Resumable: after each page is done (links and backfills) its last customer id
is stored in ``sync_cursors``; a rerun starts after it, ``restart`` starts
over, a finished run clears it. The page after a resume may have been cut
short between a link and its backfill, so its unchanged users are backfilled
too (and every unchanged user when a restart replaces an unfinished run).

Every Stripe call (pages, backfills, retries) waits for the process's rate
cap (``service.pacing``, STRIPE_SYNC_REQUESTS_PER_SECOND), then for a place
in the fleet's upstream budget behind portal sessions
(``service.upstream_budget``). ``dry_run`` decides each link inside a
transaction it rolls back: the same rule, nothing written (no mapping,
cursor, audit row or backfill). Every change has its audit row
and the run one ``mapping.sync`` row with the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from service import audit, linking, upstream_budget
from service.audit import ACTION_MAPPING_CONFLICT, ACTION_MAPPING_SYNC, AuditEvent
from service.backfill import Actor, BackfillError, backfill
from service.config import ConfigError, Settings
from service.db import deployment, sync_cursors
from service.db.mappings import SOURCE_METADATA
from service.db.pool import Database
from service.errors import DatabaseUnavailable, ServiceError
from service.linking import MetadataFact
from service.pacing import RateCap
from service.stripe import StripeClient, upstream_error_code

CURSOR_NAME = "customers"
PRINCIPAL_TYPE = "cli"
PRINCIPAL_ID = "sync"
# Backfills in flight at once within a page: enough to reach the cap when a
# call takes Stripe's usual few hundred ms, from a small pool. The cap, not
# this, bounds the calls per second.
MAX_BACKFILL_CONCURRENCY = 8
TYPICAL_STRIPE_SECONDS = 0.4
Skip = Literal["no_key", "deleted", "invalid_user_id"]
# A conflict only a sync sees: two Stripe customers name the same user.
CONFLICT_CLAIMED_TWICE = "claimed_by_two_customers"


class SyncStopped(Exception):
    """The run stopped before the end; ``str()`` is one line. The cursor says where to resume."""

    def __init__(self, message: str, tally: Tally) -> None:
        super().__init__(message)
        self.tally = tally


@dataclass(slots=True)
class Tally:
    """What a run did (or, dry, would do), counted as it goes."""

    dry_run: bool
    rate_cap: float
    # Whether the run picked up an unfinished one, and after which customer.
    resumed: bool = False
    resumed_after: str | None = None
    pages: int = 0
    customers: int = 0
    linked: int = 0
    # Of ``linked``: users re-pointed from another customer of theirs (metadata-sourced).
    relinked: int = 0
    # Metadata mappings that lost their customer to the user it now names.
    unlinked: int = 0
    unchanged: int = 0
    conflicts: int = 0
    # Facts older than one already decided (a webhook during the run): left alone.
    superseded: int = 0
    skipped_no_key: int = 0
    skipped_deleted: int = 0
    skipped_invalid_user_id: int = 0
    backfilled: int = 0
    # One line per user whose backfill failed for good (``resync --user`` repairs it).
    backfill_failures: list[str] = field(default_factory=list)
    stripe_calls: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return self.skipped_no_key + self.skipped_deleted + self.skipped_invalid_user_id

    def detail(self) -> dict[str, Any]:
        """The counts for the summary audit row."""
        counts = asdict(self)
        counts["skipped"] = self.skipped
        counts["backfill_failed"] = len(self.backfill_failures)
        counts["backfill_failures"] = self.backfill_failures[:20]
        return counts


class Progress(Protocol):
    """Told as the run goes; renders it (service/sync_progress.py)."""

    def step(self, tally: Tally, phase: str, done: int, total: int) -> None:
        """``done`` of the page's ``total`` customers linked, or users backfilled (``phase``)."""

    def page_done(self, tally: Tally) -> None: ...

    def finished(self, tally: Tally) -> None: ...


def fact_of(customer: dict[str, Any], key: str, at: datetime) -> MetadataFact | Skip:
    """The fact a listed customer states about one of our users, or why it states none.

    The reading is the webhooks' (:func:`service.linking.fact_from_customer`);
    a sync only links, so a customer naming nobody is skipped, not applied.
    """
    if customer.get("deleted") is True:
        return "deleted"  # Stripe does not list them; a cursor could still be one
    fact = linking.fact_from_customer(customer, key, at=at, connected_account=None)
    if fact is not None and fact.user_id is not None:
        return fact
    metadata = customer.get("metadata")
    raw = metadata.get(key) if isinstance(metadata, dict) else None
    # Stripe removes a key set to "": empty is absent. (A customer id we could
    # not store, which Stripe never lists, is counted with the invalid ones.)
    return "no_key" if fact is not None and raw in (None, "") else "invalid_user_id"


def backfill_concurrency(per_second: float) -> int:
    """Backfills in flight at once for a rate cap (4 at the default 10/s)."""
    return max(1, min(MAX_BACKFILL_CONCURRENCY, math.ceil(per_second * TYPICAL_STRIPE_SECONDS)))


@dataclass(frozen=True, slots=True)
class Options:
    """The command line: ``--dry-run``, ``--restart``."""

    dry_run: bool = False
    restart: bool = False


async def run(settings: Settings, options: Options, progress: Progress) -> Tally:
    """Open the pool and the Stripe session, check key and mode, sync; see the module docstring."""
    key = settings.stripe_user_metadata_key
    if key is None:
        raise ConfigError(
            "STRIPE_USER_METADATA_KEY",
            "sync --from-stripe links customers by this metadata key; set it (e.g. user_id)",
        )
    db = await Database.connect(
        settings.database_url.reveal(),
        query_timeout=10,
        min_size=1,
        max_size=backfill_concurrency(settings.stripe_sync_requests_per_second) + 1,
    )
    session = StripeClient.new_session(settings)
    try:
        # A dry run only reads: it checks a recorded mode without recording one.
        if options.dry_run:
            mapped = await deployment.read_mode(db)
        else:
            mapped = await deployment.record_mode(db, settings.livemode)
        if mapped is not None and mapped != settings.livemode:
            mode = "test" if settings.livemode else "live"
            raise ConfigError("STRIPE_API_KEY", f"the database maps {mode}-mode Stripe ids")
        cap = RateCap(settings.stripe_sync_requests_per_second)
        async with upstream_budget.for_tool(settings) as budget:

            async def pace(deadline: float, *, background: bool) -> None:
                # The tool's own cap, then the fleet's budget, behind portal sessions.
                await cap.wait()
                if budget is not None:
                    await budget.wait(deadline, background=background)

            stripe = StripeClient(session, settings, None, pace=pace, background=True)
            return await sync_customers(db, stripe, cap, key, options, progress)
    finally:
        await session.close()
        await db.close()


async def sync_customers(
    db: Database,
    stripe: StripeClient,
    cap: RateCap,
    key: str,
    options: Options,
    progress: Progress,
) -> Tally:
    """Walk every page from the stored cursor (or the start); returns the counts."""
    run = _Run(db, stripe, cap, key, options, progress)
    tally = run.tally
    try:
        await run.walk()
    except SyncStopped as stopped:
        run.settle()
        progress.finished(tally)
        if not options.dry_run:
            # The stop is what the operator needs to see, even without its row.
            with contextlib.suppress(DatabaseUnavailable):
                await run.audit_summary(outcome="failed", http_status=503, error=str(stopped))
        raise
    run.settle()
    progress.finished(tally)
    if not options.dry_run:
        await run.audit_summary(outcome="applied", http_status=200, error=None)
    return tally


class _Run:
    """One run's state: the fact time, the audit request id, where it resumed."""

    def __init__(
        self,
        db: Database,
        stripe: StripeClient,
        cap: RateCap,
        key: str,
        options: Options,
        progress: Progress,
    ) -> None:
        self.db = db
        self.stripe = stripe
        self.cap = cap
        self.key = key
        self.options = options
        self.progress = progress
        self.tally = Tally(options.dry_run, cap.per_second)
        self.started = time.monotonic()
        # The fact time of every claim of this run (see the module docstring).
        self.read_at = datetime.now(UTC)
        # Every audit row of the run shares it, so the run reads as one.
        self.run_id = uuid.uuid4().hex
        self.actor = Actor(PRINCIPAL_TYPE, PRINCIPAL_ID, self.run_id)
        # Users linked to (or confirmed on) a customer earlier in this run (see _link).
        self.claimed: set[str] = set()

    def settle(self) -> None:
        """Bring the call count and the time up to date."""
        self.tally.stripe_calls = self.cap.calls
        self.tally.seconds = time.monotonic() - self.started

    def _step(self, phase: str, done: int, total: int) -> None:
        self.settle()
        self.progress.step(self.tally, phase, done, total)

    async def walk(self) -> None:
        dry = self.options.dry_run
        stored = await sync_cursors.load_cursor(self.db, CURSOR_NAME)
        # A stored row: the last run was cut short. Its next page may have been
        # cut between a link and its backfill, so that page's unchanged users
        # are backfilled too; a restart can't tell which page that was, so it
        # backfills every unchanged user.
        unfinished = stored is not None
        if self.options.restart:
            cursor, repair_all = None, unfinished
        else:
            cursor, repair_all = (stored.value if stored else None), False
        self.tally.resumed = unfinished and not self.options.restart
        self.tally.resumed_after = cursor
        repair_next = unfinished
        if not dry:
            await sync_cursors.save_cursor(self.db, CURSOR_NAME, cursor)  # a run is under way
        while True:
            try:
                page = await self.stripe.list_customers_page(starting_after=cursor)
            except ServiceError as exc:
                hint = self._resume_hint()
                if cursor is not None and upstream_error_code(exc) == "resource_missing":
                    hint = "the stored cursor is no longer in Stripe: run it with --restart"
                raise SyncStopped(
                    f"Stripe: {_code(exc)} listing customers"
                    f"{f' after {cursor}' if cursor else ''}; {hint}",
                    self.tally,
                ) from None
            self.tally.pages += 1
            await self._page(page.data, repair_next)
            repair_next = repair_all
            if page.data:
                cursor = str(page.data[-1]["id"])
                if not dry:
                    await sync_cursors.save_cursor(self.db, CURSOR_NAME, cursor)
            self.settle()
            self.progress.page_done(self.tally)
            if not page.has_more or not page.data:
                break
        if not dry:
            await sync_cursors.clear_cursor(self.db, CURSOR_NAME)

    def _resume_hint(self) -> str:
        if self.options.dry_run:
            return "nothing was written"
        return "run it again to resume after the last page done"

    async def _page(self, customers: list[dict[str, Any]], repair: bool) -> None:
        """Link the page's customers in list order, then backfill the users that need it."""
        size = len(customers)
        to_backfill: list[str] = []
        for done, customer in enumerate(customers, start=1):
            self.tally.customers += 1
            fact = fact_of(customer, self.key, self.read_at)
            if isinstance(fact, MetadataFact):
                to_backfill += await self._link(fact, repair)
            else:
                self._count_skip(fact)
            self._step("linking", done, size)
        if self.options.dry_run or not to_backfill:
            return
        gate = asyncio.Semaphore(backfill_concurrency(self.tally.rate_cap))
        stopping: list[Exception] = []
        finished = 0

        async def one(user_id: str) -> None:
            nonlocal finished
            async with gate:
                if stopping:
                    return  # the run stops: no new calls, those under way finish
                try:
                    await self._backfill(user_id)
                except Exception as exc:
                    stopping.append(exc)
                finished += 1
                self._step("backfilling", finished, len(to_backfill))

        await asyncio.gather(*(one(u) for u in to_backfill))
        if stopping:
            # Before the cursor passes this page: the rerun does it again.
            raise stopping[0]

    def _count_skip(self, reason: Skip) -> None:
        if reason == "deleted":
            self.tally.skipped_deleted += 1
        elif reason == "invalid_user_id":
            self.tally.skipped_invalid_user_id += 1
        else:
            self.tally.skipped_no_key += 1

    async def _link(self, fact: MetadataFact, repair: bool) -> list[str]:
        """Apply (dry: decide, then roll back) one fact; returns the users to backfill."""
        async with self.db.connection() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                decided = await linking.apply_fact(conn, fact)
                # Another customer listed earlier in this run (a newer one) got
                # this user: re-pointing the user now would flip the mapping
                # back and forth on every run. The first stands; this is a conflict.
                twice = any(
                    c.change == linking.RELINKED and c.user_id in self.claimed
                    for c in decided.changes
                )
                if not twice and not self.options.dry_run:
                    for entry in linking.audit_entries(decided):
                        await audit.emit(conn, None, self._audit_event(entry))
            except BaseException:
                await tx.rollback()
                raise
            if twice or self.options.dry_run:
                await tx.rollback()
            else:
                await tx.commit()
        if twice:
            await self._claimed_twice(fact)
            return []
        self.claimed.update(
            c.user_id
            for c in decided.changes
            if c.change in (linking.LINKED, linking.RELINKED, linking.UNCHANGED)
        )
        return self._count(decided, repair)

    def _count(self, decided: linking.Decided, repair: bool) -> list[str]:
        tally = self.tally
        for change in decided.changes:
            if change.change in (linking.LINKED, linking.RELINKED):
                tally.linked += 1
                tally.relinked += change.change == linking.RELINKED
            elif change.change == linking.UNLINKED:
                tally.unlinked += 1
            else:
                tally.unchanged += 1
        tally.conflicts += bool(decided.conflicts)
        tally.superseded += decided.superseded
        users = decided.linked_users
        if repair:
            users += [c.user_id for c in decided.changes if c.change == linking.UNCHANGED]
        return users

    async def _claimed_twice(self, fact: MetadataFact) -> None:
        self.tally.conflicts += 1
        if self.options.dry_run:
            return
        entry = linking.AuditEntry(
            ACTION_MAPPING_CONFLICT,
            str(fact.user_id),
            fact.customer,
            "conflict",
            {
                "source": SOURCE_METADATA,
                "source_at": int(fact.at.timestamp()),
                "connected_account": None,
                "reason": CONFLICT_CLAIMED_TWICE,
                "metadata_user": fact.user_id,
            },
        )
        await audit.emit(self.db, None, self._audit_event(entry))

    def _audit_event(self, entry: linking.AuditEntry) -> AuditEvent:
        return AuditEvent(
            request_id=self.run_id,
            principal_type=PRINCIPAL_TYPE,
            principal_id=PRINCIPAL_ID,
            action=entry.action,
            user_id=entry.user_id,
            outcome=entry.outcome,
            http_status=200,
            stripe_customer_id=entry.customer,
            detail=entry.detail,
        )

    async def _backfill(self, user_id: str) -> None:
        try:
            await backfill(self.db, self.stripe, None, user_id, actor=self.actor)
        except BackfillError as exc:
            self.tally.backfill_failures.append(str(exc))
        except ServiceError as exc:
            if exc.code != "upstream_rejected":
                # Stripe unavailable, our key refused, the database down: every
                # other user would fail the same way. Stop; the rerun resumes here.
                raise SyncStopped(
                    f"{user_id}: backfill: {_code(exc)}; {self._resume_hint()}", self.tally
                ) from None
            self.tally.backfill_failures.append(f"{user_id}: backfill: {_code(exc)}")
        else:
            self.tally.backfilled += 1

    async def audit_summary(self, *, outcome: str, http_status: int, error: str | None) -> None:
        detail = self.tally.detail()
        if error is not None:
            detail["stopped"] = error
        await audit.emit(
            self.db,
            None,
            AuditEvent(
                request_id=self.run_id,
                principal_type=PRINCIPAL_TYPE,
                principal_id=PRINCIPAL_ID,
                action=ACTION_MAPPING_SYNC,
                outcome=outcome,
                http_status=http_status,
                duration_ms=self.tally.seconds * 1000,
                detail=detail,
            ),
        )


def _code(exc: ServiceError) -> str:
    upstream = upstream_error_code(exc)
    return f"{exc.code} ({upstream})" if upstream else exc.code
