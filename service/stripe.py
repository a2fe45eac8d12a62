"""The upstream client for ``POST /v1/billing_portal/sessions``.

It encodes params the way Stripe's SDKs do, retries what Stripe says is safe to
retry (always with the same ``Idempotency-Key``), respects the request's whole
deadline, and fails fast through a per-replica circuit breaker while Stripe is
down. Retry rules follow stripe-python's ``_should_retry``.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from service.config import Settings
from service.errors import (
    ServiceError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from service.metrics import Metrics
from service.version import USER_AGENT

SESSIONS_PATH = "/v1/billing_portal/sessions"
# Backoff: full jitter over an exponential window (stripe-python uses 0.5 s
# initial, 2 s max for its own client; we are bounded by the request deadline).
BACKOFF_INITIAL = 0.25
BACKOFF_MAX = 2.0
RETRYABLE_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


def encode_form(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten nested params into Stripe's ``a[b][0][c]=v`` form pairs; None is omitted."""
    return list(_flatten(params, None))


def _flatten(value: Any, prefix: str | None) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            yield from _flatten(sub, key if prefix is None else f"{prefix}[{key}]")
    elif isinstance(value, list | tuple):
        for index, sub in enumerate(value):
            yield from _flatten(sub, f"{prefix}[{index}]")
    elif value is None:
        return
    elif prefix is None:
        raise TypeError("top-level params must be a mapping")
    elif isinstance(value, bool):
        yield prefix, "true" if value else "false"
    else:
        yield prefix, str(value)


@dataclass(frozen=True, slots=True)
class PortalSession:
    """The fields of Stripe's billing_portal.session we hand back."""

    id: str
    url: str
    created: int
    livemode: bool
    locale: str | None
    return_url: str | None
    request_id: str | None
    attempts: int


class CircuitBreaker:
    """closed → open after N consecutive failed requests → half-open probe → closed."""

    def __init__(self, threshold: int, cooldown: float, metrics: Metrics | None) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._metrics = metrics
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if time.monotonic() - self._opened_at >= self.cooldown:
            return "half_open"
        return "open"

    def before_request(self) -> None:
        """Raise 503 while open; let exactly one probe through once the cooldown is over."""
        state = self.state
        if state == "closed":
            return
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return
        assert self._opened_at is not None
        wait = max(1, int(self.cooldown - (time.monotonic() - self._opened_at) + 0.999))
        raise ServiceUnavailable(
            "upstream_unavailable",
            "Stripe is failing; requests are paused briefly.",
            headers={"Retry-After": str(wait)},
        )

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        if self._opened_at is not None:
            self._opened_at = None
            self._set_gauge(0)

    def record_failure(self) -> None:
        self._failures += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if was_probe or self._failures >= self.threshold:
            self._opened_at = time.monotonic()
            self._set_gauge(1)

    def record_neutral(self) -> None:
        """A request that said nothing about Stripe's health (e.g. a 400)."""
        if self._probe_in_flight:
            self.record_success()

    def _set_gauge(self, value: int) -> None:
        if self._metrics is not None:
            self._metrics.upstream_circuit_open.set(value)


class _Attempt:
    """What one HTTP exchange with Stripe produced."""

    __slots__ = ("body", "error", "headers", "outcome", "status")

    def __init__(
        self,
        outcome: str,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        error: str | None = None,
    ) -> None:
        self.outcome = outcome
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.error = error

    @property
    def request_id(self) -> str | None:
        return self.headers.get("Request-Id")


class StripeClient:
    """Creates portal sessions over one shared aiohttp ClientSession."""

    def __init__(
        self, session: aiohttp.ClientSession, settings: Settings, metrics: Metrics | None
    ) -> None:
        self._session = session
        self._settings = settings
        self._metrics = metrics
        self._url = settings.stripe_api_base + SESSIONS_PATH
        if settings.stripe_api_key is None:
            raise ValueError("STRIPE_API_KEY is required to call Stripe")
        self._auth = f"Bearer {settings.stripe_api_key.reveal()}"
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold, settings.breaker_cooldown_seconds, metrics
        )

    @staticmethod
    def new_session(settings: Settings) -> aiohttp.ClientSession:
        """The one ClientSession of the app: bounded keep-alive pool to Stripe."""
        connector = aiohttp.TCPConnector(
            limit=settings.stripe_max_connections, keepalive_timeout=30, ttl_dns_cache=300
        )
        return aiohttp.ClientSession(
            connector=connector,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            raise_for_status=False,
        )

    async def create_portal_session(
        self, params: Mapping[str, Any], *, idempotency_key: str, deadline: float
    ) -> PortalSession:
        """POST the session; ``deadline`` is a ``loop.time()`` after which we give up."""
        self.breaker.before_request()
        form = encode_form(params)
        headers = {
            "Authorization": self._auth,
            "Stripe-Version": self._settings.stripe_api_version,
            "Idempotency-Key": idempotency_key,
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        loop = asyncio.get_running_loop()
        max_attempts = 1 + self._settings.stripe_max_retries
        attempt_no = 0
        while True:
            attempt_no += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.breaker.record_failure()
                raise self._timeout_error(None)
            attempt = await self._attempt(
                form, headers, min(remaining, self._settings.stripe_timeout_seconds)
            )
            if attempt.outcome == "success":
                try:
                    session = self._parse_session(attempt, attempt_no)
                except UpstreamError:
                    self.breaker.record_failure()
                    raise
                self.breaker.record_success()
                return session
            retry, reason = self._should_retry(attempt)
            if retry and attempt_no < max_attempts:
                delay = self._sleep_time(attempt_no, attempt)
                if loop.time() + delay < deadline:
                    if self._metrics is not None:
                        self._metrics.upstream_retries.labels(reason=reason).inc()
                    await asyncio.sleep(delay)
                    continue
            raise self._final_error(attempt, retryable=retry)

    async def _attempt(
        self, form: list[tuple[str, str]], headers: dict[str, str], attempt_timeout: float
    ) -> _Attempt:
        started = time.perf_counter()
        client_timeout = aiohttp.ClientTimeout(
            total=attempt_timeout,
            sock_connect=min(attempt_timeout, self._settings.stripe_connect_timeout_seconds),
        )
        try:
            async with self._session.post(
                self._url, data=form, headers=headers, timeout=client_timeout
            ) as resp:
                raw = await resp.read()
                result = self._classify(resp.status, resp.headers, raw)
        except TimeoutError:
            result = _Attempt("timeout", error="timeout")
        except aiohttp.ClientError as exc:
            result = _Attempt("connection_error", error=type(exc).__name__)
        if self._metrics is not None:
            self._metrics.upstream_requests.labels(
                outcome=result.outcome, status=str(result.status or "none")
            ).inc()
            self._metrics.upstream_duration.labels(outcome=result.outcome).observe(
                time.perf_counter() - started
            )
        return result

    @staticmethod
    def _classify(status: int, headers: Mapping[str, str], raw: bytes) -> _Attempt:
        kept = {
            k: headers[k]
            for k in ("Request-Id", "Retry-After", "Stripe-Should-Retry")
            if k in headers
        }
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if 200 <= status < 300:
            return _Attempt("success", status, kept, body)
        if status == 429:
            outcome = "rate_limited"
        elif status >= 500:
            outcome = "server_error"
        else:
            outcome = "client_error"
        return _Attempt(outcome, status, kept, body)

    @staticmethod
    def _should_retry(attempt: _Attempt) -> tuple[bool, str]:
        header = attempt.headers.get("Stripe-Should-Retry")
        if header == "true":
            return True, "should_retry"
        if header == "false":
            return False, ""
        if attempt.outcome in ("timeout", "connection_error"):
            return True, attempt.outcome
        if attempt.status == 409:
            return True, "conflict"
        if attempt.status == 429:
            return True, "rate_limited"
        if attempt.status is not None and attempt.status >= 500:
            return True, "server_error"
        return False, ""

    @staticmethod
    def _sleep_time(attempt_no: int, attempt: _Attempt) -> float:
        window = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (attempt_no - 1))
        delay = random.uniform(0, window)
        retry_after = _parse_retry_after(attempt.headers.get("Retry-After"))
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _parse_session(self, attempt: _Attempt, attempts: int) -> PortalSession:
        body = attempt.body
        if (
            not isinstance(body, dict)
            or body.get("object") != "billing_portal.session"
            or not isinstance(body.get("id"), str)
            or not isinstance(body.get("url"), str)
            or not body["url"].startswith("https://")
            or not isinstance(body.get("created"), int)
        ):
            err = UpstreamError(
                "upstream_bad_response",
                "Stripe answered with something that is not a portal session.",
                extra={"upstream": {"request_id": attempt.request_id}},
            )
            err.stripe_request_id = attempt.request_id
            raise err
        return PortalSession(
            id=body["id"],
            url=body["url"],
            created=body["created"],
            livemode=bool(body.get("livemode", False)),
            locale=body.get("locale"),
            return_url=body.get("return_url"),
            request_id=attempt.request_id,
            attempts=attempts,
        )

    def _timeout_error(self, request_id: str | None) -> ServiceError:
        err = UpstreamTimeout(detail="Stripe did not answer within the deadline.")
        err.stripe_request_id = request_id
        return err

    def _final_error(self, attempt: _Attempt, *, retryable: bool) -> ServiceError:
        """The caller-facing error once no further attempt will be made."""
        err: ServiceError
        if attempt.outcome == "timeout":
            self.breaker.record_failure()
            err = self._timeout_error(attempt.request_id)
        elif attempt.outcome == "connection_error" or retryable:
            self.breaker.record_failure()
            err = ServiceUnavailable(
                "upstream_unavailable",
                "Stripe is unavailable; retry later.",
                headers={"Retry-After": str(_retry_after_hint(attempt))},
            )
        elif attempt.status in (401, 403):
            # Our key is wrong or revoked: nothing the caller did; page the on-call.
            self.breaker.record_neutral()
            err = UpstreamError(
                "upstream_auth_failed", "The service could not authenticate to Stripe."
            )
        else:
            self.breaker.record_neutral()
            err = UpstreamError(
                "upstream_rejected",
                "Stripe rejected the request.",
                extra={"upstream": _upstream_info(attempt)},
            )
        err.stripe_request_id = attempt.request_id
        return err


def _upstream_info(attempt: _Attempt) -> dict[str, Any]:
    error = attempt.body.get("error") if isinstance(attempt.body, dict) else None
    error = error if isinstance(error, dict) else {}
    # Stripe's `message` is never passed on: it can echo ids and params.
    return {
        "type": error.get("type") if isinstance(error.get("type"), str) else None,
        "code": error.get("code") if isinstance(error.get("code"), str) else None,
        "param": error.get("param") if isinstance(error.get("param"), str) else None,
        "request_id": attempt.request_id,
        "status": attempt.status,
    }


def upstream_error_code(error: ServiceError) -> str | None:
    """Stripe's own error code carried by an upstream_rejected error, if any."""
    upstream = error.extra.get("upstream")
    return upstream.get("code") if isinstance(upstream, dict) else None


def _retry_after_hint(attempt: _Attempt) -> int:
    parsed = _parse_retry_after(attempt.headers.get("Retry-After"))
    return max(1, int(parsed + 0.999)) if parsed is not None else 1


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
