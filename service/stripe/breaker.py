"""The circuit breaker: while Stripe keeps failing, fail fast instead of queueing.

State is per replica (SPEC §3): after ``BREAKER_FAILURE_THRESHOLD`` consecutive
requests that failed upstream after their retries, requests get 503 for
``BREAKER_COOLDOWN_SECONDS``; then one probe goes through, and its success
closes the breaker again.
"""

from __future__ import annotations

import math
import time

from service.errors import ServiceUnavailable
from service.metrics import Metrics


class CircuitBreaker:
    """closed → open after N consecutive failed requests → half-open probe → closed.

    :meth:`admit` hands every admitted request a ticket; :meth:`settle` takes
    it back with the request's verdict. The probe's slot is freed by
    :meth:`settle` whatever happened to it (success, failure, cancellation or a
    bug), so the breaker can never stay half-open with a probe nobody runs.
    """

    def __init__(self, threshold: int, cooldown: float, metrics: Metrics | None) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._metrics = metrics
        self._failures = 0
        self._opened_at: float | None = None
        self._probe: object | None = None
        self._set_gauge(0)

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if time.monotonic() - self._opened_at >= self.cooldown:
            return "half_open"
        return "open"

    def admit(self) -> object:
        """A ticket for one request; 503 while open, one probe at a time when half-open."""
        state = self.state
        ticket = object()
        if state == "closed":
            return ticket
        if state == "half_open" and self._probe is None:
            self._probe = ticket
            return ticket
        assert self._opened_at is not None
        wait = max(1, math.ceil(self.cooldown - (time.monotonic() - self._opened_at)))
        raise ServiceUnavailable(
            "upstream_unavailable",
            "Stripe is failing; requests are paused briefly.",
            headers={"Retry-After": str(wait)},
        )

    def settle(self, ticket: object, healthy: bool | None) -> None:
        """Record how the request went: True (Stripe answered), False (it failed us),
        None (no verdict: cancelled, or it never reached Stripe)."""
        was_probe = ticket is self._probe
        if was_probe:
            self._probe = None
        if healthy is None:
            return
        if healthy:
            self._failures = 0
            if self._opened_at is not None:
                self._opened_at = None
                self._set_gauge(0)
            return
        self._failures += 1
        if was_probe or self._failures >= self.threshold:
            # (Re)open: a failed probe restarts the cooldown.
            self._opened_at = time.monotonic()
            self._set_gauge(1)

    def _set_gauge(self, value: int) -> None:
        if self._metrics is not None:
            self._metrics.upstream_circuit_open.set(value)
