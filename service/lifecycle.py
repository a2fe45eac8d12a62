"""Process state that readiness and load shedding look at."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Lifecycle:
    """Draining flag and in-flight count for this replica."""

    migrations_head: str | None = None
    draining: bool = False
    in_flight: int = 0
