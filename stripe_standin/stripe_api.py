"""How every request to the imitation of Stripe's API (``/v1/...``) is handled.

:func:`api_handler` wraps one endpoint's implementation (see
:mod:`.stripe_endpoints`) with what all of Stripe's endpoints share: the request
is recorded, delayed, and handed to the next queued fault, or else answered
normally: API-key auth, the ``Stripe-Version`` check, the ``Stripe-Account``
header (Connect), reading the form, idempotency keys, ``Request-Id`` and
Stripe-shaped errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web

from .customers import ACCOUNT_RE
from .fault_responses import fault_response
from .responses import Handler, current_request_id, dumps
from .state import STATE, RecordedRequest, StandinState, StoredResponse, recorded_headers
from .stripe_errors import API_ERROR, NO_API_KEY, error_response, no_account_access
from .validation import Params, StripeError, decode_form

__all__ = ["DEFAULT_API_VERSION", "ApiCall", "ApiRoute", "api_handler", "mask_api_key"]

log = logging.getLogger("stripe_standin")

DEFAULT_API_VERSION: Final = "2025-09-30.clover"

_FORM = "application/x-www-form-urlencoded"
_MAX_IDEMPOTENCY_KEY = 255


def mask_api_key(key: str) -> str:
    """Mask a key the way Stripe's 401 message does: mode prefix and last 4 at most."""
    match = re.match(r"[a-z]{2,4}_(?:test|live)_", key)
    shown = match.group(0) if match else ""
    rest = key[len(shown) :]
    # Short secrets are masked whole: their last four would be too much of them.
    tail = rest[-4:] if len(rest) >= 12 else ""
    return shown + "*" * (len(rest) - len(tail)) + tail


@dataclass(frozen=True)
class ApiCall:
    """An authenticated, decoded API request handed to a route's implementation."""

    method: str
    path: str
    params: Params
    api_key: str
    # The connected account the request acts as (Stripe-Account), None: the platform.
    stripe_account: str | None = None
    # The object id in the path (``/v1/customers/{id}``), None for other routes.
    resource_id: str | None = None


@dataclass(frozen=True)
class ApiRoute:
    """One Stripe endpoint: its implementation and the body faults distort."""

    # Synchronous on purpose: with no await between the idempotency lookup and the
    # store, two requests with one key cannot both create a session.
    impl: Callable[[StandinState, ApiCall], dict[str, Any]]
    # The body a wrong_object/truncated fault distorts; never validated.
    fake_body: Callable[[Params | None], dict[str, Any]]


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
        raise StripeError(NO_API_KEY, status=401)
    if not any(key.startswith(prefix) and len(key) > len(prefix) for prefix in prefixes):
        raise StripeError(f"Invalid API Key provided: {mask_api_key(key)}", status=401)
    return key


_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}(?:\.[a-z]+)?(?:;.*)?")


def _check_version(version: str | None) -> None:
    if version is not None and _VERSION_RE.fullmatch(version.strip()) is None:
        raise StripeError(f"Invalid Stripe API version: {version}")


def _connected_account(header: str | None, state: StandinState, api_key: str) -> str | None:
    """The account a request acts as, or Stripe's refusal for one the key cannot reach.

    Any well-formed ``acct_`` id is reachable unless declared missing
    (``POST /_standin/missing``); a malformed one cannot exist at all.
    """
    if header is None:
        return None
    account = header.strip()
    if ACCOUNT_RE.fullmatch(account) is None or account in state.missing_ids:
        raise no_account_access(mask_api_key(api_key), account)
    return account


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


def _api_headers(request: web.Request, record: RecordedRequest) -> dict[str, str]:
    headers = {
        "Request-Id": current_request_id.get(),
        "Stripe-Version": request.headers.get("Stripe-Version", DEFAULT_API_VERSION),
        "Cache-Control": "no-cache, no-store",
    }
    if record.idempotency_key is not None and request.method == "POST":
        headers["Idempotency-Key"] = record.idempotency_key
    return headers


def api_handler(route: ApiRoute) -> Handler:
    """Wrap a route: record, delay, inject the next fault, or answer it normally."""

    async def handle(request: web.Request) -> web.StreamResponse:
        received_at = time.monotonic()
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
            headers=recorded_headers(request),
            params=params,
            raw=pairs,
            idempotency_key=request.headers.get("Idempotency-Key"),
            request_id=current_request_id.get(),
            stripe_account=request.headers.get("Stripe-Account"),
            received_at=received_at,
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
                response = await fault_response(
                    request,
                    state,
                    fault,
                    partial(route.fake_body, params),
                    _api_headers(request, record),
                )
            if response is None:
                response = _answer(request, state, route, record, params, read_error)
                if fault is not None:
                    response.headers.update(fault.headers)
        except Exception:
            # The stand-in's own bug: answer like Stripe's 500 so the client sees an error.
            log.exception("stripe stand-in failed on %s %s", request.method, request.path)
            response = error_response(StripeError(API_ERROR, status=500, type="api_error"))
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
    route: ApiRoute,
    record: RecordedRequest,
    params: Params | None,
    read_error: StripeError | None,
) -> web.Response:
    """The normal answer: auth, headers, idempotency, then the route itself."""
    try:
        api_key = _authenticate(request.headers.get("Authorization"), state.api_key_prefixes)
        _check_version(request.headers.get("Stripe-Version"))
        account = _connected_account(record.stripe_account, state, api_key)
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
        # Stripe keeps idempotency keys per key and per account acted as.
        scope = (api_key, account or "", key or "")
        if key is not None:
            stored = state.idempotency.get(scope)
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
        call = ApiCall(
            request.method,
            request.path,
            params,
            api_key,
            stripe_account=account,
            resource_id=request.match_info.get("id"),
        )
        payload = dumps(route.impl(state, call)).encode()
        if key is not None:
            # Only successes are kept: Stripe saves no result for a request that
            # failed validation, so a corrected retry under the same key proceeds.
            state.idempotency[scope] = StoredResponse(
                request.method, request.path, fingerprint, 200, payload, current_request_id.get()
            )
        return web.Response(
            body=payload, status=200, content_type="application/json", charset="utf-8"
        )
    except StripeError as error:
        return error_response(error)
