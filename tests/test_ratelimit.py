"""The token buckets of ``service/ratelimit.py`` on an injected clock: no sleeps, exact numbers.

``tests/test_security_matrix.py`` shows a limit refusing a client through the
service; these pin the arithmetic — the burst, the refill, the wait it reports,
the refusal window with its one audit row, and the sweep that bounds memory.
"""

from __future__ import annotations

import pytest

from service.ratelimit import REFUSAL_ROW_WINDOW_SECONDS, RateLimiter, retry_after_seconds


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> RateLimiter:
    return RateLimiter(clock=clock)


def test_a_full_bucket_allows_exactly_the_minutes_allowance(limiter: RateLimiter) -> None:
    assert [limiter.try_acquire("client:a", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    # The fourth waits for one token at 3/min: 20 s.
    assert limiter.try_acquire("client:a", 3) == pytest.approx(20.0)
    assert limiter.try_acquire("client:a", 3) == pytest.approx(20.0)  # still empty, same wait


def test_the_bucket_refills_continuously(limiter: RateLimiter, clock: Clock) -> None:
    for _ in range(60):
        assert limiter.try_acquire("client:a", 60) == 0.0
    assert limiter.try_acquire("client:a", 60) == pytest.approx(1.0)  # 1 token/s
    clock.now += 0.25
    assert limiter.try_acquire("client:a", 60) == pytest.approx(0.75)
    clock.now += 0.75
    assert limiter.try_acquire("client:a", 60) == 0.0
    assert limiter.try_acquire("client:a", 60) == pytest.approx(1.0)
    # At 120/min half a second brings a token, and a refused try takes none.
    for _ in range(120):
        limiter.try_acquire("client:b", 120)
    assert limiter.try_acquire("client:b", 120) == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.try_acquire("client:b", 120) == 0.0


def test_a_bucket_never_holds_more_than_a_minutes_allowance(
    limiter: RateLimiter, clock: Clock
) -> None:
    limiter.try_acquire("client:a", 2)
    clock.now += 3600  # an hour idle refills to 2, not to 120
    assert [limiter.try_acquire("client:a", 2) for _ in range(2)] == [0.0, 0.0]
    assert limiter.try_acquire("client:a", 2) == pytest.approx(30.0)


def test_principals_have_their_own_buckets(limiter: RateLimiter) -> None:
    assert limiter.try_acquire("client:a", 1) == 0.0
    assert limiter.try_acquire("client:a", 1) == pytest.approx(60.0)
    assert limiter.try_acquire("user:a", 1) == 0.0
    assert limiter.try_acquire("client:b", 1) == 0.0


def test_the_default_clock_is_monotonic() -> None:
    limiter = RateLimiter()
    assert limiter.try_acquire("client:a", 1) == 0.0
    wait = limiter.try_acquire("client:a", 1)
    assert 59.0 < wait <= 60.0


def test_retry_after_is_whole_seconds_never_zero() -> None:
    assert retry_after_seconds(0.0) == 1
    assert retry_after_seconds(0.01) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(1.01) == 2
    assert retry_after_seconds(59.5) == 60


# --- the one audit row per refusal window ------------------------------------------


def test_one_refusal_per_window_is_first(limiter: RateLimiter, clock: Clock) -> None:
    assert REFUSAL_ROW_WINDOW_SECONDS == 60.0
    assert limiter.first_refusal_of_window("client:a") is True
    assert limiter.first_refusal_of_window("client:a") is False
    assert limiter.first_refusal_of_window("user:b") is True  # its own window
    clock.now += 59.5
    assert limiter.first_refusal_of_window("client:a") is False
    clock.now += 0.5  # exactly one window after the first: a new window
    assert limiter.first_refusal_of_window("client:a") is True
    assert limiter.first_refusal_of_window("client:a") is False


# --- memory stays bounded: the sweep every 1024 calls ------------------------------
# What it drops can't be seen through the API (a swept bucket is a full one), so
# these look at the limiter's own dictionaries.


def _calls(limiter: RateLimiter, n: int) -> None:
    for _ in range(n):
        limiter.try_acquire("client:busy", 1_000_000)


def test_idle_buckets_are_swept_on_every_1024th_call(limiter: RateLimiter, clock: Clock) -> None:
    limiter.try_acquire("client:idle", 10)  # call 1
    limiter.try_acquire("client:recent", 10)  # call 2
    clock.now += 120.5
    limiter.try_acquire("client:recent", 10)  # call 3
    _calls(limiter, 1020)  # calls 4 .. 1023
    assert set(limiter._buckets) == {"client:idle", "client:recent", "client:busy"}
    _calls(limiter, 1)  # call 1024 sweeps
    assert set(limiter._buckets) == {"client:recent", "client:busy"}
    # The swept principal starts again with a full bucket.
    assert limiter.try_acquire("client:idle", 10) == 0.0


def test_a_bucket_idle_exactly_the_limit_is_kept(limiter: RateLimiter, clock: Clock) -> None:
    limiter.try_acquire("client:idle", 10)
    clock.now += 120.0
    _calls(limiter, 1023)
    assert "client:idle" in limiter._buckets
    clock.now += 0.5
    _calls(limiter, 1024)
    assert "client:idle" not in limiter._buckets


def test_closed_refusal_windows_are_swept_open_ones_kept(
    limiter: RateLimiter, clock: Clock
) -> None:
    assert limiter.first_refusal_of_window("client:old")
    clock.now += 30
    assert limiter.first_refusal_of_window("client:open")
    clock.now += 30  # client:old's window is exactly over, client:open's half
    _calls(limiter, 1024)
    assert set(limiter._refusal_windows) == {"client:open"}
    assert limiter.first_refusal_of_window("client:open") is False
    assert limiter.first_refusal_of_window("client:old") is True
