"""Marshmallow schemas: the request body, the responses and the problem document.

They drive validation (the protected pipeline loads the body with the schema its
route declares) and the OpenAPI document (aiohttp-apigami), and the tests use the
response schemas as oracles. The words they accept come from ``domain.py``.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from service.domain import (
    AFTER_COMPLETION_TYPES,
    FLOW_FIELDS,
    FLOW_TYPES,
    LOCALES,
    MAPPING_SOURCES,
    SUBSCRIPTION_STATUSES,
)

NOT_VALID_FOR_FLOW = "Not allowed for this flow type."


class StrictInteger(fields.Integer):
    """A JSON integer only: ``"5"``, ``5.0`` and ``true`` are refused."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


# Postgres text cannot hold NUL, and no id, name, URL or message needs one: refuse
# it here (422 on the field) rather than let the lookup or the audit row fail.
NO_NUL = validate.Regexp(r"^[^\x00]*$", error="Must not contain NUL characters.")


def _text(min_length: int, max_length: int, **kwargs: Any) -> fields.String:
    return fields.String(
        validate=[validate.Length(min=min_length, max=max_length), NO_NUL], **kwargs
    )


def _name(max_length: int = 128, **kwargs: Any) -> fields.String:
    return _text(1, max_length, **kwargs)


class AfterCompletionSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(AFTER_COMPLETION_TYPES))
    message = _text(
        1, 500, metadata={"description": "hosted_confirmation only: the custom message."}
    )
    return_url = _text(
        1,
        2048,
        metadata={"description": "redirect only (and then required): an allowlisted URL."},
    )

    @validates_schema
    def _per_type(self, data: dict[str, Any], **_: Any) -> None:
        kind = data.get("type")
        errors: dict[str, list[str]] = {}
        if "message" in data and kind != "hosted_confirmation":
            errors["message"] = ["Only allowed when type is hosted_confirmation."]
        if kind == "redirect" and "return_url" not in data:
            errors["return_url"] = ["Missing data for required field."]
        if "return_url" in data and kind != "redirect":
            errors["return_url"] = ["Only allowed when type is redirect."]
        if errors:
            raise ValidationError(errors)


class FlowSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(FLOW_TYPES))
    subscription = _name(255, metadata={"description": "Subscription ref or sub_ id."})
    plan = _name(
        metadata={"description": "subscription_update_confirm: plan (end users: self-serve only)."}
    )
    quantity = StrictInteger(
        validate=validate.Range(min=1, max=10000),
        metadata={"description": "subscription_update_confirm: new quantity."},
    )
    discount = _name(
        metadata={
            "description": "subscription_update_confirm: offer name (end users: self-serve only)."
        }
    )
    retention_offer = _name(
        metadata={"description": "subscription_cancel: offer name (end users: self-serve only)."}
    )
    after_completion = fields.Nested(AfterCompletionSchema)

    @validates_schema
    def _per_type(self, data: dict[str, Any], **_: Any) -> None:
        kind = data.get("type")
        if kind not in FLOW_FIELDS:
            return  # the OneOf error on `type` says it all
        allowed = FLOW_FIELDS[kind]
        errors: dict[str, list[str]] = {
            name: [NOT_VALID_FOR_FLOW]
            for name in ("subscription", "plan", "quantity", "discount", "retention_offer")
            if name in data and name not in allowed
        }
        if kind == "subscription_update_confirm" and "plan" not in data and "quantity" not in data:
            errors["_schema"] = ["subscription_update_confirm needs plan or quantity."]
        if errors:
            raise ValidationError(errors)


class PortalSessionRequestSchema(Schema):
    user_id = _name(
        metadata={
            "description": "Our user id. Required for service clients; for end users, "
            "optional and must equal the token's subject."
        }
    )
    return_url = _text(1, 2048)
    locale = fields.String(validate=validate.OneOf(LOCALES))
    portal = _name(
        metadata={
            "description": "Portal profile name. End users: their own, the default one, "
            "or a self-serve one."
        }
    )
    flow = fields.Nested(FlowSchema)


class PortalSessionSchema(Schema):
    id = fields.String(required=True, metadata={"example": "bps_1MrSjzLkdIwHu7ixex0IvU9b"})
    url = fields.String(required=True, metadata={"description": "Short-lived portal URL."})
    created = fields.Integer(required=True)
    user_id = fields.String(required=True)
    flow = fields.String(required=True, allow_none=True, validate=validate.OneOf(FLOW_TYPES))
    locale = fields.String(required=True, allow_none=True)
    return_url = fields.String(required=True, allow_none=True)
    livemode = fields.Boolean(required=True)


class PortalLinkSchema(Schema):
    url = fields.String(
        required=True,
        metadata={
            "description": "`<PUBLIC_BASE_URL>/v1/portal-links/<token>`: opens the portal "
            "when a person clicks it, once, until `expires_at`."
        },
    )
    expires_at = fields.Integer(
        required=True, metadata={"description": "Unix time after which the link is refused."}
    )


# --- the mapping API (SPEC §11) ----------------------------------------------------


def _stripe_id(prefix: str, **kwargs: Any) -> fields.String:
    """A Stripe id with this prefix: it becomes a URL path segment or a header value."""
    return fields.String(
        validate=[
            validate.Length(max=255),
            validate.Regexp(rf"^{prefix}[A-Za-z0-9_]+$", error=f"Must be a {prefix}… id."),
        ],
        **kwargs,
    )


class UserPathSchema(Schema):
    """``/v1/users/{user_id}``: the same rule as a body's ``user_id`` (percent-decoded)."""

    user_id = _name(required=True, metadata={"description": "Our user id (percent-encoded)."})


class CustomerMappingRequestSchema(Schema):
    """``PUT /v1/users/{user_id}/customer``: the whole mapping (omitted fields become null)."""

    stripe_customer_id = _stripe_id(
        "cus_",
        metadata={
            "description": "The Stripe customer; exactly one of this and stripe_account_id. "
            "Verified with Stripe before it is written."
        },
    )
    stripe_account_id = _stripe_id(
        "acct_",
        metadata={
            "description": "An Accounts v2 account acting as the customer; exactly one of "
            "this and stripe_customer_id. Not verified with Stripe."
        },
    )
    portal = _name(metadata={"description": "An existing portal profile name."})
    locale = fields.String(validate=validate.OneOf(LOCALES))
    connected_account = _stripe_id(
        "acct_",
        metadata={
            "description": "Connect: the account the customer lives on (every Stripe call "
            "about it carries Stripe-Account)."
        },
    )

    @validates_schema
    def _one_id(self, data: dict[str, Any], **_: Any) -> None:
        given = [name for name in ("stripe_customer_id", "stripe_account_id") if name in data]
        if not given:
            raise ValidationError(
                ["Give stripe_customer_id or stripe_account_id."], "stripe_customer_id"
            )
        if len(given) == 2:
            raise ValidationError(
                ["Give stripe_customer_id or stripe_account_id, not both."], "stripe_account_id"
            )


class CustomerMappingSchema(Schema):
    stripe_customer_id = fields.String(required=True, allow_none=True)
    stripe_account_id = fields.String(required=True, allow_none=True)
    source = fields.String(
        required=True,
        validate=validate.OneOf(MAPPING_SOURCES),
        metadata={"description": "Where the mapping comes from; explicit ones win."},
    )
    source_at = fields.DateTime(
        required=True,
        metadata={"description": "The time of the fact: the write, or the Stripe event's."},
    )
    stale = fields.Boolean(
        required=True, metadata={"description": "Stripe said it no longer knows the id."}
    )
    portal = fields.String(required=True, allow_none=True)
    locale = fields.String(required=True, allow_none=True)
    connected_account = fields.String(required=True, allow_none=True)


class MappedSubscriptionSchema(Schema):
    ref = fields.String(
        required=True, allow_none=True, metadata={"description": "Our reference, if any."}
    )
    stripe_subscription_id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(SUBSCRIPTION_STATUSES))
    cancel_at = fields.DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "Scheduled cancellation time (flexible billing sets only this)."},
    )
    cancel_at_period_end = fields.Boolean(required=True)
    item_id = fields.String(
        required=True, allow_none=True, metadata={"description": "null: several items."}
    )
    price_id = fields.String(required=True, allow_none=True)
    plan = fields.String(
        required=True, allow_none=True, metadata={"description": "Our plan for the price."}
    )
    quantity = fields.Integer(required=True, allow_none=True)


class UserMappingSchema(Schema):
    """``GET /v1/users/{user_id}``: the customer mapping and the subscriptions."""

    user_id = fields.String(required=True)
    customer = fields.Nested(CustomerMappingSchema, required=True)
    subscriptions = fields.List(fields.Nested(MappedSubscriptionSchema), required=True)


class PutMappingSchema(UserMappingSchema):
    """``PUT``'s answer: the mapping as GET shows it, and how the inline backfill went."""

    backfill = fields.String(
        required=True,
        validate=validate.OneOf(("ok", "failed", "skipped")),
        metadata={
            "description": "The user's subscriptions read from Stripe: ok; failed (the "
            "mapping stays; the next event, sync or resync completes it); skipped (an "
            "Accounts v2 id: Stripe lists subscriptions by customer)."
        },
    )


class UpstreamErrorSchema(Schema):
    type = fields.String(allow_none=True)
    code = fields.String(allow_none=True)
    param = fields.String(allow_none=True)
    request_id = fields.String(allow_none=True)
    status = fields.Integer(allow_none=True)


class ProblemSchema(Schema):
    """RFC 9457 problem document (``application/problem+json``)."""

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    code = fields.String(required=True)
    detail = fields.String(required=True)
    request_id = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "422 only: messages keyed by dotted field path."},
    )
    field = fields.String(metadata={"description": "The request field the error is about."})
    upstream = fields.Nested(UpstreamErrorSchema)
    subscriptions = fields.List(
        fields.String(), metadata={"description": "subscription_ambiguous: the candidates."}
    )
    return_url = fields.String(
        allow_none=True,
        metadata={"description": "Portal links: where the person came from, to go back to."},
    )


class HealthSchema(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String())


class WebhookReceiptSchema(Schema):
    """The answer to a verified Stripe webhook delivery (Stripe only looks at the 2xx)."""

    received = fields.Boolean(required=True)
    id = fields.String(required=True, metadata={"description": "The Stripe event id."})
    result = fields.String(
        required=True,
        metadata={
            "description": "applied, duplicate, superseded (older than the mapping), "
            "unchanged, conflict (a metadata link an explicit mapping overrules), "
            "unknown_customer, unknown_configuration (no portal profile uses it), unhandled, "
            "livemode_mismatch or invalid_object."
        },
    )


def flatten_errors(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """Marshmallow's nested error dict as ``{"flow.quantity": [...]}``."""
    flat: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                path = prefix or "body"
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            for sub_path, sub_messages in flatten_errors(value, path).items():
                flat.setdefault(sub_path, []).extend(sub_messages)
    elif isinstance(messages, list):
        flat[prefix or "body"] = [str(m) for m in messages]
    else:
        flat[prefix or "body"] = [str(messages)]
    return flat
