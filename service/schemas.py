"""Marshmallow schemas: the request body, the responses and the problem document.

They drive validation (the protected pipeline loads the body with the schema its
route declares) and the OpenAPI document (aiohttp-apigami), and the tests use the
response schemas as oracles. The words they accept come from ``domain.py``.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from service.domain import AFTER_COMPLETION_TYPES, FLOW_FIELDS, FLOW_TYPES, LOCALES

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
            "unknown_customer, unhandled, livemode_mismatch or invalid_object."
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
