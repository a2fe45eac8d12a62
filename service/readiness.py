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

from service.cached_check import MAX_AGE_SECONDS, CachedCheck
from service.db import deployment
from service.db.pool import Database
from service.errors import ServiceError
from service.lifecycle import Lifecycle
from service.metrics import Metrics

__all__ = ["MAX_AGE_SECONDS", "Readiness"]


class Readiness(CachedCheck):
    """One replica's readiness, with the database check cached for ``max_age`` seconds."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: Metrics,
        *,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_age=max_age, clock=clock)
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._database: dict[str, str] = {}

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
        async def ask() -> None:
            self._database = await self._ask(db)

        await self.run_if_stale(ask)
        return self._database

    async def _ask(self, db: Database) -> dict[str, str]:
        try:
            revision = await asyncio.wait_for(deployment.current_revision(db), timeout=db.timeout)
        except (ServiceError, TimeoutError):
            return {"database": "unavailable"}
        at_head = revision == self._lifecycle.migrations_head
        return {"database": "ok", "migrations": "ok" if at_head else "not_at_head"}
