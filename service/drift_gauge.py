"""``portal_gateway_profile_drift{profile}``, refreshed from the database at scrape time.

The snapshots that decide drift arrive by webhook at whichever replica Stripe
reaches, and by ``profiles apply|sync`` from a CLI: no replica's memory knows
them all. So at each ``/metrics`` scrape the gauge is rebuilt from
``portal_profiles`` (one bounded query: the profiles that have both an
applied body and a snapshot), and every replica reports the same values.

As with readiness, the database is asked at most once per
:data:`MAX_AGE_SECONDS` (concurrent scrapes share the query in progress). A
profile with both sides has a series, 1 when
:func:`service.profile_drift.drifted_fields` names a field, else 0; a
profile without an applied body (not managed by the file) or without a
snapshot (never reported) has none, and a removed profile's series goes
away. When the database does not answer, the last values stay (a scrape
never fails for it) and the refusal is logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from service.cached_check import MAX_AGE_SECONDS, CachedCheck
from service.db import profiles
from service.db.pool import Database
from service.errors import ServiceError
from service.metrics import Metrics
from service.profile_drift import drifted_fields

log = structlog.get_logger("app")


class DriftGauge(CachedCheck):
    """Keeps the drift gauge of one registry current, from a query at most ``max_age`` old."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_age=max_age, clock=clock)
        self._gauge = metrics.profile_drift

    async def refresh(self, db: Database) -> None:
        """Rebuild the gauge unless it was rebuilt less than ``max_age`` ago."""

        async def rebuild() -> None:
            try:
                rows = await asyncio.wait_for(profiles.drift_inputs(db), timeout=db.timeout)
            except (ServiceError, TimeoutError) as exc:
                log.warning("profile_drift_not_refreshed", error=type(exc).__name__)
                return
            values = {name: 1 if drifted_fields(a, s) else 0 for name, a, s in rows}
            # No await between clear and set: a scrape never sees it half built.
            self._gauge.clear()
            for name, value in values.items():
                self._gauge.labels(profile=name).set(value)

        await self.run_if_stale(rebuild)
