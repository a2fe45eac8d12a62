"""Stripe's errors that are not about parameters, worded as Stripe words them.

Missing or invalid API keys, a ``Stripe-Account`` the key cannot act as,
Stripe's own 500, rate limits, lock timeouts and idempotency conflicts, plus
the dashboard log URL Stripe puts in error bodies.
(Parameter errors come from :mod:`.validation`.)
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .responses import current_request_id, json_response
from .validation import StripeError

__all__ = [
    "API_ERROR",
    "NO_API_KEY",
    "error_body_for",
    "error_response",
    "no_account_access",
    "request_log_url",
]

NO_API_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/."
)
API_ERROR = (
    "Sorry, something went wrong. We've already been notified of the problem, but if you "
    "need any help, you can reach us at support.stripe.com/contact."
)
_RATE_LIMIT = (
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
_LOCK_TIMEOUT = (
    "This object cannot be accessed right now because another API request or Stripe "
    "process is currently accessing it. If you see this error intermittently, retry the "
    "request. If you see this error frequently and are making multiple concurrent requests "
    "to a single object, make your requests serially or at a lower rate. See "
    "https://stripe.com/docs/rate-limits for more details."
)
_IDEMPOTENCY_IN_USE = (
    "There is currently another in-progress request using this Idempotent Key (that "
    "probably means you submitted twice, and the other request is still going through). "
    "Please try again later."
)


def no_account_access(masked_key: str, account: str) -> StripeError:
    """Stripe's answer to a ``Stripe-Account`` the key cannot act as (or that does not exist)."""
    return StripeError(
        f"The provided key '{masked_key}' does not have access to account '{account}' "
        "(or that account does not exist). Application access may have been revoked.",
        status=403,
        code="account_invalid",
    )


def request_log_url(request_id: str) -> str:
    return f"https://dashboard.stripe.com/test/logs/{request_id}?t={int(time.time())}"


def error_response(error: StripeError) -> web.Response:
    # Stripe has no dashboard log for a request it could not tie to an account.
    log_url = None if error.status == 401 else request_log_url(current_request_id.get())
    headers = {"WWW-Authenticate": 'Bearer realm="Stripe"'} if error.status == 401 else None
    return json_response(error.body(log_url), error.status, headers)


def error_body_for(status: int, code: str | None, request_id: str) -> dict[str, Any]:
    """The error body Stripe sends with ``status`` (and ``code``), as far as it is known."""
    log_url = request_log_url(request_id)
    if status == 429:
        code = code or "rate_limit"
        message = _LOCK_TIMEOUT if code == "lock_timeout" else _RATE_LIMIT
        return StripeError(message, status=status, code=code).body(log_url)
    if status >= 500:
        return StripeError(API_ERROR, status=status, type="api_error", code=code).body(log_url)
    if status == 401:
        return StripeError(NO_API_KEY, status=status, code=code).body()
    if status == 409:
        code = code or "idempotency_key_in_use"
        return StripeError(_IDEMPOTENCY_IN_USE, status=status, code=code).body(log_url)
    message = f"Injected error ({status})."
    return StripeError(message, status=status, code=code).body(log_url)
