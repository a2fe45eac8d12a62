"""The retry rules of ``service/stripe/retry.py``, tested the way stripe-python tests its own:
pure functions, every branch, no network."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest

from service.stripe.retry import parse_retry_after, retry_after_hint, should_retry, sleep_time


@pytest.mark.parametrize(
    ("outcome", "status", "header", "expected"),
    [
        # Stripe-Should-Retry wins over the status, both ways.
        ("client_error", 400, "true", (True, "should_retry")),
        ("server_error", 500, "false", (False, "")),
        ("rate_limited", 429, "false", (False, "")),
        # Nothing was answered: safe to retry with the same Idempotency-Key.
        ("timeout", None, None, (True, "timeout")),
        ("connection_error", None, None, (True, "connection_error")),
        ("client_error", 409, None, (True, "conflict")),
        ("rate_limited", 429, None, (True, "rate_limited")),
        ("server_error", 500, None, (True, "server_error")),
        ("server_error", 503, None, (True, "server_error")),
        # Other 4xx are Stripe refusing the request itself: never retried.
        ("client_error", 400, None, (False, "")),
        ("client_error", 401, None, (False, "")),
        ("client_error", 404, None, (False, "")),
        # A 2xx we cannot read: Stripe may have acted on it, even if it says retry.
        ("bad_response", 200, "true", (False, "")),
    ],
)
def test_should_retry(
    outcome: str, status: int | None, header: str | None, expected: tuple[bool, str]
) -> None:
    assert should_retry(outcome, status, header) == expected


def test_backoff_is_full_jitter_within_the_window_and_obeys_retry_after() -> None:
    for attempt_no, window in ((1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (8, 2.0)):
        delays = [
            sleep_time(attempt_no, initial=0.25, maximum=2.0, retry_after=None) for _ in range(300)
        ]
        assert all(0 <= d <= window for d in delays)
        assert min(delays) < window / 4 < window * 3 / 4 < max(delays)  # spread, not fixed
    told = [sleep_time(1, initial=0.25, maximum=2.0, retry_after=3.0) for _ in range(50)]
    assert all(d >= 3 for d in told)


def test_the_window_is_initial_times_two_to_the_attempt_capped() -> None:
    top = [
        sleep_time(n, initial=0.5, maximum=2.0, retry_after=None, uniform=lambda _lo, hi: hi)
        for n in range(1, 6)
    ]
    assert top == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_retry_after_forms() -> None:
    assert parse_retry_after("2") == 2
    assert parse_retry_after(" 7 ") == 7
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("\u0662") is None  # a non-ASCII digit is not a number of seconds
    in_ten = parse_retry_after(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None
    assert 8 <= in_ten <= 10
    assert parse_retry_after(formatdate(time.time() - 10, usegmt=True)) == 0
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == 30


def test_the_callers_retry_after_is_whole_seconds_never_zero() -> None:
    assert retry_after_hint(None) == 1
    assert retry_after_hint("0") == 1
    assert retry_after_hint("3") == 3
    assert retry_after_hint("garbage") == 1
