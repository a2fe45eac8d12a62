"""The parameters of Stripe's portal configuration endpoints (API version 2025-09-30.clover).

``POST /v1/billing_portal/configurations`` (create), ``POST .../{id}`` (update),
``GET .../{id}`` (retrieve) and ``GET /v1/billing_portal/configurations`` (list),
as schemas for :func:`~stripe_standin.validation.validate`, read next to
``stripe-portal-configurations.md``. Create and update share one tree: update
has every parameter optional except ``enabled`` inside ``invoice_history`` and
``payment_method_update``, adds ``active``, and accepts ``""`` ("unset") on the
lists, ``products``, ``conditions`` and ``metadata``. The rules a schema cannot
say (cancellation prorations, the catalogue) are in :mod:`.configurations`.
"""

from __future__ import annotations

from typing import Final

from .validation import PAGINATION, Arr, Map, Obj, Scalar, Spec, cursor_rule

__all__ = [
    "ALLOWED_UPDATES",
    "CANCELLATION_REASONS",
    "CANCEL_MODES",
    "CANCEL_PRORATIONS",
    "CONDITION_TYPES",
    "CREATE_CONFIGURATION",
    "DEFAULT_ALLOWED_UPDATES",
    "EXPANDABLE",
    "FEATURES",
    "HEADLINE_MAX",
    "LIST_CONFIGURATIONS",
    "MAX_PRODUCTS",
    "RETRIEVE_CONFIGURATION",
    "TRIAL_UPDATE_BEHAVIORS",
    "UPDATE_CONFIGURATION",
    "UPDATE_PRORATIONS",
]

FEATURES: Final = (
    "customer_update",
    "invoice_history",
    "payment_method_update",
    "subscription_cancel",
    "subscription_update",
)
ALLOWED_UPDATES: Final = ("address", "email", "name", "phone", "shipping", "tax_id")
DEFAULT_ALLOWED_UPDATES: Final = ("price", "promotion_code", "quantity")
CANCEL_MODES: Final = ("at_period_end", "immediately")
CANCEL_PRORATIONS: Final = ("always_invoice", "create_prorations", "none")
UPDATE_PRORATIONS: Final = CANCEL_PRORATIONS
CANCELLATION_REASONS: Final = (
    "customer_service",
    "low_quality",
    "missing_features",
    "other",
    "switched_service",
    "too_complex",
    "too_expensive",
    "unused",
)
CONDITION_TYPES: Final = ("decreasing_item_amount", "shortening_interval")
TRIAL_UPDATE_BEHAVIORS: Final = ("continue_trial", "end_trial")
EXPANDABLE: Final = ("application",)
MAX_PRODUCTS: Final = 10
HEADLINE_MAX: Final = 60

_BOOL = Scalar("boolean")
_REQUIRED_BOOL = Scalar("boolean", required=True)
_URL = Scalar("url", clearable=True)
_EXPAND = Arr(Scalar("enum", choices=EXPANDABLE))


def _enums(choices: tuple[str, ...], *, update: bool) -> Arr:
    """A list of enum values; an update may clear it with ``""``."""
    return Arr(Scalar("enum", choices=choices), clearable=update)


def _configuration(*, update: bool) -> Obj:
    """The create (``update=False``) or update parameter tree."""
    # Update makes `enabled` optional where the reference says so.
    enabled = _BOOL if update else _REQUIRED_BOOL
    product = Obj(
        {
            "product": Scalar(required=True),
            "prices": Arr(Scalar(), required=True),
            "adjustable_quantity": Obj(
                {
                    "enabled": _REQUIRED_BOOL,
                    "minimum": Scalar("integer", minimum=0),
                    "maximum": Scalar("integer", minimum=1),
                }
            ),
        }
    )
    features = Obj(
        {
            "customer_update": Obj(
                {"enabled": enabled, "allowed_updates": _enums(ALLOWED_UPDATES, update=update)}
            ),
            "invoice_history": Obj({"enabled": _REQUIRED_BOOL}),
            "payment_method_update": Obj({"enabled": _REQUIRED_BOOL}),
            "subscription_cancel": Obj(
                {
                    "enabled": enabled,
                    "mode": Scalar("enum", choices=CANCEL_MODES),
                    "proration_behavior": Scalar("enum", choices=CANCEL_PRORATIONS),
                    "cancellation_reason": Obj(
                        {
                            "enabled": _REQUIRED_BOOL,
                            "options": Arr(
                                Scalar("enum", choices=CANCELLATION_REASONS),
                                required=not update,
                                clearable=update,
                            ),
                        }
                    ),
                }
            ),
            "subscription_update": Obj(
                {
                    "enabled": enabled,
                    "default_allowed_updates": _enums(DEFAULT_ALLOWED_UPDATES, update=update),
                    "products": Arr(product, max_items=MAX_PRODUCTS, clearable=update),
                    "proration_behavior": Scalar("enum", choices=UPDATE_PRORATIONS),
                    "schedule_at_period_end": Obj(
                        {
                            "conditions": Arr(
                                Obj(
                                    {"type": Scalar("enum", required=True, choices=CONDITION_TYPES)}
                                ),
                                clearable=update,
                            )
                        }
                    ),
                    "trial_update_behavior": Scalar("enum", choices=TRIAL_UPDATE_BEHAVIORS),
                }
            ),
        },
        required=not update,
    )
    fields: dict[str, Spec] = {
        "features": features,
        "business_profile": Obj(
            {
                "headline": Scalar(max_length=HEADLINE_MAX, clearable=True),
                "privacy_policy_url": _URL,
                "terms_of_service_url": _URL,
            }
        ),
        "default_return_url": _URL,
        "login_page": Obj({"enabled": _REQUIRED_BOOL}),
        "metadata": Map(
            Scalar(max_length=500, clearable=update),
            max_keys=50,
            max_key_length=40,
            clearable=update,
        ),
        "name": Scalar(clearable=True),
        "expand": _EXPAND,
    }
    if update:
        fields["active"] = _BOOL
    return Obj(fields)


CREATE_CONFIGURATION: Final = _configuration(update=False)
UPDATE_CONFIGURATION: Final = _configuration(update=True)
RETRIEVE_CONFIGURATION: Final = Obj({"expand": _EXPAND})
LIST_CONFIGURATIONS: Final = Obj(
    {"active": _BOOL, "is_default": _BOOL, **PAGINATION}, rule=cursor_rule
)
