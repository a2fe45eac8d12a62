"""When to retry a Stripe call and how long to wait: pure functions, no I/O.

The rules are stripe-python's (``_http_client.py``: ``_should_retry``,
``_sleep_time_seconds``): ``Stripe-Should-Retry`` wins over everything;
otherwise connection errors, timeouts, 409 (an idempotency lock), 429 and 5xx
are retried, other 4xx never. The wait is full jitter over an exponential
window, but never shorter than Stripe's ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable

# Outcomes of one exchange (``attempt.Attempt.outcome``) that say nothing was answered.
TRANSPORT_FAILURES = frozenset({"timeout", "connection_error"})


def should_retry(outcome: str, status: int | None, header: str | None) -> tuple[bool, str]:
    """Whether to try again, and the reason (a bounded metric label; "" when not)."""
    if outcome == "bad_response":
        # A 2xx that is not what we asked for: Stripe may have acted on it.
        return False, ""
    if header == "true":
        return True, "should_retry"
    if header == "false":
        return False, ""
    if outcome in TRANSPORT_FAILURES:
        return True, outcome
    if status == 409:
        return True, "conflict"
    if status == 429:
        return True, "rate_limited"
    if status is not None and status >= 500:
        return True, "server_error"
    return False, ""


def sleep_time(
    attempt_no: int,
    *,
    initial: float,
    maximum: float,
    retry_after: float | None,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait before attempt ``attempt_no + 1``: full jitter, at least Retry-After."""
    window = min(maximum, initial * 2 ** (attempt_no - 1))
    delay = uniform(0, window)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def retry_after_hint(value: str | None) -> int:
    """Whole seconds for our own ``Retry-After`` to the caller: Stripe's, else 1."""
    parsed = parse_retry_after(value)
    return max(1, math.ceil(parsed)) if parsed is not None else 1
