"""The upstream client for ``POST /v1/billing_portal/sessions``.

It encodes params the way Stripe's SDKs do, retries what Stripe says is safe to
retry (always with the same ``Idempotency-Key``), respects the request's whole
deadline, and fails fast through a per-replica circuit breaker while Stripe is
down. Retry rules follow stripe-python's ``_should_retry``.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog

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
SUBSCRIPTIONS_PATH = "/v1/subscriptions"
# Stripe's largest page for list endpoints.
LIST_PAGE_SIZE = 100
# A portal session is about 1 KiB of JSON; a body far larger than that is not
# one, and must not be buffered whole (a broken proxy can stream without end).
MAX_RESPONSE_BYTES = 256 * 1024
# The headers of Stripe's answer that retries, logs and audit use.
_KEPT_HEADERS = ("Request-Id", "Retry-After", "Stripe-Should-Retry")


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


class _Failed(Exception):
    """The request failed: the caller's error and what it says about Stripe's health."""

    def __init__(self, error: ServiceError, healthy: bool | None) -> None:
        super().__init__(error.code)
        self.error = error
        self.healthy = healthy


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

    async def list_subscriptions(self, customer: str) -> list[dict[str, Any]]:
        """Every subscription of ``customer``, canceled ones included, page by page.

        For ``resync``: ``GET /v1/subscriptions?customer=…&status=all&limit=100``,
        following ``starting_after`` while ``has_more``. A GET is safe to repeat,
        so connection errors, timeouts, 409, 429 and 5xx are retried (bounded by
        STRIPE_MAX_RETRIES); the breaker, which guards the request path, is left alone.
        """
        headers = {
            "Authorization": self._auth,
            "Stripe-Version": self._settings.stripe_api_version,
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        url = self._settings.stripe_api_base + SUBSCRIPTIONS_PATH
        found: list[dict[str, Any]] = []
        query = {"customer": customer, "status": "all", "limit": str(LIST_PAGE_SIZE)}
        while True:
            page = await self._get_json(url, query, headers)
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list) or not all(
                isinstance(sub, dict) and isinstance(sub.get("id"), str) for sub in data
            ):
                raise UpstreamError(
                    "upstream_bad_response", "Stripe answered with something that is not a list."
                )
            found.extend(data)
            if not data or page.get("has_more") is not True:
                return found
            query["starting_after"] = data[-1]["id"]

    async def _get_json(self, url: str, query: dict[str, str], headers: dict[str, str]) -> Any:
        """One GET with bounded retries; the parsed 2xx body, or the final error."""
        attempts = 1 + self._settings.stripe_max_retries
        timeout = aiohttp.ClientTimeout(
            total=self._settings.stripe_timeout_seconds,
            sock_connect=self._settings.stripe_connect_timeout_seconds,
        )
        for attempt_no in range(1, attempts + 1):
            error: ServiceError
            try:
                async with self._session.get(
                    url, params=query, headers=headers, timeout=timeout, allow_redirects=False
                ) as resp:
                    status, raw = resp.status, await resp.read()
                    request_id = resp.headers.get("Request-Id")
                    should_retry = resp.headers.get("Stripe-Should-Retry")
            except (TimeoutError, aiohttp.ClientError) as exc:
                retry = True
                error = ServiceUnavailable(
                    "upstream_unavailable", f"Stripe did not answer ({type(exc).__name__})."
                )
            else:
                try:
                    body = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    body = None
                if 200 <= status < 300:
                    return body
                retry = should_retry == "true" or (
                    should_retry != "false" and (status in (409, 429) or status >= 500)
                )
                error = _list_error(status, body, request_id, retry)
            if not retry or attempt_no == attempts:
                raise error
            await asyncio.sleep(random.uniform(0, min(2.0, 0.25 * 2**attempt_no)))
        raise AssertionError("unreachable")  # pragma: no cover

    async def create_portal_session(
        self, params: Mapping[str, Any], *, idempotency_key: str, deadline: float
    ) -> PortalSession:
        """POST the session; ``deadline`` is a ``loop.time()`` after which we give up.

        Every attempt carries the same ``Idempotency-Key``, so a retry after a
        lost answer gets Stripe's stored session back instead of a second one.
        """
        ticket = self.breaker.admit()
        healthy: bool | None = None
        try:
            session = await self._create(params, idempotency_key, deadline)
        except _Failed as failed:
            healthy = failed.healthy
            raise failed.error from None
        else:
            healthy = True
            return session
        finally:
            # Also on cancellation (healthy stays None): frees a probe's slot.
            self.breaker.settle(ticket, healthy)

    async def _create(
        self, params: Mapping[str, Any], idempotency_key: str, deadline: float
    ) -> PortalSession:
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
        last: _Attempt | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if last is None:
                    # The deadline went before Stripe was asked: no verdict on its health.
                    raise _Failed(self._timeout_error(None), None)
                raise self._final_error(last, retryable=True)
            attempt_no += 1
            last = await self._attempt(
                form, headers, min(remaining, self._settings.stripe_timeout_seconds)
            )
            # On this request's log lines (its canonical access line too), failed or not.
            structlog.contextvars.bind_contextvars(
                attempts=attempt_no, upstream_request_id=last.request_id
            )
            if last.outcome == "success":
                return self._parse_session(last, attempt_no)
            retry, reason = self._should_retry(last)
            if retry and attempt_no < max_attempts:
                delay = self._sleep_time(attempt_no, last)
                # Honour the wait only if an attempt still fits after it.
                if loop.time() + delay < deadline:
                    if self._metrics is not None:
                        self._metrics.upstream_retries.labels(reason=reason).inc()
                    await asyncio.sleep(delay)
                    continue
            raise self._final_error(last, retryable=retry)

    async def _attempt(
        self, form: list[tuple[str, str]], headers: dict[str, str], attempt_timeout: float
    ) -> _Attempt:
        started = time.perf_counter()
        # total bounds the whole exchange (pool wait, connect, send, read the body);
        # sock_connect bounds the TCP+TLS handshake on its own.
        client_timeout = aiohttp.ClientTimeout(
            total=attempt_timeout,
            sock_connect=min(attempt_timeout, self._settings.stripe_connect_timeout_seconds),
        )
        try:
            async with self._session.post(
                self._url,
                data=form,
                headers=headers,
                timeout=client_timeout,
                allow_redirects=False,  # Stripe never redirects; never resend the key elsewhere
            ) as resp:
                raw = await _read_limited(resp)
                result = self._classify(resp.status, resp.headers, raw)
        except TimeoutError:
            result = _Attempt("timeout", error="timeout")
        except aiohttp.ClientError as exc:
            # Refused, reset, or a body cut short (ClientPayloadError): the answer,
            # if any, is lost; the same Idempotency-Key makes a retry safe.
            result = _Attempt("connection_error", error=type(exc).__name__)
        except _BodyTooLarge as exc:
            result = _Attempt("bad_response", exc.status, exc.headers, None)
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
        kept = _kept_headers(headers)
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
        """stripe-python's rule: Stripe-Should-Retry wins, then the outcome and status."""
        if attempt.outcome == "bad_response":
            return False, ""
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

    def _sleep_time(self, attempt_no: int, attempt: _Attempt) -> float:
        """Full jitter over an exponential window; at least Stripe's Retry-After."""
        window = min(
            self._settings.stripe_backoff_max_seconds,
            self._settings.stripe_backoff_initial_seconds * 2 ** (attempt_no - 1),
        )
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
            # A 2xx that is not a session (truncated, HTML from a proxy, another
            # object): not retried, since Stripe may have created the session.
            raise _Failed(self._bad_response(attempt), False)
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

    @staticmethod
    def _bad_response(attempt: _Attempt) -> ServiceError:
        err = UpstreamError(
            "upstream_bad_response",
            "Stripe answered with something that is not a portal session.",
            extra={"upstream": {"request_id": attempt.request_id}},
        )
        err.stripe_request_id = attempt.request_id
        return err

    @staticmethod
    def _timeout_error(attempt: _Attempt | None) -> ServiceError:
        err = UpstreamTimeout(detail="Stripe did not answer within the deadline.")
        err.stripe_request_id = attempt.request_id if attempt is not None else None
        return err

    def _final_error(self, attempt: _Attempt, *, retryable: bool) -> _Failed:
        """The caller-facing error once no further attempt will be made.

        Timeouts are 504; anything transient (connection errors, 409, 429, 5xx,
        or what Stripe flagged as retryable) is 503 with a Retry-After; other 4xx
        are Stripe refusing the request itself, which says Stripe is healthy.
        """
        err: ServiceError
        healthy: bool = False
        if attempt.outcome == "timeout":
            err = self._timeout_error(attempt)
        elif attempt.outcome == "bad_response":
            err = self._bad_response(attempt)
        elif (
            retryable
            or attempt.outcome in ("connection_error", "server_error", "rate_limited")
            or attempt.status == 409
        ):
            err = ServiceUnavailable(
                "upstream_unavailable",
                "Stripe is unavailable; retry later.",
                headers={"Retry-After": str(_retry_after_hint(attempt))},
            )
        elif attempt.status in (401, 403):
            # Our key is wrong or revoked: nothing the caller did; page the on-call.
            healthy = True
            err = UpstreamError(
                "upstream_auth_failed", "The service could not authenticate to Stripe."
            )
        else:
            healthy = True
            err = UpstreamError(
                "upstream_rejected",
                "Stripe rejected the request.",
                extra={"upstream": _upstream_info(attempt)},
            )
        err.stripe_request_id = attempt.request_id
        return _Failed(err, healthy)


class _BodyTooLarge(Exception):
    def __init__(self, status: int, headers: dict[str, str]) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers


def _kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: headers[k] for k in _KEPT_HEADERS if k in headers}


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, or _BodyTooLarge past MAX_RESPONSE_BYTES."""
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise _BodyTooLarge(resp.status, _kept_headers(resp.headers))
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _BodyTooLarge(resp.status, _kept_headers(resp.headers))
        chunks.append(chunk)
    return b"".join(chunks)


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


def _list_error(status: int, body: Any, request_id: str | None, retryable: bool) -> ServiceError:
    """The error for a non-2xx answer to a list request (Stripe's message is not kept)."""
    err: ServiceError
    if retryable:
        err = ServiceUnavailable("upstream_unavailable", f"Stripe answered {status}.")
    elif status in (401, 403):
        err = UpstreamError("upstream_auth_failed", "The service could not authenticate to Stripe.")
    else:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        info = {
            k: error.get(k) if isinstance(error.get(k), str) else None
            for k in ("type", "code", "param")
        }
        err = UpstreamError(
            "upstream_rejected",
            "Stripe rejected the request.",
            extra={"upstream": {**info, "request_id": request_id, "status": status}},
        )
    err.stripe_request_id = request_id
    return err
