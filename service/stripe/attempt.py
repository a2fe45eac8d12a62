"""What one HTTP exchange with Stripe produced, classified for retries and errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

# The headers of Stripe's answer that retries, logs and audit use.
KEPT_HEADERS = ("Request-Id", "Retry-After", "Stripe-Should-Retry")


@dataclass(slots=True)
class Attempt:
    """One exchange: ``outcome`` is success, client_error, rate_limited, server_error,
    timeout, connection_error or bad_response (a bounded metric label)."""

    outcome: str
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None

    @property
    def request_id(self) -> str | None:
        """Stripe's ``Request-Id``: what Stripe support asks for."""
        return self.headers.get("Request-Id")


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an answer we keep (never the whole set: it can be large)."""
    return {k: headers[k] for k in KEPT_HEADERS if k in headers}


def classify(status: int, headers: Mapping[str, str], raw: bytes) -> Attempt:
    """An answer Stripe gave, by its status; a body that is not JSON is None."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    if 200 <= status < 300:
        outcome = "success"
    elif status == 429:
        outcome = "rate_limited"
    elif status >= 500:
        outcome = "server_error"
    else:
        outcome = "client_error"
    return Attempt(outcome, status, kept_headers(headers), body)
