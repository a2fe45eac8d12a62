"""The words of our domain, below HTTP and data access.

Flow types, locales, subscription statuses and the shape of a subscription as
Stripe describes it. The request schemas, the use cases, the importer and the
SQL modules all import them from here, so none of them has to import another
layer for a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

FLOW_TYPES = (
    "payment_method_update",
    "subscription_cancel",
    "subscription_update",
    "subscription_update_confirm",
)
# The flows that act on one of the user's subscriptions.
SUBSCRIPTION_FLOWS = frozenset(FLOW_TYPES[1:])
AFTER_COMPLETION_TYPES = ("portal_homepage", "hosted_confirmation", "redirect")
# Which optional flow fields each flow type accepts.
FLOW_FIELDS: dict[str, frozenset[str]] = {
    "payment_method_update": frozenset(),
    "subscription_cancel": frozenset({"subscription", "retention_offer"}),
    "subscription_update": frozenset({"subscription"}),
    "subscription_update_confirm": frozenset({"subscription", "plan", "quantity", "discount"}),
}

# Where a customer mapping comes from (SPEC §11); explicit sources win over metadata.
MAPPING_SOURCES = ("import", "api", "stripe_metadata")

# Stripe's subscription statuses (the schema's check constraint lists the same).
SUBSCRIPTION_STATUSES = (
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "canceled",
    "unpaid",
    "paused",
)
# A subscription the portal can act on (SPEC §2 "the user's only open subscription").
OPEN_STATUSES = frozenset({"active", "trialing", "past_due"})

# Stripe's locale values for API version 2025-09-30.clover.
LOCALES = (
    "auto",
    "bg",
    "cs",
    "da",
    "de",
    "el",
    "en",
    "en-AU",
    "en-CA",
    "en-GB",
    "en-IE",
    "en-IN",
    "en-NZ",
    "en-SG",
    "es",
    "es-419",
    "et",
    "fi",
    "fil",
    "fr",
    "fr-CA",
    "hr",
    "hu",
    "id",
    "it",
    "ja",
    "ko",
    "lt",
    "lv",
    "ms",
    "mt",
    "nb",
    "nl",
    "pl",
    "pt",
    "pt-BR",
    "ro",
    "ru",
    "sk",
    "sl",
    "sv",
    "th",
    "tr",
    "vi",
    "zh",
    "zh-HK",
    "zh-TW",
)


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """One subscription as Stripe describes it (item fields are None for several items)."""

    id: str
    customer: str | None
    account: str | None
    status: str
    item_id: str | None
    price_id: str | None
    quantity: int | None
    # A scheduled cancellation (SPEC §11). In flexible billing mode "cancel at
    # period end" sets only cancel_at; either one means "scheduled to cancel".
    cancel_at: datetime | None = None
    cancel_at_period_end: bool = False


def subscription_state(obj: dict[str, Any]) -> SubscriptionState | None:
    """A Stripe subscription object as a mapping row; None if it is not one we can store."""
    sub_id, status = obj.get("id"), obj.get("status")
    if not isinstance(sub_id, str) or not sub_id.startswith("sub_") or len(sub_id) <= 4:
        return None
    if status not in SUBSCRIPTION_STATUSES:
        return None
    customer = stripe_id(obj.get("customer"), "cus_")
    account = stripe_id(obj.get("customer_account"), "acct_")
    if customer is None and account is None:
        return None
    items = obj.get("items")
    items = items if isinstance(items, dict) else {}
    data = items.get("data")
    item_id = price_id = quantity = None
    # Exactly one item is updatable through the portal; several are recorded
    # as item_id NULL (SPEC §4: "not updatable").
    if isinstance(data, list) and len(data) == 1 and not items.get("has_more"):
        item = data[0] if isinstance(data[0], dict) else {}
        item_id = stripe_id(item.get("id"), "si_")
        # Legacy plan-based prices can carry custom ids; only price_ ids are stored.
        price_id = stripe_id(item.get("price"), "price_")
        raw_quantity = item.get("quantity")
        if isinstance(raw_quantity, int) and not isinstance(raw_quantity, bool):
            quantity = raw_quantity if raw_quantity >= 0 else None
    return SubscriptionState(
        id=sub_id,
        customer=customer,
        account=account,
        status=str(status),
        item_id=item_id,
        price_id=price_id,
        quantity=quantity,
        cancel_at=unix_time(obj.get("cancel_at")),
        cancel_at_period_end=obj.get("cancel_at_period_end") is True,
    )


def unix_time(value: Any) -> datetime | None:
    """Stripe's unix seconds as an aware datetime; None for null or anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None  # beyond what a datetime holds: not a time Stripe sends
    return None


def stripe_id(value: Any, prefix: str) -> str | None:
    """An id given as a string or as an expanded object, if it has the prefix."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, str) and value.startswith(prefix) and len(value) > len(prefix):
        return value
    return None


# Our user ids, as the API and the import accept them: 1-128 characters, no
# NUL and no lone surrogate (Postgres text can hold neither).
MAX_USER_ID_LENGTH = 128


def user_id(value: Any) -> str | None:
    """``value`` if it can be one of our user ids, else None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_USER_ID_LENGTH or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value
