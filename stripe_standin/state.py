"""What the stand-in remembers: :class:`StandinState`, one per application.

Recorded requests, queued faults, the standing latency, ids declared missing,
seeded customers and subscriptions (how a subscription seed becomes a Stripe
object is here; a customer's in :mod:`.customers`), the seeded catalogue of
products and prices (:mod:`.catalogue`), the portal configurations created
through the API (:mod:`.configurations`), the connected account each object
lives on (Connect), responses stored under idempotency keys, and the portal
sessions created with the base their URLs start with (``session_url_base``).
The control API reads and scripts it over HTTP; in-process tests reach it
directly as ``app[STATE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit

from aiohttp import web

from .catalogue import Catalogue, product_seed
from .control_input import MAX_LATENCY_MS, ControlError, is_int, is_number
from .customers import customer_object, seed_account
from .faults import Fault
from .responses import random_token
from .validation import SUBSCRIPTION_STATUSES, IdRef, Params, StripeError, Value, format_param

__all__ = [
    "DEFAULT_API_KEY_PREFIXES",
    "DEFAULT_SESSION_URL_BASE",
    "REDACTED",
    "STATE",
    "RecordedRequest",
    "SessionPage",
    "StandinState",
    "StoredResponse",
    "recorded_headers",
]

DEFAULT_API_KEY_PREFIXES: Final = ("sk_test_", "rk_test_")
# Where Stripe's portal session URLs point; a test or the demo that wants a page a
# browser can load sets the stand-in's own URL instead (it serves /p/session/{id}).
DEFAULT_SESSION_URL_BASE: Final = "https://billing.stripe.com"
# Stands in for the Authorization header in recorded requests: tests must be
# able to dump recordings without leaking the key they used.
REDACTED: Final = "[redacted]"

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
    # The Stripe-Account header as received (Connect), None when absent.
    stripe_account: str | None = None
    # None while in flight, and for faults that never answer (hang, reset).
    status: int | None = None
    fault: str | None = None
    # time.monotonic() when the request reached the handler: how many calls
    # arrived in a second (the upstream budget's tests; Stripe counts arrivals).
    received_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "params": self.params,
            "raw": [[key, value] for key, value in self.raw],
            "idempotency_key": self.idempotency_key,
            "stripe_account": self.stripe_account,
            "status": self.status,
            "request_id": self.request_id,
            "fault": self.fault,
            "received_at": self.received_at,
        }


def recorded_headers(request: web.Request) -> dict[str, str]:
    """The request's headers as recorded: repeats joined, the API key redacted."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        shown = REDACTED if name.lower() == "authorization" else value
        headers[name] = f"{headers[name]}, {shown}" if name in headers else shown
    return headers


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class StoredResponse:
    """A response remembered under an idempotency key."""

    method: str
    path: str
    fingerprint: str
    status: int
    body: bytes
    request_id: str


@dataclass(frozen=True, slots=True)
class SessionPage:
    """What the portal page of a created session shows (:mod:`.portal_page`)."""

    customer: str
    return_url: str | None


class StandinState:
    """Everything the stand-in remembers: recordings, scripted faults and seeded data."""

    def __init__(
        self,
        *,
        api_key_prefixes: tuple[str, ...] = DEFAULT_API_KEY_PREFIXES,
        latency_ms: float = 0.0,
        session_url_base: str = DEFAULT_SESSION_URL_BASE,
    ) -> None:
        self.api_key_prefixes = api_key_prefixes
        self.default_latency_ms = latency_ms
        self.latency_ms = latency_ms
        self.default_session_url_base = check_session_url_base(session_url_base)
        # A portal session's ``url`` is f"{session_url_base}/p/session/test_<random>".
        self.session_url_base = self.default_session_url_base
        # The last segment of each created session's URL -> what its page shows, so
        # that GET /p/session/{id} can answer it (and 404 any other id). Only that,
        # not the session: a benchmark run creates hundreds of thousands.
        self.portal_sessions: dict[str, SessionPage] = {}
        self.requests: list[RecordedRequest] = []
        self.faults: deque[Fault] = deque()
        self.missing_ids: set[str] = set()
        # Insertion-ordered so list order is stable for equal ``created`` times.
        self.subscriptions: dict[str, dict[str, Any]] = {}
        # Deleted customers stay here, marked ``"deleted": True``: the API shows
        # them as deleted, and they keep their place as list cursors.
        self.customers: dict[str, dict[str, Any]] = {}
        # Object id -> the connected account it lives on; absent: the platform.
        self.accounts: dict[str, str] = {}
        self._customer_order: tuple[list[dict[str, Any]], dict[str, int]] | None = None
        self.catalogue = Catalogue()
        # Portal configurations made through the API, in creation order.
        self.configurations: dict[str, dict[str, Any]] = {}
        # (API key, Stripe-Account or "", Idempotency-Key) -> the first answer.
        self.idempotency: dict[tuple[str, str, str], StoredResponse] = {}
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
        if not is_number(ms) or not 0 <= cast(float, ms) <= MAX_LATENCY_MS:
            raise ControlError(f"ms must be a number from 0 to {MAX_LATENCY_MS:.0f}")
        self.latency_ms = float(cast(float, ms))
        return self.latency_ms

    # -- portal session URLs

    def set_session_url_base(self, base: object) -> str:
        """Point new portal session URLs at ``base`` (control-API JSON form)."""
        self.session_url_base = check_session_url_base(base)
        return self.session_url_base

    def new_session_url(self, session: dict[str, Any]) -> str:
        """A fresh portal URL under ``session_url_base``, remembered for its page."""
        session_id = "test_" + random_token(64)
        # A session for a v2 Account has customer_account instead of customer.
        customer = session.get("customer") or session.get("customer_account") or ""
        self.portal_sessions[session_id] = SessionPage(str(customer), session.get("return_url"))
        return f"{self.session_url_base}/p/session/{session_id}"

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

    def check_ids(self, refs: Iterable[IdRef], stripe_account: str | None = None) -> None:
        """Answer like Stripe for an id that is malformed, declared missing, or not there.

        Ids of seeded objects must live on ``stripe_account`` (None: the platform)
        and a customer must not be deleted; ids never seeded pass, as before.
        """
        for ref in refs:
            if (
                not ref.looks_valid()
                or ref.value in self.missing_ids
                or not self._reachable(ref.value, stripe_account)
            ):
                raise ref.error()

    def _reachable(self, object_id: str, stripe_account: str | None) -> bool:
        customer = self.customers.get(object_id)
        if customer is not None and customer.get("deleted"):
            return False
        seeded = (
            customer is not None
            or object_id in self.subscriptions
            or object_id in self.configurations
            or object_id in self.catalogue.products
            or object_id in self.catalogue.prices
        )
        return not seeded or self.account_of(object_id) == stripe_account

    # -- Connect

    def account_of(self, object_id: str) -> str | None:
        """The connected account a seeded object lives on; None for the platform."""
        return self.accounts.get(object_id)

    def _place(self, object_id: str, account: str | None) -> None:
        if account is None:
            self.accounts.pop(object_id, None)
        else:
            self.accounts[object_id] = account

    def _forget(self, objects: dict[str, dict[str, Any]]) -> int:
        count = len(objects)
        for object_id in objects:
            self.accounts.pop(object_id, None)
        objects.clear()
        return count

    # -- customers for GET /v1/customers and GET /v1/customers/{id}

    def seed_customers(self, seeds: Iterable[object]) -> list[str]:
        """Add or replace (by id) customers; all or none. Returns their ids, in seed order.

        A seed: ``{id?, email?, name?, metadata?, created?, deleted?, livemode?,
        account?}``; ids are generated when absent, ``created`` defaults to now.
        """
        now = int(time.time())
        built: dict[str, tuple[dict[str, Any], str | None]] = {}
        # Generated ids must not collide with earlier seeds of the same call either.
        taken = set(self.customers)
        for seed in seeds:
            obj, account = customer_object(seed, now, taken)
            built[obj["id"]] = (obj, account)
            taken.add(obj["id"])
        for customer_id, (obj, account) in built.items():
            self.customers[customer_id] = obj
            self._place(customer_id, account)
        if built:
            self._customer_order = None
        return list(built)

    def clear_customers(self) -> int:
        self._customer_order = None
        return self._forget(self.customers)

    def customer_order(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Every customer (deleted ones too) newest first, ties by id; and each one's index.

        Cached until the customers change, so paging through many is cheap.
        """
        if self._customer_order is None:
            ordered = sorted(
                self.customers.values(),
                key=lambda customer: (customer["created"], customer["id"]),
                reverse=True,
            )
            positions = {customer["id"]: index for index, customer in enumerate(ordered)}
            self._customer_order = (ordered, positions)
        return self._customer_order

    # -- subscriptions for GET /v1/subscriptions

    def seed_subscriptions(self, seeds: Iterable[object]) -> int:
        """Add or replace (by id) subscriptions; all or none. Returns how many were given."""
        now = int(time.time())
        objects = [_subscription_object(seed, now) for seed in seeds]
        for obj, account in objects:
            self.subscriptions[obj["id"]] = obj
            self._place(obj["id"], account)
        return len(objects)

    def clear_subscriptions(self) -> int:
        return self._forget(self.subscriptions)

    # -- products and prices portal configurations may name

    def seed_catalogue(self, seeds: Iterable[object]) -> list[str]:
        """Add or replace (by id) products with their prices; all or none. Returns the ids."""
        checked = [product_seed(seed) for seed in seeds]
        for seed in checked:
            self.catalogue.add(seed)
            for object_id in (seed.product, *seed.prices):
                self._place(object_id, seed.account)
        return [seed.product for seed in checked]

    def clear_catalogue(self) -> int:
        count = len(self.catalogue.products)
        for object_id in (*self.catalogue.products, *self.catalogue.prices):
            self.accounts.pop(object_id, None)
        self.catalogue = Catalogue()
        return count

    def check_catalogue(self, products: Value | None, stripe_account: str | None) -> None:
        """Stripe's answer for ``features[subscription_update][products]`` naming a product
        or price that does not exist on the account, or a price under another product.

        Until a catalogue is seeded only malformed or declared-missing ids are refused.
        """
        base = ("features", "subscription_update", "products")
        for index, entry in enumerate(products if isinstance(products, list) else []):
            assert isinstance(entry, dict)
            product, prices = entry["product"], entry["prices"]
            assert isinstance(product, str)
            assert isinstance(prices, list)
            param = format_param((*base, index, "product"))
            self._check_catalogued(IdRef(param, product, "product", "prod_"), stripe_account)
            for position, price in enumerate(prices):
                assert isinstance(price, str)
                param = format_param((*base, index, "prices", position))
                self._check_catalogued(IdRef(param, price, "price", "price_"), stripe_account)
                owner = self.catalogue.prices.get(price)
                if owner is not None and owner != product:
                    raise StripeError(
                        f"The price '{price}' does not belong to the product '{product}' "
                        f"(it is a price of '{owner}').",
                        code="parameter_invalid_string",
                        param=param,
                    )

    def _check_catalogued(self, ref: IdRef, stripe_account: str | None) -> None:
        known = ref.value in self.catalogue.products or ref.value in self.catalogue.prices
        if self.catalogue.products and not known:
            raise ref.error()
        self.check_ids([ref], stripe_account)

    # -- portal configurations

    def add_configuration(self, config: dict[str, Any], account: str | None) -> None:
        self.configurations[config["id"]] = config
        self._place(config["id"], account)

    def configuration(self, config_id: str, stripe_account: str | None) -> dict[str, Any]:
        """The configuration with this id on the account, or Stripe's 404."""
        config = self.configurations.get(config_id)
        if (
            config is None
            or config_id in self.missing_ids
            or self.account_of(config_id) != stripe_account
        ):
            raise StripeError(
                f"No such configuration: '{config_id}'",
                status=404,
                code="resource_missing",
                param="id",
            )
        return config

    def configuration_order(self) -> list[dict[str, Any]]:
        """Every configuration newest first; of those made in the same second, the later first."""
        return sorted(reversed(self.configurations.values()), key=lambda c: -int(c["created"]))

    def clear_configurations(self) -> int:
        return self._forget(self.configurations)

    def reset(self) -> None:
        """Forget everything: recordings, faults, latency, missing ids, seeds, idempotency."""
        self.requests.clear()
        self.faults.clear()
        self.latency_ms = self.default_latency_ms
        self.missing_ids.clear()
        self.clear_subscriptions()
        self.clear_customers()
        self.clear_catalogue()
        self.clear_configurations()
        self.idempotency.clear()
        self.session_url_base = self.default_session_url_base
        self.portal_sessions.clear()


STATE: Final = web.AppKey("stripe_standin.state", StandinState)


def check_session_url_base(base: object) -> str:
    """``base`` as a session URL base: an absolute http(s) origin, maybe with a path."""
    if not isinstance(base, str):
        raise ControlError("base must be a string")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ControlError(f"base must be an http(s) URL with no query or fragment, got {base!r}")
    # Without this a base of "http://host/" would make URLs with "//p/session".
    return base.rstrip("/")


# --------------------------------------------------------------------------- seeded subscriptions


def _subscription_object(seed: object, now: int) -> tuple[dict[str, Any], str | None]:
    """A Stripe subscription object from a control-API seed, and the account it lives on."""
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
    if not is_int(created):
        raise ControlError(f"{sub_id}: created must be a unix time")
    raw_items = seed.get("items", [])
    if not isinstance(raw_items, list):
        raise ControlError(f"{sub_id}: items must be a list")
    items = [_subscription_item(sub_id, item, created) for item in raw_items]
    cancel_at = seed.get("cancel_at")
    if cancel_at is not None and not is_int(cancel_at):
        raise ControlError(f"{sub_id}: cancel_at must be a unix time or null")
    cancel_at_period_end = seed.get("cancel_at_period_end", False)
    if not isinstance(cancel_at_period_end, bool):
        raise ControlError(f"{sub_id}: cancel_at_period_end must be true or false")
    account = seed_account(seed, sub_id)
    # Fields the stand-in does not model (metadata, current_period_end...) pass through.
    extra = {k: v for k, v in seed.items() if k not in _SUBSCRIPTION_MODELLED}
    subscription = {
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
        # Both mean "scheduled to cancel"; flexible billing mode sets only cancel_at.
        "cancel_at": cancel_at,
        "cancel_at_period_end": cancel_at_period_end,
    }
    return subscription, account


_SUBSCRIPTION_MODELLED = (
    "id",
    "customer",
    "status",
    "created",
    "items",
    "cancel_at",
    "cancel_at_period_end",
    "account",
)


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
    if not is_int(quantity) or quantity < 0:
        raise ControlError(f"{item_id}: quantity must be a non-negative integer")
    return {
        "id": item_id,
        "object": "subscription_item",
        "created": created,
        "price": {"object": "price", **price},
        "quantity": quantity,
        "subscription": sub_id,
    }
