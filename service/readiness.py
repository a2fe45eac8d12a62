"""The readiness verdict of ``/readyz`` (and of ``portal_gateway_ready`` at scrape time).

Ready = the database answers within its bound, migrations are at head, and
the replica is not draining. Kubelets, load balancers and Prometheus may ask
many times a second; the database is asked at most once per
:data:`MAX_AGE_SECONDS`, and everyone else gets that answer (concurrent
probes share the one query in progress). Draining is read live: a replica
turns unready the moment SIGTERM lands, whatever the cached database answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from service.db import deployment
from service.db.pool import Database
from service.errors import ServiceError
from service.lifecycle import Lifecycle
from service.metrics import Metrics

MAX_AGE_SECONDS = 1.0


class Readiness:
    """One replica's readiness, with the database check cached for ``max_age`` seconds."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: Metrics,
        *,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._max_age = max_age
        self.clock = clock  # tests move time forward without sleeping
        self._checked_at: float | None = None
        self._database: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def verdict(self, db: Database) -> tuple[bool, dict[str, str]]:
        """Whether to take traffic, and the checks behind it; also sets the gauge."""
        checks = dict(await self._database_checks(db))
        draining = self._lifecycle.draining
        if draining:
            checks["draining"] = "yes"
        ready = not draining and checks.get("migrations") == "ok"
        self._metrics.ready.set(1 if ready else 0)
        return ready, checks

    async def _database_checks(self, db: Database) -> dict[str, str]:
        if self._fresh():
            return self._database
        async with self._lock:
            # Whoever waited on the lock finds the answer of the query it waited for.
            if not self._fresh():
                self._database = await self._ask(db)
                # The age counts from the answer: a slow (timed-out) check is not
                # repeated at once by the probes that queued behind it.
                self._checked_at = self.clock()
        return self._database

    def _fresh(self) -> bool:
        return self._checked_at is not None and self.clock() - self._checked_at < self._max_age

    async def _ask(self, db: Database) -> dict[str, str]:
        try:
            revision = await asyncio.wait_for(deployment.current_revision(db), timeout=db.timeout)
        except (ServiceError, TimeoutError):
            return {"database": "unavailable"}
        at_head = revision == self._lifecycle.migrations_head
        return {"database": "ok", "migrations": "ok" if at_head else "not_at_head"}
