"""Backfills in the background: what a webhook schedules and never waits for.

Stripe wants a webhook answered 2xx within a second, and a backfill lists
Stripe pages; so a webhook that links a user calls :meth:`Backfiller.schedule`
after its transaction and answers at once. The backfiller runs each user's
backfill (``service.backfill``) as a task:

* deduplicated per user: a user already waiting is not queued twice; a user
  whose backfill is running gets one more run after it (the link may have
  changed after that run read the mapping);
* bounded: at most ``concurrency`` backfills talk to Stripe at once, and at
  most ``max_waiting`` users wait (past it a schedule is dropped, logged and
  counted as a failure: the next event for the user, ``sync`` or ``resync``
  repairs it);
* never failing its caller: a failure is a ``backfill_failed`` log line and an
  audit row (action ``mapping.backfill``, outcome ``failed``), counted in
  ``portal_gateway_audit_events_total{outcome="failed"}`` (Stripe's own
  failures are in the upstream metrics too);
* drained on shutdown: :meth:`close` stops new schedules, gives the running
  ones a bounded time, then cancels the rest.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from service import audit
from service.audit import ACTION_MAPPING_BACKFILL
from service.backfill import BACKGROUND, Actor, BackfillError, NoCustomerMapping, backfill
from service.db.pool import Database
from service.errors import ServiceError
from service.metrics import Metrics
from service.stripe import StripeClient, upstream_error_code

log = structlog.get_logger("app")

# Stripe allows 25 requests/s in test mode, 100/s live, shared with the requests we serve.
DEFAULT_CONCURRENCY = 4
DEFAULT_MAX_WAITING = 10_000


class Backfiller:
    """Runs backfills as tracked background tasks; see the module docstring."""

    def __init__(
        self,
        db: Database,
        stripe: StripeClient,
        metrics: Metrics | None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_waiting: int = DEFAULT_MAX_WAITING,
    ) -> None:
        self._db = db
        self._stripe = stripe
        self._metrics = metrics
        self._gate = asyncio.Semaphore(concurrency)
        self._max_waiting = max_waiting
        # user → its task; a task is waiting until it holds the gate, then running.
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: set[str] = set()
        # Users to run once more when their running backfill ends.
        self._again: dict[str, Actor] = {}
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Done-or-failed counts, for tests and logs.
        self.succeeded = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        """Users waiting or running."""
        return len(self._tasks)

    def schedule(self, user_id: str, *, actor: Actor = BACKGROUND) -> bool:
        """Backfill ``user_id`` soon; False if an equivalent run is already due (or closed)."""
        if self._closed:
            log.warning("backfill_not_scheduled", user_id=user_id, reason="shutting_down")
            return False
        if user_id in self._tasks:
            if user_id in self._running and user_id not in self._again:
                self._again[user_id] = actor
                return True
            return False  # it has not read the mapping yet: that run covers this link
        if len(self._tasks) >= self._max_waiting:
            self.failed += 1
            log.warning("backfill_failed", user_id=user_id, error="queue_full")
            return False
        self._start(user_id, actor)
        return True

    async def wait_idle(self) -> None:
        """Return once nothing is waiting or running (bound it with asyncio.timeout)."""
        await self._idle.wait()

    async def close(self, grace: float) -> None:
        """Refuse new schedules, give the running ones ``grace`` seconds, cancel the rest."""
        self._closed = True
        self._again.clear()
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, unfinished = await asyncio.wait(tasks, timeout=grace)
        for task in unfinished:
            task.cancel()
        for task in unfinished:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if unfinished:
            log.warning("backfill_cancelled", users=len(unfinished))

    # --- the tasks -----------------------------------------------------------

    def _start(self, user_id: str, actor: Actor) -> None:
        self._idle.clear()
        task = asyncio.create_task(self._run(user_id, actor), name=f"backfill:{user_id}")
        self._tasks[user_id] = task
        task.add_done_callback(lambda _: self._finished(user_id))

    def _finished(self, user_id: str) -> None:
        self._tasks.pop(user_id, None)
        self._running.discard(user_id)
        again = self._again.pop(user_id, None)
        if again is not None and not self._closed:
            self._start(user_id, again)
        elif not self._tasks:
            self._idle.set()

    async def _run(self, user_id: str, actor: Actor) -> None:
        async with self._gate:
            self._running.add(user_id)
            try:
                done = await backfill(self._db, self._stripe, self._metrics, user_id, actor=actor)
            except NoCustomerMapping:
                # Unlinked again before its turn: nothing to backfill, nothing wrong.
                log.info("backfill_skipped", user_id=user_id, reason="no_customer_mapping")
                return
            except Exception as exc:  # a background task must not die unobserved
                self.failed += 1
                await self._record_failure(user_id, actor, exc)
                return
        self.succeeded += 1
        log.info(
            "backfill_done",
            user_id=user_id,
            written=len(done.written),
            removed=len(done.removed),
            stripe_account=done.connected_account,
        )

    async def _record_failure(self, user_id: str, actor: Actor, exc: Exception) -> None:
        """A log line and an audit row (outcome ``failed``); neither may raise."""
        error_code, upstream = _describe(exc)
        log.warning(
            "backfill_failed",
            user_id=user_id,
            error=error_code,
            upstream_code=upstream,
            detail=str(exc),
            exc_info=not isinstance(exc, BackfillError | ServiceError),
        )
        event = actor.audit_event(
            ACTION_MAPPING_BACKFILL,
            user_id,
            outcome="failed",
            http_status=exc.status if isinstance(exc, ServiceError) else 500,
            error_code=error_code,
            stripe_request_id=exc.stripe_request_id if isinstance(exc, ServiceError) else None,
            detail={"error": str(exc)[:500], "upstream_code": upstream},
        )
        # emit has logged and counted a row it could not write (write_failed).
        with contextlib.suppress(Exception):
            await audit.emit(self._db, self._metrics, event)


def _describe(exc: Exception) -> tuple[str, str | None]:
    """A bounded error code for logs and the audit row, and Stripe's code if any."""
    if isinstance(exc, ServiceError):
        return exc.code, upstream_error_code(exc)
    if isinstance(exc, BackfillError):
        return exc.code, None
    return "internal_error", None
