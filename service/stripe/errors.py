"""One mapping from Stripe's answer to the ``ServiceError`` our caller sees.

Each error also carries a verdict on Stripe's health for the circuit breaker:
Stripe refusing the request itself (a 4xx) says Stripe is fine; timeouts,
connection errors, 409/429/5xx and answers we cannot read say it is not.
Stripe's own ``message`` is never passed on: it can echo ids and params.
"""

from __future__ import annotations

from typing import Any

from service.errors import ServiceError, ServiceUnavailable, UpstreamError, UpstreamTimeout
from service.stripe.attempt import Attempt
from service.stripe.retry import retry_after_hint


class Failed(Exception):
    """A call failed: the caller's error and what it says about Stripe's health."""

    def __init__(self, error: ServiceError, healthy: bool | None) -> None:
        super().__init__(error.code)
        self.error = error
        self.healthy = healthy


def final_error(attempt: Attempt | None, *, retryable: bool, expected: str) -> Failed:
    """The caller-facing error once no further attempt will be made.

    ``attempt`` None means the deadline went before Stripe was asked: a
    timeout with no verdict on Stripe's health. Timeouts are 504; anything
    transient (or flagged retryable by Stripe) is 503 with a Retry-After; 401
    and 403 are our key; other 4xx are Stripe rejecting the request.
    """
    if attempt is None:
        return Failed(_with_request_id(UpstreamTimeout(detail=_TIMEOUT), None), None)
    err: ServiceError
    healthy = False
    if attempt.outcome == "timeout":
        err = UpstreamTimeout(detail=_TIMEOUT)
    elif attempt.outcome == "bad_response":
        err = UpstreamError(
            "upstream_bad_response",
            f"Stripe answered with something that is not a {expected}.",
            extra={"upstream": {"request_id": attempt.request_id}},
        )
    elif retryable or attempt.outcome != "client_error" or attempt.status == 409:
        err = ServiceUnavailable(
            "upstream_unavailable",
            "Stripe is unavailable; retry later.",
            headers={"Retry-After": str(retry_after_hint(attempt.headers.get("Retry-After")))},
        )
    elif attempt.status in (401, 403):
        # Our key is wrong or revoked: nothing the caller did; page the on-call.
        healthy = True
        err = UpstreamError("upstream_auth_failed", "The service could not authenticate to Stripe.")
    else:
        healthy = True
        err = UpstreamError(
            "upstream_rejected",
            "Stripe rejected the request.",
            extra={"upstream": _upstream_info(attempt)},
        )
    return Failed(_with_request_id(err, attempt.request_id), healthy)


_TIMEOUT = "Stripe did not answer within the deadline."


def _with_request_id(err: ServiceError, request_id: str | None) -> ServiceError:
    err.stripe_request_id = request_id
    return err


def _upstream_info(attempt: Attempt) -> dict[str, Any]:
    error = attempt.body.get("error") if isinstance(attempt.body, dict) else None
    error = error if isinstance(error, dict) else {}
    info: dict[str, Any] = {
        key: error.get(key) if isinstance(error.get(key), str) else None
        for key in ("type", "code", "param")
    }
    info["request_id"] = attempt.request_id
    info["status"] = attempt.status
    return info


def upstream_error_code(error: ServiceError) -> str | None:
    """Stripe's own error code carried by an ``upstream_rejected`` error, if any."""
    upstream = error.extra.get("upstream")
    return upstream.get("code") if isinstance(upstream, dict) else None
