"""Process state that readiness, load shedding and graceful shutdown look at."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(slots=True)
class Budget:
    """How many requests of one kind may be in flight at once; past it, 503 overloaded."""

    limit: int
    in_flight: int = 0


@dataclass(slots=True)
class Lifecycle:
    """Draining flag and the admitted (sheddable) requests of this replica, per budget.

    Every route counts against one budget, declared with its route in
    ``app.py``: ``api`` (MAX_IN_FLIGHT) unless declared otherwise, ``webhooks``
    (WEBHOOK_MAX_IN_FLIGHT) for the unauthenticated routes, so that anonymous
    traffic can never take the slots of our callers; probes and metrics
    scrapes none: they must neither be shed nor hold up a shutdown, which waits
    for every budget.
    """

    api: Budget  # MAX_IN_FLIGHT
    webhooks: Budget  # WEBHOOK_MAX_IN_FLIGHT
    migrations_head: str | None = None
    draining: bool = False
    _routes: dict[web.AbstractRoute, Budget | None] = field(default_factory=dict, repr=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()

    def declare(self, budget: Budget | None, *routes: web.AbstractRoute) -> None:
        """``routes`` count against ``budget`` (None: never shed nor waited for)."""
        for route in routes:
            self._routes[route] = budget

    def budget_for(self, route: web.AbstractRoute) -> Budget | None:
        """The budget a request on ``route`` counts against (unmatched ones: ``api``)."""
        return self._routes.get(route, self.api)

    @property
    def in_flight(self) -> int:
        """Admitted requests of every budget."""
        return self.api.in_flight + self.webhooks.in_flight

    def try_enter(self, budget: Budget) -> bool:
        """Admit a request against ``budget``; False when it is full."""
        if budget.in_flight >= budget.limit:
            return False
        budget.in_flight += 1
        self._idle.clear()
        return True

    def leave(self, budget: Budget) -> None:
        """A request admitted against ``budget`` has its response."""
        budget.in_flight = max(0, budget.in_flight - 1)
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no admitted request is in flight (bound it with asyncio.timeout)."""
        await self._idle.wait()
