"""The Stripe client: one send loop that every call goes through, GET and POST alike.

The loop (:meth:`StripeClient._send`) owns the whole exchange: the request's
deadline and a per-attempt timeout, retries by the rules of ``retry.py`` with
the same ``Idempotency-Key`` on every attempt (a retry after a lost answer gets
Stripe's stored result, not a second one), ``Retry-After``, a bounded read of
the answer, the check of the object Stripe returned, metrics, ``Stripe-Version``
and the optional ``Stripe-Account`` header (Connect). An endpoint is a short
method naming its path, params and the object it expects.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

from service.bounded import BodyTooLarge, read_bounded
from service.config import Settings
from service.metrics import Metrics
from service.stripe import retry
from service.stripe.attempt import Attempt, classify, kept_headers
from service.stripe.breaker import CircuitBreaker
from service.stripe.encode import FORM_CONTENT_TYPE, encode_form, form_body
from service.stripe.errors import Failed, final_error
from service.version import USER_AGENT

SESSIONS_PATH = "/v1/billing_portal/sessions"
SUBSCRIPTIONS_PATH = "/v1/subscriptions"
CUSTOMERS_PATH = "/v1/customers"
CONFIGURATIONS_PATH = "/v1/billing_portal/configurations"
# Stripe's largest page for list endpoints.
LIST_PAGE_SIZE = 100
# A portal session is about 1 KiB of JSON and a page of 100 subscriptions a few
# hundred; a body far larger than that is not Stripe's, and is not buffered whole.
MAX_RESPONSE_BYTES = 1024 * 1024
# What may stand in a customer id that becomes a path segment of the URL.
_CUSTOMER_ID = re.compile(r"cus_[A-Za-z0-9_]+")
# And a portal configuration's id.
_CONFIGURATION_ID = re.compile(r"bpc_[A-Za-z0-9_]+")


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


@dataclass(frozen=True, slots=True)
class CustomerPage:
    """One page of a Stripe list (``GET /v1/customers``): the objects, and whether more follow."""

    data: list[dict[str, Any]]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Outbound:
    """One call to make: what to send, what a good answer is, and by when."""

    method: str
    path: str
    params: Mapping[str, Any]
    # Stripe's ``object`` of a good answer, and any further check of its fields.
    expect: str
    valid: Callable[[dict[str, Any]], bool]
    # loop.time() after which no attempt starts and none is waited for.
    deadline: float
    # Sent on every attempt, so a retry after a lost answer gets Stripe's stored result.
    idempotency_key: str | None = None
    # Connect: the connected account the call acts on.
    stripe_account: str | None = None

    def accepts(self, body: Any) -> bool:
        """Whether a 2xx body is the object this call asked for."""
        return isinstance(body, dict) and body.get("object") == self.expect and self.valid(body)


@dataclass(frozen=True, slots=True)
class Reply:
    """A good answer: Stripe's object, its Request-Id, and how many attempts it took."""

    body: dict[str, Any]
    request_id: str | None
    attempts: int


# Stripe's portal URLs are https. Plain http only on loopback, and only from an
# upstream on loopback itself (a stand-in serving its own portal page, which a
# browser in the demo or a test can open): never from Stripe's API.
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is plain http to this machine (no userinfo to hide another host)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme == "http" and parts.hostname in _LOOPBACK and "@" not in parts.netloc


def _is_session(body: dict[str, Any], *, loopback_upstream: bool = False) -> bool:
    url = body.get("url")
    return (
        isinstance(body.get("id"), str)
        and isinstance(url, str)
        and (url.startswith("https://") or (loopback_upstream and is_loopback_url(url)))
        and isinstance(body.get("created"), int)
    )


def _is_customer(body: dict[str, Any]) -> bool:
    customer_id = body.get("id")
    return isinstance(customer_id, str) and customer_id.startswith("cus_")


def _is_configuration(body: dict[str, Any]) -> bool:
    configuration_id = body.get("id")
    return (
        isinstance(configuration_id, str)
        and configuration_id.startswith("bpc_")
        and isinstance(body.get("features"), dict)
    )


def _is_list(body: dict[str, Any]) -> bool:
    data = body.get("data")
    return isinstance(data, list) and all(
        isinstance(item, dict) and isinstance(item.get("id"), str) for item in data
    )


def _configuration_id(configuration_id: str) -> str:
    # The id is a path segment: only an id's characters may reach the URL.
    if _CONFIGURATION_ID.fullmatch(configuration_id) is None:
        raise ValueError(f"not a portal configuration id: {configuration_id!r}")
    return configuration_id


class Pace(Protocol):
    """A rate cap awaited before every HTTP exchange (``service.upstream_budget``).

    ``deadline`` is the call's (loop time); ``background`` callers yield to the
    request path. It may raise a ServiceError (``upstream_unavailable``) when
    no slot comes in time.
    """

    def __call__(self, deadline: float, *, background: bool) -> Awaitable[None]: ...


class StripeClient:
    """Calls Stripe over the application's one aiohttp ClientSession."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        metrics: Metrics | None,
        *,
        pace: Pace | None = None,
        background: bool = False,
    ) -> None:
        """``pace``, if given, is awaited before every HTTP exchange (a rate cap);
        ``background`` clients (tools, backfills) are paced behind the request path."""
        if settings.stripe_api_key is None:
            raise ValueError("STRIPE_API_KEY is required to call Stripe")
        self._session = session
        self._settings = settings
        self._metrics = metrics
        self._pace = pace
        self._loopback_upstream = is_loopback_url(settings.stripe_api_base)
        self._background = background
        self._headers = {
            "Authorization": f"Bearer {settings.stripe_api_key.reveal()}",
            "Stripe-Version": settings.stripe_api_version,
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold, settings.breaker_cooldown_seconds, metrics
        )

    def for_background(self) -> StripeClient:
        """This client (its session, breaker and pace) for background work: the
        upstream budget serves the request path first."""
        clone = copy.copy(self)
        clone._background = True
        return clone

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

    def deadline_from_now(self) -> float:
        """The loop time by which a call started now must be answered."""
        return asyncio.get_running_loop().time() + self._settings.request_deadline_seconds

    # --- endpoints -----------------------------------------------------------

    async def create_portal_session(
        self,
        params: Mapping[str, Any],
        *,
        idempotency_key: str,
        deadline: float,
        stripe_account: str | None = None,
    ) -> PortalSession:
        """``POST /v1/billing_portal/sessions``, through the circuit breaker."""
        reply = await self._send(
            Outbound(
                "POST",
                SESSIONS_PATH,
                params,
                expect="billing_portal.session",
                valid=self._is_session,
                deadline=deadline,
                idempotency_key=idempotency_key,
                stripe_account=stripe_account,
            ),
            guarded=True,
        )
        body = reply.body
        return PortalSession(
            id=body["id"],
            url=body["url"],
            created=body["created"],
            livemode=bool(body.get("livemode", False)),
            locale=body.get("locale"),
            return_url=body.get("return_url"),
            request_id=reply.request_id,
            attempts=reply.attempts,
        )

    def _is_session(self, body: dict[str, Any]) -> bool:
        return _is_session(body, loopback_upstream=self._loopback_upstream)

    async def list_subscriptions(
        self, customer: str, *, stripe_account: str | None = None
    ) -> list[dict[str, Any]]:
        """Every subscription of ``customer``, canceled ones included, all pages."""
        return await self._list_all(
            SUBSCRIPTIONS_PATH, {"customer": customer, "status": "all"}, stripe_account
        )

    async def retrieve_customer(
        self, customer_id: str, *, stripe_account: str | None = None
    ) -> dict[str, Any]:
        """``GET /v1/customers/{id}``; a deleted customer comes back with ``deleted: true``.

        An id Stripe does not know is an ``upstream_rejected`` error whose
        upstream code is ``resource_missing``.
        """
        # The id is a path segment: only an id's characters may reach the URL.
        if _CUSTOMER_ID.fullmatch(customer_id) is None:
            raise ValueError(f"not a customer id: {customer_id!r}")
        reply = await self._send(
            Outbound(
                "GET",
                f"{CUSTOMERS_PATH}/{customer_id}",
                {},
                expect="customer",
                valid=_is_customer,
                deadline=self.deadline_from_now(),
                stripe_account=stripe_account,
            )
        )
        return reply.body

    async def list_customers_page(
        self,
        *,
        starting_after: str | None = None,
        limit: int = LIST_PAGE_SIZE,
        stripe_account: str | None = None,
    ) -> CustomerPage:
        """One page of ``GET /v1/customers`` (newest first), after ``starting_after``."""
        query: dict[str, Any] = {"limit": limit}
        if starting_after is not None:
            query["starting_after"] = starting_after
        return await self._page(CUSTOMERS_PATH, query, stripe_account)

    async def create_configuration(
        self,
        params: Mapping[str, Any],
        *,
        idempotency_key: str,
        stripe_account: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/billing_portal/configurations``: the new configuration."""
        return await self._configuration(
            "POST", CONFIGURATIONS_PATH, params, idempotency_key, stripe_account
        )

    async def update_configuration(
        self,
        configuration_id: str,
        params: Mapping[str, Any],
        *,
        idempotency_key: str,
        stripe_account: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/billing_portal/configurations/{id}``: the whole updated configuration.

        What ``params`` leaves out stays as it is; a list sent replaces the old
        one, ``""`` clears a value.
        """
        path = f"{CONFIGURATIONS_PATH}/{_configuration_id(configuration_id)}"
        return await self._configuration("POST", path, params, idempotency_key, stripe_account)

    async def retrieve_configuration(
        self, configuration_id: str, *, stripe_account: str | None = None
    ) -> dict[str, Any]:
        """``GET /v1/billing_portal/configurations/{id}``; an unknown (or another
        account's) id is ``upstream_rejected`` with upstream code ``resource_missing``."""
        path = f"{CONFIGURATIONS_PATH}/{_configuration_id(configuration_id)}"
        return await self._configuration("GET", path, {}, None, stripe_account)

    async def list_configurations_page(
        self,
        *,
        starting_after: str | None = None,
        limit: int = LIST_PAGE_SIZE,
        active: bool | None = None,
        stripe_account: str | None = None,
    ) -> CustomerPage:
        """One page of ``GET /v1/billing_portal/configurations`` (newest first)."""
        query: dict[str, Any] = {"limit": limit, "active": active}
        if starting_after is not None:
            query["starting_after"] = starting_after
        return await self._page(CONFIGURATIONS_PATH, query, stripe_account)

    async def _configuration(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any],
        idempotency_key: str | None,
        stripe_account: str | None,
    ) -> dict[str, Any]:
        reply = await self._send(
            Outbound(
                method,
                path,
                params,
                expect="billing_portal.configuration",
                valid=_is_configuration,
                deadline=self.deadline_from_now(),
                idempotency_key=idempotency_key,
                stripe_account=stripe_account,
            )
        )
        return reply.body

    # --- the send loop ---------------------------------------------------------

    async def _page(
        self, path: str, query: dict[str, Any], stripe_account: str | None
    ) -> CustomerPage:
        """One page of a list endpoint, with its own deadline."""
        reply = await self._send(
            Outbound(
                "GET",
                path,
                query,
                expect="list",
                valid=_is_list,
                deadline=self.deadline_from_now(),
                stripe_account=stripe_account,
            )
        )
        return CustomerPage(reply.body["data"], reply.body.get("has_more") is True)

    async def _list_all(
        self, path: str, query: dict[str, Any], stripe_account: str | None
    ) -> list[dict[str, Any]]:
        """Follow ``starting_after`` while ``has_more``; each page has its own deadline."""
        found: list[dict[str, Any]] = []
        page_query = {**query, "limit": LIST_PAGE_SIZE}
        while True:
            page = await self._page(path, page_query, stripe_account)
            data = page.data
            found.extend(data)
            if not data or not page.has_more:
                return found
            page_query["starting_after"] = data[-1]["id"]

    async def _send(self, call: Outbound, *, guarded: bool = False) -> Reply:
        """Send one call until it succeeds, fails for good, or its deadline passes.

        ``guarded`` calls (the request path) go through the circuit breaker;
        tools that page through Stripe leave it to the requests it protects.
        """
        ticket = self.breaker.admit() if guarded else None
        healthy: bool | None = None
        try:
            reply = await self._attempts(call)
        except Failed as failed:
            healthy = failed.healthy
            raise failed.error from None
        else:
            healthy = True
            return reply
        finally:
            if ticket is not None:
                # Also on cancellation (healthy stays None): frees a probe's slot.
                self.breaker.settle(ticket, healthy)

    async def _attempts(self, call: Outbound) -> Reply:
        headers = dict(self._headers)
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        if call.stripe_account is not None:
            headers["Stripe-Account"] = call.stripe_account
        form = encode_form(call.params)
        body: bytes | None = None
        if call.method != "GET":
            # Encoded once for every attempt; a GET carries the pairs in its query.
            body = form_body(form)
            headers["Content-Type"] = FORM_CONTENT_TYPE
        url = self._settings.stripe_api_base + call.path
        loop = asyncio.get_running_loop()
        max_attempts = 1 + self._settings.stripe_max_retries
        attempt_no = 0
        last: Attempt | None = None
        while True:
            if self._pace is not None:
                # The upstream budget (service/upstream_budget.py): the wait counts
                # against the call's deadline like any other, and a budget with no
                # slot in time raises upstream_unavailable (no verdict on Stripe).
                await self._pace(call.deadline, background=self._background)
            remaining = call.deadline - loop.time()
            if remaining <= 0:
                raise final_error(last, retryable=True, expected=call.expect)
            attempt_no += 1
            last = await self._exchange(
                call.method,
                url,
                form if body is None else body,
                headers,
                min(remaining, self._settings.stripe_timeout_seconds),
            )
            # On this request's log lines (its canonical access line too), failed or not.
            structlog.contextvars.bind_contextvars(
                attempts=attempt_no, upstream_request_id=last.request_id
            )
            if last.outcome == "success":
                body = last.body
                if (
                    isinstance(body, dict)
                    and body.get("object") == call.expect
                    and call.valid(body)
                ):
                    return Reply(body, last.request_id, attempt_no)
                # A 2xx that is not what we asked for (truncated, HTML from a proxy,
                # another object): not retried, since Stripe may have acted on it.
                last.outcome = "bad_response"
            again, reason = retry.should_retry(
                last.outcome, last.status, last.headers.get("Stripe-Should-Retry")
            )
            if again and attempt_no < max_attempts:
                delay = retry.sleep_time(
                    attempt_no,
                    initial=self._settings.stripe_backoff_initial_seconds,
                    maximum=self._settings.stripe_backoff_max_seconds,
                    retry_after=retry.parse_retry_after(last.headers.get("Retry-After")),
                )
                # Honour the wait only if an attempt still fits after it.
                if loop.time() + delay < call.deadline:
                    if self._metrics is not None:
                        self._metrics.upstream_retries.labels(reason=reason).inc()
                    await asyncio.sleep(delay)
                    continue
            raise final_error(last, retryable=again, expected=call.expect)

    async def _exchange(
        self,
        method: str,
        url: str,
        payload: list[tuple[str, str]] | bytes,
        headers: dict[str, str],
        attempt_timeout: float,
    ) -> Attempt:
        """One HTTP exchange, bounded in time and size, counted in the metrics."""
        started = time.perf_counter()
        # total bounds the whole exchange (pool wait, connect, send, read the body);
        # sock_connect bounds the TCP+TLS handshake on its own.
        timeout = aiohttp.ClientTimeout(
            total=attempt_timeout,
            sock_connect=min(attempt_timeout, self._settings.stripe_connect_timeout_seconds),
        )
        # A GET carries its params in the query string, a POST its encoded form body.
        query, data = (None, payload) if isinstance(payload, bytes) else (payload, None)
        try:
            async with self._session.request(
                method,
                url,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,  # Stripe never redirects; never resend the key elsewhere
                params=query,
                data=data,
            ) as resp:
                try:
                    raw = await read_bounded(resp.content, MAX_RESPONSE_BYTES, resp.content_length)
                except BodyTooLarge:
                    result = Attempt("bad_response", resp.status, kept_headers(resp.headers))
                else:
                    result = classify(resp.status, resp.headers, raw)
        except TimeoutError:
            result = Attempt("timeout")
        except aiohttp.ClientError:
            # Refused, reset, or a body cut short (ClientPayloadError): the answer,
            # if any, is lost; the same Idempotency-Key makes a retry safe.
            result = Attempt("connection_error")
        if self._metrics is not None:
            self._metrics.upstream_attempt(
                result.outcome, result.status, time.perf_counter() - started
            )
        return result
