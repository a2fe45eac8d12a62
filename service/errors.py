"""Domain errors: each knows its HTTP status and stable ``code``.

The error middleware turns any :class:`ServiceError` into an RFC 9457
``application/problem+json`` body in one place (``problem_body``). Callers rely
on ``code``; ``detail`` is for humans and never contains a secret or a URL
handed out by Stripe.
"""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus
from typing import Any, ClassVar

PROBLEM_CONTENT_TYPE = "application/problem+json"

# Every `code` a caller can see, by HTTP status (SPEC §2, and the mapping API's of
# §11): the OpenAPI enums and the metrics' pre-created labels are made from this
# one table (each operation documents its part of it, see codes_by_status).
CODES_BY_STATUS: dict[int, tuple[str, ...]] = {
    400: ("malformed_json", "invalid_header", "header_too_large"),
    401: ("unauthenticated",),
    403: ("forbidden_user", "insufficient_scope", "return_url_not_allowed"),
    404: (
        "unknown_user",
        "unknown_subscription",
        "no_open_subscription",
        "unknown_plan",
        "unknown_offer",
        "unknown_portal",
        "portal_link_not_found",
    ),
    408: ("request_timeout",),
    409: (
        "subscription_ambiguous",
        "subscription_not_open",
        "subscription_not_updatable",
        "idempotency_conflict",
        "customer_already_mapped",
        # The portal checks of SPEC §12: the profile's configuration would refuse it.
        "portal_inactive",
        "portal_feature_disabled",
        "plan_not_offered",
        "portal_account_mismatch",
    ),
    # A portal link that was opened already, ran out or lost its creator (SPEC §13).
    410: ("portal_link_used", "portal_link_expired", "portal_link_revoked"),
    413: ("payload_too_large",),
    415: ("unsupported_media_type",),
    422: ("validation_failed", "stripe_customer_not_found"),
    429: ("rate_limited",),
    500: ("internal_error",),
    501: ("portal_links_disabled",),
    502: ("upstream_rejected", "upstream_auth_failed", "upstream_bad_response"),
    503: ("upstream_unavailable", "database_unavailable", "overloaded", "draining"),
    504: ("upstream_timeout",),
}


# The codes only the mapping API (SPEC §11) answers: no other operation documents them.
MAPPING_API_CODES = frozenset({"customer_already_mapped", "stripe_customer_not_found"})
# The codes only the portal-link operations answer (SPEC §13).
PORTAL_LINK_CODES = frozenset(
    {
        "portal_link_not_found",
        "portal_link_used",
        "portal_link_expired",
        "portal_link_revoked",
        "portal_links_disabled",
    }
)


def codes_by_status(
    only: Collection[str] | None = None, *, excluding: Collection[str] = ()
) -> dict[int, tuple[str, ...]]:
    """An operation's part of CODES_BY_STATUS: the codes in ``only`` (default all)
    and not in ``excluding``; a status left with none is left out."""
    table: dict[int, tuple[str, ...]] = {}
    for status, codes in CODES_BY_STATUS.items():
        kept = tuple(c for c in codes if (only is None or c in only) and c not in excluding)
        if kept:
            table[status] = kept
    return table


class ServiceError(Exception):
    """Base of every error a caller can see."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        code: str | None = None,
        detail: str = "",
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code or self.default_code
        self.detail = detail
        self.extra = extra or {}
        self.headers = headers or {}
        # Stripe's Request-Id for errors that came back from Stripe (logs and audit).
        self.stripe_request_id: str | None = None
        super().__init__(f"{self.code}: {detail}")


class BadRequest(ServiceError):
    status = 400
    default_code = "malformed_json"


class Unauthenticated(ServiceError):
    """401. The detail is deliberately the same whatever went wrong."""

    status = 401
    default_code = "unauthenticated"

    def __init__(self, reason: str = "invalid") -> None:
        # `reason` feeds metrics and logs only; the caller never learns it.
        super().__init__(
            detail="A valid bearer token is required.",
            headers={"WWW-Authenticate": 'Bearer realm="portal-gateway"'},
        )
        self.reason = reason


class Forbidden(ServiceError):
    status = 403
    default_code = "forbidden_user"


class NotFound(ServiceError):
    status = 404
    default_code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    default_code = "method_not_allowed"


class RequestTimeout(ServiceError):
    """408: the body did not arrive within BODY_READ_TIMEOUT_SECONDS (SPEC §5)."""

    status = 408
    default_code = "request_timeout"


class Conflict(ServiceError):
    status = 409
    default_code = "conflict"


class Gone(ServiceError):
    """410: a portal link that was opened already or ran out (SPEC §13)."""

    status = 410
    default_code = "portal_link_used"


class PayloadTooLarge(ServiceError):
    status = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    default_code = "unsupported_media_type"


class ValidationFailed(ServiceError):
    """422 with a field map keyed by dotted path."""

    status = 422
    default_code = "validation_failed"

    def __init__(self, errors: dict[str, list[str]], detail: str = "") -> None:
        super().__init__(
            detail=detail or "The request body is not valid.", extra={"errors": errors}
        )
        self.errors = errors


class StripeCustomerNotFound(ServiceError):
    """422: the body is well-formed, but Stripe has no such customer for us: unknown
    (on that connected account), deleted, or of the other test/live mode (SPEC §11)."""

    status = 422
    default_code = "stripe_customer_not_found"


class RateLimited(ServiceError):
    status = 429
    default_code = "rate_limited"

    def __init__(self, retry_after: int, *, first_of_window: bool = True) -> None:
        super().__init__(
            detail="Too many requests; retry later.",
            headers={"Retry-After": str(max(1, retry_after))},
        )
        # Whether this refusal opens its principal's window, the one with an audit
        # row (SPEC §6; service/ratelimit.py decides).
        self.first_of_window = first_of_window


class ClientClosedRequest(ServiceError):
    """The caller hung up before its answer (nginx's 499).

    Decided like any refusal (logged, counted, audited), never a 500; nobody is
    left to read a body, so none is rendered (499 has no standard phrase).
    """

    status = 499
    default_code = "client_closed_request"


class UpstreamError(ServiceError):
    """Stripe did not give us a usable session (502)."""

    status = 502
    default_code = "upstream_rejected"


class ServiceUnavailable(ServiceError):
    status = 503
    default_code = "upstream_unavailable"


class UpstreamTimeout(ServiceError):
    status = 504
    default_code = "upstream_timeout"


class DatabaseUnavailable(ServiceUnavailable):
    default_code = "database_unavailable"

    def __init__(self, detail: str = "The database is unavailable; retry later.") -> None:
        super().__init__(detail=detail, headers={"Retry-After": "1"})


class NotConfigured(ServiceError):
    """501: a feature this deployment has not been configured for."""

    status = 501
    default_code = "portal_links_disabled"


class InternalError(ServiceError):
    status = 500
    default_code = "internal_error"


def problem_body(error: ServiceError, request_id: str) -> dict[str, Any]:
    """The RFC 9457 problem document for an error."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(error.status).phrase,
        "status": error.status,
        "code": error.code,
        "detail": error.detail or HTTPStatus(error.status).description,
        "request_id": request_id,
    }
    body.update(error.extra)
    return body
