"""Seeded customers: how a control-API seed becomes a Stripe customer object.

``POST /_standin/customers`` (and :meth:`StandinState.seed_customers`) take
seeds such as ``{"email": "a@example.com", "metadata": {"user_id": "u1"}}``;
this module checks them and builds the customer object ``GET /v1/customers``
and ``GET /v1/customers/{id}`` answer with (API version 2025-09-30.clover).
It also checks the ``account`` a seed lives on, for every kind of seed.
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any, Final

from .control_input import ControlError, is_int
from .responses import random_token

__all__ = ["ACCOUNT_RE", "CUSTOMER_ID_RE", "customer_object", "deleted_customer", "seed_account"]

# Stripe ids are a prefix and letters/digits; the service accepts underscores too.
CUSTOMER_ID_RE: Final = re.compile(r"cus_[A-Za-z0-9_]+")
ACCOUNT_RE: Final = re.compile(r"acct_[A-Za-z0-9_]+")

# Stripe's limits on metadata: keys up to 40 characters, values up to 500.
_METADATA_KEY_MAX = 40
_METADATA_VALUE_MAX = 500

# What a seed may say; anything else passes through into the object unchanged.
_MODELLED = ("id", "email", "name", "metadata", "created", "deleted", "account", "livemode")


def seed_account(seed: dict[str, Any], label: str) -> str | None:
    """The connected account a seed lives on (``account``), or None for the platform."""
    account = seed.get("account")
    if account is None:
        return None
    if not isinstance(account, str) or ACCOUNT_RE.fullmatch(account) is None:
        raise ControlError(f"{label}: account must be an acct_ id or null")
    return account


def _new_customer_id(taken: Container[str]) -> str:
    while True:
        candidate = "cus_" + random_token(14)
        if candidate not in taken:
            return candidate


def _optional_str(seed: dict[str, Any], key: str, label: str) -> str | None:
    value = seed.get(key)
    if value is not None and not isinstance(value, str):
        raise ControlError(f"{label}: {key} must be a string or null")
    return value


def _metadata(seed: dict[str, Any], label: str) -> dict[str, str]:
    metadata = seed.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ControlError(f"{label}: metadata must be an object of strings")
    for key, value in metadata.items():
        if not 0 < len(key) <= _METADATA_KEY_MAX:
            raise ControlError(f"{label}: metadata keys have 1 to {_METADATA_KEY_MAX} characters")
        # Stripe stores every metadata value as a string.
        if not isinstance(value, str) or len(value) > _METADATA_VALUE_MAX:
            raise ControlError(
                f"{label}: metadata[{key}] must be a string of at most {_METADATA_VALUE_MAX}"
            )
    return dict(metadata)


def customer_object(
    seed: object, now: int, taken: Container[str]
) -> tuple[dict[str, Any], str | None]:
    """A Stripe customer object from a seed, and the account it lives on.

    ``taken`` holds the ids in use, so a generated id is new. A seed with
    ``deleted: true`` is kept whole (it still has a place in the list order)
    and marked ``"deleted": True``; the API shows it as :func:`deleted_customer`.
    """
    if not isinstance(seed, dict):
        raise ControlError("each customer must be a JSON object")
    customer_id = seed.get("id")
    if customer_id is None:
        customer_id = _new_customer_id(taken)
    elif not isinstance(customer_id, str) or CUSTOMER_ID_RE.fullmatch(customer_id) is None:
        raise ControlError(f"customer id must be a cus_ id, got {customer_id!r}")
    label = customer_id
    created = seed.get("created", now)
    if not is_int(created):
        raise ControlError(f"{label}: created must be a unix time")
    for flag in ("deleted", "livemode"):
        if not isinstance(seed.get(flag, False), bool):
            raise ControlError(f"{label}: {flag} must be true or false")
    account = seed_account(seed, label)
    extra = {key: value for key, value in seed.items() if key not in _MODELLED}
    customer: dict[str, Any] = {
        "id": customer_id,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": created,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "email": _optional_str(seed, "email", label),
        "invoice_prefix": random_token(8).upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": seed.get("livemode", False),
        "metadata": _metadata(seed, label),
        "name": _optional_str(seed, "name", label),
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
        **extra,
    }
    if seed.get("deleted", False):
        customer["deleted"] = True
    return customer, account


def deleted_customer(customer: dict[str, Any]) -> dict[str, Any]:
    """What Stripe answers for a deleted customer: its id and the flag, nothing else."""
    return {"id": customer["id"], "object": "customer", "deleted": True}
