"""The Stripe stand-in's aiohttp application.

Two faces:

* the imitation of Stripe's API (``/v1/...``): ``POST /v1/billing_portal/sessions``
  validated as strictly as Stripe does it, ``GET /v1/subscriptions`` over seeded
  data, API-key auth, idempotency keys, ``Request-Id`` headers and Stripe-shaped
  errors;
* a control API (``/_standin/...``, no auth) through which tests and the demo
  read what was received and script what happens next: queued faults (5xx, 429,
  latency, hangs, connection resets, truncated or non-JSON bodies), ids that do
  not exist, and the subscriptions the list endpoint returns.

All of it lives in one :class:`StandinState` (``app[STATE]``), so in-process
tests can inspect and script it directly as well.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import secrets
import socket
import string
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qsl

from aiohttp import web

from .validation import (
    LIST_STATUS_FILTERS,
    LIST_SUBSCRIPTIONS,
    PORTAL_SESSION,
    SUBSCRIPTION_STATUSES,
    IdRef,
    Params,
    StripeError,
    Value,
    decode_form,
    list_subscription_ids,
    portal_session_ids,
    validate,
)

__all__ = [
    "DEFAULT_API_KEY_PREFIXES",
    "DEFAULT_API_VERSION",
    "DEFAULT_CONFIGURATION",
    "REDACTED",
    "STATE",
    "ControlError",
    "Fault",
    "RecordedRequest",
    "StandinState",
    "create_app",
    "mask_api_key",
]

log = logging.getLogger("stripe_standin")

DEFAULT_API_KEY_PREFIXES: Final = ("sk_test_", "rk_test_")
DEFAULT_API_VERSION: Final = "2025-09-30.clover"
# The configuration Stripe would pick when the request names none.
DEFAULT_CONFIGURATION: Final = "bpc_1StandinDefaultConfig0"
# Stands in for the Authorization header in recorded requests: tests must be
# able to dump recordings without leaking the key they used.
REDACTED: Final = "[redacted]"

_ALNUM = string.ascii_letters + string.digits
_FORM = "application/x-www-form-urlencoded"
_MAX_IDEMPOTENCY_KEY = 255
_MAX_FAULT_REPEAT = 10_000
_MAX_LATENCY_MS = 600_000.0
# How often a hanging request looks whether its client has given up.
_HANG_POLL_SECONDS = 0.02

_NO_API_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/."
)
_API_ERROR = (
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
_HTML_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    "<body><h1>502 Bad Gateway</h1><p>The proxy could not reach the upstream.</p></body>"
    "</html>\n"
)

_request_id: ContextVar[str] = ContextVar("stripe_standin_request_id", default="req_unknown")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def _dumps(value: object) -> str:
    # Stripe pretty-prints its JSON; clients must not depend on either form.
    return json.dumps(value, indent=2)


def mask_api_key(key: str) -> str:
    """Mask a key the way Stripe's 401 message does: mode prefix and last 4 at most."""
    match = re.match(r"[a-z]{2,4}_(?:test|live)_", key)
    shown = match.group(0) if match else ""
    rest = key[len(shown) :]
    # Short secrets are masked whole: their last four would be too much of them.
    tail = rest[-4:] if len(rest) >= 12 else ""
    return shown + "*" * (len(rest) - len(tail)) + tail


class ControlError(ValueError):
    """Bad input to the control API or to the matching :class:`StandinState` methods."""


# --------------------------------------------------------------------------- recordings


@dataclass
class RecordedRequest:
    """One request that reached an API route, as the stand-in saw it."""

    method: str
    path: str
    headers: dict[str, str]
    params: Params | None  # None when the body could not be decoded at all
    raw: list[tuple[str, str]]
    idempotency_key: str | None
    request_id: str
    # None while in flight, and for faults that never answer (hang, reset).
    status: int | None = None
    fault: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "params": self.params,
            "raw": [[key, value] for key, value in self.raw],
            "idempotency_key": self.idempotency_key,
            "status": self.status,
            "request_id": self.request_id,
            "fault": self.fault,
        }


# --------------------------------------------------------------------------- faults

FaultKind = Literal["latency", "status", "hang", "reset", "truncated", "non_json", "wrong_object"]
_ACTION_FLAGS: Final = ("hang", "reset", "truncated", "non_json", "wrong_object")
_FAULT_FIELDS: Final = frozenset(
    {"status", "headers", "body", "code", "latency_ms", "repeat", *_ACTION_FLAGS}
)


@dataclass(frozen=True)
class Fault:
    """What to do to one API request instead of (or before) answering it normally."""

    kind: FaultKind
    latency_ms: float = 0.0
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: object = None
    code: str | None = None
    truncated: Literal["length", "json"] = "length"
    wrong_object: str = "billing_portal.configuration"

    @classmethod
    def parse(cls, spec: object) -> tuple[Fault, int]:
        """Read one fault of the control API's JSON form; returns it and its repeat count."""
        if not isinstance(spec, dict):
            raise ControlError("each fault must be a JSON object")
        unknown = sorted(set(spec) - _FAULT_FIELDS)
        if unknown:
            raise ControlError(f"unknown fault field(s): {', '.join(unknown)}")
        repeat = spec.get("repeat", 1)
        if not _is_int(repeat) or not 1 <= repeat <= _MAX_FAULT_REPEAT:
            raise ControlError(f"repeat must be an integer from 1 to {_MAX_FAULT_REPEAT}")
        latency = spec.get("latency_ms", 0)
        if not _is_number(latency) or not 0 <= latency <= _MAX_LATENCY_MS:
            raise ControlError(f"latency_ms must be a number from 0 to {_MAX_LATENCY_MS:.0f}")
        status = spec.get("status")
        if status is not None and (not _is_int(status) or not 100 <= status <= 599):
            raise ControlError("status must be an HTTP status code (100-599)")
        headers = _parse_headers(spec.get("headers", {}))
        code = spec.get("code")
        if code is not None and not isinstance(code, str):
            raise ControlError("code must be a string")
        body = spec.get("body")

        actions = [flag for flag in _ACTION_FLAGS if spec.get(flag) not in (None, False)]
        if len(actions) > 1:
            raise ControlError(f"a fault takes one action, got {', '.join(actions)}")
        if actions:
            kind = cast(FaultKind, actions[0])
            if kind in ("hang", "reset") and (status, body, code, spec.get("headers")) != (
                None,
                None,
                None,
                None,
            ):
                raise ControlError(
                    f"{kind} sends no response: status/headers/body/code not allowed"
                )
            if body is not None or code is not None:
                raise ControlError("body and code go with a plain status fault")
            truncated: Literal["length", "json"] = "length"
            wrong_object = "billing_portal.configuration"
            if kind == "truncated":
                truncated = _parse_truncated(spec["truncated"])
            elif kind == "wrong_object":
                wrong_object = _parse_wrong_object(spec["wrong_object"])
            elif spec[kind] is not True:
                raise ControlError(f"{kind} must be true")
            fault = cls(
                kind=kind,
                latency_ms=float(latency),
                status=status,
                headers=headers,
                truncated=truncated,
                wrong_object=wrong_object,
            )
        elif status is not None:
            if status < 400 and body is None:
                raise ControlError("a status fault below 400 needs a body")
            fault = cls(
                kind="status",
                latency_ms=float(latency),
                status=status,
                headers=headers,
                body=body,
                code=code,
            )
        else:
            if body is not None or code is not None:
                raise ControlError("body and code go with a status")
            fault = cls(kind="latency", latency_ms=float(latency), headers=headers)
        return fault, repeat

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "latency_ms": self.latency_ms}
        if self.status is not None:
            out["status"] = self.status
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.body is not None:
            out["body"] = self.body
        if self.code is not None:
            out["code"] = self.code
        if self.kind == "truncated":
            out["truncated"] = self.truncated
        if self.kind == "wrong_object":
            out["wrong_object"] = self.wrong_object
        return out


def _is_int(value: object) -> bool:
    # JSON true/false are ints in Python; a fault spec must not accept them as numbers.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _parse_headers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ControlError("headers must be an object of name to value")
    headers: dict[str, str] = {}
    for name, header_value in value.items():
        if isinstance(header_value, bool) or not isinstance(header_value, str | int | float):
            raise ControlError(f"header {name!r} must be a string or number")
        text = str(header_value)
        if any(ch in text or ch in name for ch in "\r\n"):
            raise ControlError(f"header {name!r} must be on one line")
        headers[name] = text
    return headers


def _parse_truncated(value: object) -> Literal["length", "json"]:
    if value is True or value == "length":
        return "length"
    if value == "json":
        return "json"
    raise ControlError('truncated must be true, "length" or "json"')


def _parse_wrong_object(value: object) -> str:
    if value is True:
        return "billing_portal.configuration"
    if isinstance(value, str) and value:
        return value
    raise ControlError("wrong_object must be true or the object name to send")


def _default_fault_body(status: int, code: str | None, request_id: str) -> dict[str, Any]:
    """The error body Stripe sends with ``status`` (and ``code``), as far as it is known."""
    log_url = _request_log_url(request_id)
    if status == 429:
        code = code or "rate_limit"
        message = _LOCK_TIMEOUT if code == "lock_timeout" else _RATE_LIMIT
        return StripeError(message, status=status, code=code).body(log_url)
    if status >= 500:
        return StripeError(_API_ERROR, status=status, type="api_error", code=code).body(log_url)
    if status == 401:
        return StripeError(_NO_API_KEY, status=status, code=code).body()
    if status == 409:
        code = code or "idempotency_key_in_use"
        return StripeError(_IDEMPOTENCY_IN_USE, status=status, code=code).body(log_url)
    message = f"Injected error ({status})."
    return StripeError(message, status=status, code=code).body(log_url)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class _StoredResponse:
    """A response remembered under an idempotency key."""

    method: str
    path: str
    fingerprint: str
    status: int
    body: bytes
    request_id: str


class StandinState:
    """Everything the stand-in remembers: recordings, scripted faults and seeded data."""

    def __init__(
        self,
        *,
        api_key_prefixes: tuple[str, ...] = DEFAULT_API_KEY_PREFIXES,
        latency_ms: float = 0.0,
    ) -> None:
        self.api_key_prefixes = api_key_prefixes
        self.default_latency_ms = latency_ms
        self.latency_ms = latency_ms
        self.requests: list[RecordedRequest] = []
        self.faults: deque[Fault] = deque()
        self.missing_ids: set[str] = set()
        # Insertion-ordered so list order is stable for equal ``created`` times.
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.idempotency: dict[tuple[str, str], _StoredResponse] = {}
        # Set on shutdown: latencies and hangs end early so the server can stop.
        self.closing = asyncio.Event()

    # -- recordings

    def requests_json(self) -> list[dict[str, Any]]:
        return [recorded.to_json() for recorded in self.requests]

    def clear_requests(self) -> int:
        count = len(self.requests)
        self.requests.clear()
        return count

    # -- faults and latency

    def queue_faults(self, specs: Iterable[object]) -> int:
        """Queue faults (control-API JSON form); all or none. Returns how many were queued."""
        parsed = [Fault.parse(spec) for spec in specs]
        for fault, repeat in parsed:
            self.faults.extend([fault] * repeat)
        return sum(repeat for _, repeat in parsed)

    def next_fault(self) -> Fault | None:
        return self.faults.popleft() if self.faults else None

    def clear_faults(self) -> int:
        count = len(self.faults)
        self.faults.clear()
        return count

    def set_latency(self, ms: object) -> float:
        if not _is_number(ms) or not 0 <= cast(float, ms) <= _MAX_LATENCY_MS:
            raise ControlError(f"ms must be a number from 0 to {_MAX_LATENCY_MS:.0f}")
        self.latency_ms = float(cast(float, ms))
        return self.latency_ms

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server shuts down."""
        if seconds <= 0 or self.closing.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), timeout=seconds)

    # -- ids that do not exist

    def declare_missing(self, ids: Iterable[object]) -> int:
        checked = list(ids)
        if not all(isinstance(value, str) and value for value in checked):
            raise ControlError("ids must be non-empty strings")
        self.missing_ids.update(cast(list[str], checked))
        return len(checked)

    def clear_missing(self) -> int:
        count = len(self.missing_ids)
        self.missing_ids.clear()
        return count

    def check_ids(self, refs: Iterable[IdRef]) -> None:
        """Answer like Stripe for an id that is malformed or declared missing."""
        for ref in refs:
            if not ref.looks_valid() or ref.value in self.missing_ids:
                raise ref.error()

    # -- subscriptions for GET /v1/subscriptions

    def seed_subscriptions(self, seeds: Iterable[object]) -> int:
        """Add or replace (by id) subscriptions; all or none. Returns how many were given."""
        now = int(time.time())
        objects = [_subscription_object(seed, now) for seed in seeds]
        for obj in objects:
            self.subscriptions[obj["id"]] = obj
        return len(objects)

    def clear_subscriptions(self) -> int:
        count = len(self.subscriptions)
        self.subscriptions.clear()
        return count

    def reset(self) -> None:
        """Forget everything: recordings, faults, latency, missing ids, seeds, idempotency."""
        self.requests.clear()
        self.faults.clear()
        self.latency_ms = self.default_latency_ms
        self.missing_ids.clear()
        self.subscriptions.clear()
        self.idempotency.clear()


STATE: Final = web.AppKey("stripe_standin.state", StandinState)


def _subscription_object(seed: object, now: int) -> dict[str, Any]:
    """A Stripe subscription object from a control-API seed."""
    if not isinstance(seed, dict):
        raise ControlError("each subscription must be a JSON object")
    sub_id = seed.get("id")
    if not isinstance(sub_id, str) or not sub_id.startswith("sub_") or sub_id == "sub_":
        raise ControlError(f"subscription id must be a sub_ id, got {sub_id!r}")
    customer = seed.get("customer")
    if not isinstance(customer, str) or not customer.startswith("cus_"):
        raise ControlError(f"{sub_id}: customer must be a cus_ id")
    status = seed.get("status", "active")
    if status not in SUBSCRIPTION_STATUSES:
        raise ControlError(f"{sub_id}: status must be one of {', '.join(SUBSCRIPTION_STATUSES)}")
    created = seed.get("created", now)
    if not _is_int(created):
        raise ControlError(f"{sub_id}: created must be a unix time")
    raw_items = seed.get("items", [])
    if not isinstance(raw_items, list):
        raise ControlError(f"{sub_id}: items must be a list")
    items = [_subscription_item(sub_id, item, created) for item in raw_items]
    # Fields the stand-in does not model (metadata, current_period_end...) pass through.
    extra = {
        k: v for k, v in seed.items() if k not in ("id", "customer", "status", "created", "items")
    }
    return {
        **extra,
        "id": sub_id,
        "object": "subscription",
        "created": created,
        "customer": customer,
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
        "livemode": False,
        "status": status,
    }


def _subscription_item(sub_id: str, item: object, created: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ControlError(f"{sub_id}: each item must be a JSON object")
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id.startswith("si_"):
        raise ControlError(f"{sub_id}: item id must be an si_ id")
    price = item.get("price")
    if isinstance(price, str):
        price = {"id": price}
    if not isinstance(price, dict) or not str(price.get("id", "")).startswith("price_"):
        raise ControlError(f"{item_id}: price must be a price_ id or an object with one")
    quantity = item.get("quantity", 1)
    if not _is_int(quantity) or quantity < 0:
        raise ControlError(f"{item_id}: quantity must be a non-negative integer")
    return {
        "id": item_id,
        "object": "subscription_item",
        "created": created,
        "price": {"object": "price", **price},
        "quantity": quantity,
        "subscription": sub_id,
    }


# --------------------------------------------------------------------------- API plumbing


@dataclass(frozen=True)
class ApiCall:
    """An authenticated, decoded API request handed to a route's implementation."""

    method: str
    path: str
    params: Params
    api_key: str


@dataclass(frozen=True)
class _ApiRoute:
    # Synchronous on purpose: with no await between the idempotency lookup and the
    # store, two requests with one key cannot both create a session.
    impl: Callable[[StandinState, ApiCall], dict[str, Any]]
    # The body a wrong_object/truncated fault distorts; never validated.
    fake_body: Callable[[Params | None], dict[str, Any]]


def _request_log_url(request_id: str) -> str:
    return f"https://dashboard.stripe.com/test/logs/{request_id}?t={int(time.time())}"


def _json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_dumps(body).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def _error_response(error: StripeError) -> web.Response:
    # Stripe has no dashboard log for a request it could not tie to an account.
    log_url = None if error.status == 401 else _request_log_url(_request_id.get())
    headers = {"WWW-Authenticate": 'Bearer realm="Stripe"'} if error.status == 401 else None
    return _json_response(error.body(log_url), error.status, headers)


def _authenticate(header: str | None, prefixes: tuple[str, ...]) -> str:
    """The API key of a request, or the 401 Stripe answers."""
    credentials = (header or "").strip()
    scheme, _, rest = credentials.partition(" ")
    if scheme.lower() == "bearer":
        key = rest.strip()
    elif scheme.lower() == "basic":
        # curl -u sk_test_...: sends the key as the Basic user name, as Stripe allows.
        try:
            key = base64.b64decode(rest.strip(), validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            key = rest.strip()
    else:
        key = credentials
    if not key:
        raise StripeError(_NO_API_KEY, status=401)
    if not any(key.startswith(prefix) and len(key) > len(prefix) for prefix in prefixes):
        raise StripeError(f"Invalid API Key provided: {mask_api_key(key)}", status=401)
    return key


_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}(?:\.[a-z]+)?(?:;.*)?")


def _check_version(version: str | None) -> None:
    if version is not None and _VERSION_RE.fullmatch(version.strip()) is None:
        raise StripeError(f"Invalid Stripe API version: {version}")


async def _read_pairs(request: web.Request) -> tuple[list[tuple[str, str]], StripeError | None]:
    """The request's form pairs (query, then body) and the error to answer with, if any."""
    try:
        pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True, errors="strict")
        body = await request.read() if request.can_read_body else b""
        if body:
            if request.content_type != _FORM:
                return pairs, StripeError(
                    f"Invalid request: unsupported Content-Type {request.content_type}. "
                    "If error persists and you need assistance, please contact "
                    "support@stripe.com."
                )
            pairs += parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return [], StripeError("Invalid request: the parameters are not valid UTF-8.")
    return pairs, None


def _recorded_headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        shown = REDACTED if name.lower() == "authorization" else value
        headers[name] = f"{headers[name]}, {shown}" if name in headers else shown
    return headers


def _api_headers(request: web.Request, record: RecordedRequest) -> dict[str, str]:
    headers = {
        "Request-Id": _request_id.get(),
        "Stripe-Version": request.headers.get("Stripe-Version", DEFAULT_API_VERSION),
        "Cache-Control": "no-cache, no-store",
    }
    if record.idempotency_key is not None and request.method == "POST":
        headers["Idempotency-Key"] = record.idempotency_key
    return headers


def _api_handler(route: _ApiRoute) -> Handler:
    """Wrap a route: record, delay, inject the next fault, or answer it normally."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        pairs, read_error = await _read_pairs(request)
        params: Params | None = None
        if read_error is None:
            try:
                params = decode_form(pairs)
            except StripeError as error:
                read_error = error
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=_recorded_headers(request),
            params=params,
            raw=pairs,
            idempotency_key=request.headers.get("Idempotency-Key"),
            request_id=_request_id.get(),
        )
        state.requests.append(record)
        fault = state.next_fault()
        if fault is not None:
            record.fault = fault.kind
        try:
            delay_ms = state.latency_ms + (fault.latency_ms if fault is not None else 0.0)
            await state.pause(delay_ms / 1000)
            response: web.StreamResponse | None = None
            if fault is not None:
                response = await _fault_response(request, state, fault, record, route, params)
            if response is None:
                response = _answer(request, state, route, record, params, read_error)
                if fault is not None:
                    response.headers.update(fault.headers)
        except Exception:
            # The stand-in's own bug: answer like Stripe's 500 so the client sees an error.
            log.exception("stripe stand-in failed on %s %s", request.method, request.path)
            response = _error_response(StripeError(_API_ERROR, status=500, type="api_error"))
        if not response.prepared:
            for name, value in _api_headers(request, record).items():
                response.headers.setdefault(name, value)
        if fault is None or fault.kind not in ("hang", "reset"):
            record.status = response.status
        return response

    return handle


def _answer(
    request: web.Request,
    state: StandinState,
    route: _ApiRoute,
    record: RecordedRequest,
    params: Params | None,
    read_error: StripeError | None,
) -> web.Response:
    """The normal answer: auth, headers, idempotency, then the route itself."""
    try:
        api_key = _authenticate(request.headers.get("Authorization"), state.api_key_prefixes)
        _check_version(request.headers.get("Stripe-Version"))
        if read_error is not None:
            raise read_error
        assert params is not None  # decoded whenever there was no read error
        key = record.idempotency_key if request.method == "POST" else None
        if key is not None and not 1 <= len(key) <= _MAX_IDEMPOTENCY_KEY:
            raise StripeError(
                "Invalid Idempotency-Key: it must be between 1 and "
                f"{_MAX_IDEMPOTENCY_KEY} characters long."
            )
        fingerprint = json.dumps(params, sort_keys=True)
        if key is not None:
            stored = state.idempotency.get((api_key, key))
            if stored is not None:
                same = (stored.method, stored.path, stored.fingerprint) == (
                    request.method,
                    request.path,
                    fingerprint,
                )
                if not same:
                    raise StripeError(
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                        type="idempotency_error",
                    )
                return web.Response(
                    body=stored.body,
                    status=stored.status,
                    content_type="application/json",
                    charset="utf-8",
                    headers={"Idempotent-Replayed": "true", "Original-Request": stored.request_id},
                )
        call = ApiCall(request.method, request.path, params, api_key)
        payload = _dumps(route.impl(state, call)).encode()
        if key is not None:
            # Only successes are kept: Stripe saves no result for a request that
            # failed validation, so a corrected retry under the same key proceeds.
            state.idempotency[(api_key, key)] = _StoredResponse(
                request.method, request.path, fingerprint, 200, payload, _request_id.get()
            )
        return web.Response(
            body=payload, status=200, content_type="application/json", charset="utf-8"
        )
    except StripeError as error:
        return _error_response(error)


async def _fault_response(
    request: web.Request,
    state: StandinState,
    fault: Fault,
    record: RecordedRequest,
    route: _ApiRoute,
    params: Params | None,
) -> web.StreamResponse | None:
    """The response a fault gives, or None to answer normally (latency only)."""
    if fault.kind == "latency":
        return None
    if fault.kind == "status":
        status = cast(int, fault.status)
        body = fault.body
        if body is None:
            body = _default_fault_body(status, fault.code, _request_id.get())
        return _json_response(body, status, fault.headers)
    if fault.kind == "hang":
        await _hang(request, state)
        return web.Response(status=504)  # goes nowhere: the connection is gone
    if fault.kind == "reset":
        _reset(request)
        return web.Response(status=502)  # goes nowhere: the connection is gone
    status = fault.status or 200
    if fault.kind == "non_json":
        return web.Response(
            text=_HTML_ERROR_PAGE,
            status=status,
            content_type="text/html",
            headers=fault.headers,
        )
    body_obj = route.fake_body(params)
    if fault.kind == "wrong_object":
        return _json_response({**body_obj, "object": fault.wrong_object}, status, fault.headers)
    payload = _dumps(body_obj).encode()
    cut = payload[: len(payload) // 2]
    if fault.truncated == "json":
        # A complete HTTP response whose JSON stops half way.
        return web.Response(
            body=cut,
            status=status,
            content_type="application/json",
            charset="utf-8",
            headers=fault.headers,
        )
    # Promise the whole body, send half, then close: the client sees a short read.
    response = web.StreamResponse(
        status=status, headers={**_api_headers(request, record), **fault.headers}
    )
    response.content_type = "application/json"
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(cut)
    transport = request.transport
    if transport is not None:
        transport.close()  # close() (not abort()) so the half body is flushed first
    return response


async def _hang(request: web.Request, state: StandinState) -> None:
    """Answer nothing until the client gives up (or the server stops)."""
    while not state.closing.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await state.pause(_HANG_POLL_SECONDS)
    # Shutting down with the client still waiting: drop it rather than answer.
    _reset(request)


def _reset(request: web.Request) -> None:
    """Drop the connection with a TCP RST, no response."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns close() into an RST, like a crashed proxy, not a polite FIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# --------------------------------------------------------------------------- API routes


def _new_session_url() -> str:
    return "https://billing.stripe.com/p/session/test_" + _random(64)


def _str(value: Value | None) -> str | None:
    return value if isinstance(value, str) else None


def _obj(value: Value | None) -> dict[str, Value]:
    return value if isinstance(value, dict) else {}


def _list(value: Value | None) -> list[Value]:
    return value if isinstance(value, list) else []


def _flow_object(flow_data: dict[str, Value]) -> dict[str, Any]:
    """The session's ``flow``: the requested flow echoed with Stripe's nulls filled in."""
    flow_type = _str(flow_data.get("type"))
    after = _obj(flow_data.get("after_completion"))
    # Stripe's default when after_completion is not given.
    after_type = _str(after.get("type")) or "portal_homepage"
    hosted = _obj(after.get("hosted_confirmation"))
    redirect = _obj(after.get("redirect"))
    flow: dict[str, Any] = {
        "after_completion": {
            "hosted_confirmation": (
                {"custom_message": _str(hosted.get("custom_message"))}
                if after_type == "hosted_confirmation"
                else None
            ),
            "redirect": (
                {"return_url": _str(redirect.get("return_url"))}
                if after_type == "redirect"
                else None
            ),
            "type": after_type,
        },
        "subscription_cancel": None,
        "subscription_update": None,
        "subscription_update_confirm": None,
        "type": flow_type,
    }
    if flow_type == "subscription_cancel":
        cancel = _obj(flow_data.get("subscription_cancel"))
        retention = cancel.get("retention")
        flow["subscription_cancel"] = {
            "retention": None
            if retention is None
            else {
                "coupon_offer": {
                    "coupon": _str(_obj(_obj(retention).get("coupon_offer")).get("coupon"))
                },
                "type": _str(_obj(retention).get("type")),
            },
            "subscription": _str(cancel.get("subscription")),
        }
    elif flow_type == "subscription_update":
        update = _obj(flow_data.get("subscription_update"))
        flow["subscription_update"] = {"subscription": _str(update.get("subscription"))}
    elif flow_type == "subscription_update_confirm":
        confirm = _obj(flow_data.get("subscription_update_confirm"))
        items = []
        for item in _list(confirm.get("items")):
            quantity = _str(_obj(item).get("quantity"))
            items.append(
                {
                    "id": _str(_obj(item).get("id")),
                    "price": _str(_obj(item).get("price")),
                    "quantity": int(quantity) if quantity is not None else None,
                }
            )
        discounts = [
            {
                "coupon": _str(_obj(discount).get("coupon")),
                "promotion_code": _str(_obj(discount).get("promotion_code")),
            }
            for discount in _list(confirm.get("discounts"))
        ]
        flow["subscription_update_confirm"] = {
            "discounts": discounts if "discounts" in confirm else None,
            "items": items,
            "subscription": _str(confirm.get("subscription")),
        }
    return flow


def _session_object(params: Params, *, validated: bool = True) -> dict[str, Any]:
    """A ``billing_portal.session`` as Stripe returns it for ``params``."""
    session: dict[str, Any] = {
        "id": "bps_1" + _random(23),
        "object": "billing_portal.session",
        "configuration": _str(params.get("configuration")) or DEFAULT_CONFIGURATION,
        "created": int(time.time()),
        "customer": _str(params.get("customer")),
    }
    if "customer_account" in params:
        session["customer_account"] = _str(params.get("customer_account"))
    flow_data = params.get("flow_data")
    session.update(
        {
            "flow": _flow_object(_obj(flow_data)) if validated and flow_data else None,
            "livemode": False,
            "locale": _str(params.get("locale")),
            "on_behalf_of": _str(params.get("on_behalf_of")),
            "return_url": _str(params.get("return_url")),
            "url": _new_session_url(),
        }
    )
    return session


def _create_portal_session(state: StandinState, call: ApiCall) -> dict[str, Any]:
    validate(call.params, PORTAL_SESSION)
    state.check_ids(portal_session_ids(call.params))
    return _session_object(call.params)


def _fake_portal_session(params: Params | None) -> dict[str, Any]:
    return _session_object(params or {}, validated=False)


def _status_matches(status: str, wanted: str | None) -> bool:
    if wanted is None:
        return status != "canceled"  # Stripe's default hides canceled subscriptions
    if wanted == "all":
        return True
    if wanted == "ended":
        return status in ("canceled", "incomplete_expired")
    return status == wanted


def _list_subscriptions(state: StandinState, call: ApiCall) -> dict[str, Any]:
    params = call.params
    validate(params, LIST_SUBSCRIPTIONS)
    state.check_ids(list_subscription_ids(params))
    customer = _str(params.get("customer"))
    price = _str(params.get("price"))
    wanted = _str(params.get("status"))
    assert wanted is None or wanted in LIST_STATUS_FILTERS
    limit = int(_str(params.get("limit")) or "10")
    # Newest first like Stripe; sorted() is stable, so ties keep seed order.
    ordered = sorted(state.subscriptions.values(), key=lambda sub: -int(sub["created"]))
    ids = [sub["id"] for sub in ordered]
    candidates = ordered
    for cursor_param in ("starting_after", "ending_before"):
        cursor = _str(params.get(cursor_param))
        if cursor is None:
            continue
        if cursor not in ids:
            raise IdRef(cursor_param, cursor, "subscription", "sub_").error()
        index = ids.index(cursor)
        candidates = ordered[index + 1 :] if cursor_param == "starting_after" else ordered[:index]

    def matches(sub: dict[str, Any]) -> bool:
        prices = {item["price"]["id"] for item in sub["items"]["data"]}
        return (
            (customer is None or sub["customer"] == customer)
            and (price is None or price in prices)
            and _status_matches(sub["status"], wanted)
        )

    selected = [sub for sub in candidates if matches(sub)]
    page = selected[-limit:] if "ending_before" in params else selected[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(selected) > limit,
        "url": "/v1/subscriptions",
    }


def _fake_subscription_list(params: Params | None) -> dict[str, Any]:
    return {"object": "list", "data": [], "has_more": False, "url": "/v1/subscriptions"}


def _unknown_route(state: StandinState, call: ApiCall) -> dict[str, Any]:
    raise StripeError(
        f"Unrecognized request URL ({call.method}: {call.path}). Please see "
        "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        status=404,
    )


def _fake_unknown(params: Params | None) -> dict[str, Any]:
    return {"object": "unknown"}


# --------------------------------------------------------------------------- control API


def _control(handler: Callable[[web.Request, StandinState], Awaitable[object]]) -> Handler:
    """A control endpoint: JSON out, ``400 {"error": ...}`` for bad input."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            result = await handler(request, request.app[STATE])
        except ControlError as error:
            return _json_response({"error": str(error)}, 400)
        return _json_response(result)

    return handle


async def _json_object(request: web.Request, field_name: str) -> object:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ControlError(f"body must be JSON: {error}") from None
    if not isinstance(body, dict) or field_name not in body:
        raise ControlError(f'body must be a JSON object with "{field_name}"')
    return body[field_name]


async def _json_list(request: web.Request, field_name: str) -> list[object]:
    value = await _json_object(request, field_name)
    if not isinstance(value, list):
        raise ControlError(f'"{field_name}" must be a list')
    return value


async def _health(request: web.Request, state: StandinState) -> object:
    return {"status": "ok"}


async def _get_requests(request: web.Request, state: StandinState) -> object:
    return state.requests_json()


async def _delete_requests(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_requests()}


async def _get_faults(request: web.Request, state: StandinState) -> object:
    return {"faults": [fault.to_json() for fault in state.faults]}


async def _post_faults(request: web.Request, state: StandinState) -> object:
    queued = state.queue_faults(await _json_list(request, "faults"))
    return {"queued": queued, "pending": len(state.faults)}


async def _delete_faults(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_faults()}


async def _get_latency(request: web.Request, state: StandinState) -> object:
    return {"ms": state.latency_ms}


async def _post_latency(request: web.Request, state: StandinState) -> object:
    return {"ms": state.set_latency(await _json_object(request, "ms"))}


async def _get_missing(request: web.Request, state: StandinState) -> object:
    return {"ids": sorted(state.missing_ids)}


async def _post_missing(request: web.Request, state: StandinState) -> object:
    state.declare_missing(await _json_list(request, "ids"))
    return {"ids": sorted(state.missing_ids)}


async def _delete_missing(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_missing()}


async def _get_subscriptions(request: web.Request, state: StandinState) -> object:
    return {"subscriptions": list(state.subscriptions.values())}


async def _post_subscriptions(request: web.Request, state: StandinState) -> object:
    seeded = state.seed_subscriptions(await _json_list(request, "subscriptions"))
    return {"seeded": seeded, "total": len(state.subscriptions)}


async def _delete_subscriptions(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_subscriptions()}


async def _post_reset(request: web.Request, state: StandinState) -> object:
    state.reset()
    return {"reset": True}


# --------------------------------------------------------------------------- application


@web.middleware
async def _request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every response a Stripe-style ``Request-Id``, router errors included."""
    token = _request_id.set("req_" + _random(14))
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Only control-API misses land here: /v1 has its own Stripe-shaped catch-all.
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = _json_response({"error": exc.reason}, exc.status, headers)
        except Exception:
            log.exception("stripe stand-in control API failed on %s", request.path)
            response = _json_response({"error": "internal error"}, 500)
        if not response.prepared:
            response.headers.setdefault("Request-Id", _request_id.get())
        return response
    finally:
        _request_id.reset(token)


async def _release_waiters(app: web.Application) -> None:
    app[STATE].closing.set()


def create_app(
    *,
    api_key_prefixes: Iterable[str] = DEFAULT_API_KEY_PREFIXES,
    latency_ms: float = 0,
) -> web.Application:
    """Build the stand-in application (no I/O; run it with any aiohttp runner).

    ``api_key_prefixes``: keys accepted as ``Authorization: Bearer <key>``.
    ``latency_ms``: standing delay before every API answer (``POST /_standin/latency``
    changes it; ``POST /_standin/reset`` restores this value).
    """
    prefixes = tuple(api_key_prefixes)
    if not prefixes or not all(prefixes):
        raise ValueError("api_key_prefixes must be non-empty strings")
    if not 0 <= latency_ms <= _MAX_LATENCY_MS:
        raise ValueError(f"latency_ms must be between 0 and {_MAX_LATENCY_MS:.0f}")
    app = web.Application(middlewares=[_request_id_middleware])
    app[STATE] = StandinState(api_key_prefixes=prefixes, latency_ms=float(latency_ms))
    app.on_shutdown.append(_release_waiters)

    control = [
        ("GET", "/_standin/health", _health),
        ("GET", "/_standin/requests", _get_requests),
        ("DELETE", "/_standin/requests", _delete_requests),
        ("GET", "/_standin/faults", _get_faults),
        ("POST", "/_standin/faults", _post_faults),
        ("DELETE", "/_standin/faults", _delete_faults),
        ("GET", "/_standin/latency", _get_latency),
        ("POST", "/_standin/latency", _post_latency),
        ("GET", "/_standin/missing", _get_missing),
        ("POST", "/_standin/missing", _post_missing),
        ("DELETE", "/_standin/missing", _delete_missing),
        ("GET", "/_standin/subscriptions", _get_subscriptions),
        ("POST", "/_standin/subscriptions", _post_subscriptions),
        ("DELETE", "/_standin/subscriptions", _delete_subscriptions),
        ("POST", "/_standin/reset", _post_reset),
    ]
    for method, path, control_handler in control:
        app.router.add_route(method, path, _control(control_handler))

    app.router.add_post(
        "/v1/billing_portal/sessions",
        _api_handler(_ApiRoute(_create_portal_session, _fake_portal_session)),
    )
    app.router.add_get(
        "/v1/subscriptions",
        _api_handler(_ApiRoute(_list_subscriptions, _fake_subscription_list)),
    )
    # Registered last so it only catches what the routes above do not (wrong path
    # or wrong method), which Stripe answers with a 404 in its own error shape.
    app.router.add_route(
        "*", "/v1/{tail:.*}", _api_handler(_ApiRoute(_unknown_route, _fake_unknown))
    )
    return app
