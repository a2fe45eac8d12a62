"""Process state that readiness, load shedding and graceful shutdown look at."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(slots=True)
class Lifecycle:
    """Draining flag and the count of admitted (sheddable) requests for this replica.

    Probes and metrics scrapes are not counted: they must neither be shed nor
    hold up a shutdown.
    """

    migrations_head: str | None = None
    draining: bool = False
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()

    def enter(self) -> None:
        """A request was admitted."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        """An admitted request has its response."""
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no admitted request is in flight (bound it with asyncio.timeout)."""
        await self._idle.wait()
