"""Stripe-style parameter decoding and validation for the stand-in.

Stripe's v1 API takes ``application/x-www-form-urlencoded`` bodies whose keys
encode nesting with brackets (``flow_data[subscription_update_confirm][items][0][id]``).
This module turns those pairs back into nested dicts and lists and checks them
against a small declarative schema the way Stripe does: unknown parameters at
any depth, empty strings, missing required parameters, bad enum values,
malformed integers and URLs, and the endpoint's conditional rules all become a
:class:`StripeError` carrying Stripe's error ``code`` and the full bracketed
``param`` name.

It is pure (no aiohttp, no I/O) so the rules can be unit-tested on their own and
read next to Stripe's reference for ``POST /v1/billing_portal/sessions``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias
from urllib.parse import urlsplit

__all__ = [
    "AFTER_COMPLETION_TYPES",
    "FLOW_TYPES",
    "LIST_CUSTOMERS",
    "LIST_STATUS_FILTERS",
    "LIST_SUBSCRIPTIONS",
    "LOCALES",
    "PAGINATION",
    "PORTAL_SESSION",
    "RETENTION_TYPES",
    "RETRIEVE",
    "SUBSCRIPTION_STATUSES",
    "Arr",
    "IdRef",
    "Map",
    "Obj",
    "Params",
    "Scalar",
    "StripeError",
    "Value",
    "cursor_rule",
    "decode_form",
    "format_param",
    "list_subscription_ids",
    "portal_session_ids",
    "validate",
]

# A decoded parameter value: form encoding only ever yields strings, so the
# leaves are strings and the containers come from the bracket syntax.
Value: TypeAlias = "str | list[Value] | dict[str, Value]"
Params: TypeAlias = dict[str, Value]
Path: TypeAlias = tuple[str | int, ...]

# Locale values accepted by Stripe for API version 2025-09-30.clover (SPEC §2).
LOCALES: tuple[str, ...] = (
    "auto", "bg", "cs", "da", "de", "el", "en", "en-AU", "en-CA", "en-GB", "en-IE",
    "en-IN", "en-NZ", "en-SG", "es", "es-419", "et", "fi", "fil", "fr", "fr-CA", "hr",
    "hu", "id", "it", "ja", "ko", "lt", "lv", "ms", "mt", "nb", "nl", "pl", "pt",
    "pt-BR", "ro", "ru", "sk", "sl", "sv", "th", "tr", "vi", "zh", "zh-HK", "zh-TW",
)  # fmt: skip
FLOW_TYPES: tuple[str, ...] = (
    "payment_method_update",
    "subscription_cancel",
    "subscription_update",
    "subscription_update_confirm",
)
# The flow types that carry a same-named configuration object in flow_data.
SUBSCRIPTION_FLOW_TYPES: tuple[str, ...] = FLOW_TYPES[1:]
AFTER_COMPLETION_TYPES: tuple[str, ...] = ("hosted_confirmation", "portal_homepage", "redirect")
RETENTION_TYPES: tuple[str, ...] = ("coupon_offer",)
SUBSCRIPTION_STATUSES: tuple[str, ...] = (
    "active",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "past_due",
    "paused",
    "trialing",
    "unpaid",
)
LIST_STATUS_FILTERS: tuple[str, ...] = (*SUBSCRIPTION_STATUSES, "all", "ended")

_DOC_URL = "https://stripe.com/docs/error-codes/"


class StripeError(Exception):
    """An error Stripe would answer with; rendered as ``{"error": {...}}`` by the app."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",  # Stripe's own field name
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param

    def body(self, request_log_url: str | None = None) -> dict[str, dict[str, str]]:
        """The JSON body Stripe sends for this error (absent fields are omitted, as Stripe does)."""
        error: dict[str, str] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = _DOC_URL + self.code.replace("_", "-")
        if self.param is not None:
            error["param"] = self.param
        if request_log_url is not None:
            error["request_log_url"] = request_log_url
        return {"error": error}


def format_param(path: Sequence[str | int]) -> str:
    """``("flow_data", "items", 0)`` → ``flow_data[items][0]``: Stripe's way of naming a param."""
    head, *rest = path
    return str(head) + "".join(f"[{part}]" for part in rest)


# --------------------------------------------------------------------------- decoding

_KEY_RE = re.compile(r"(?P<base>[^\[\]]+)(?P<segments>(?:\[[^\[\]]*\])*)")
_SEGMENT_RE = re.compile(r"\[([^\[\]]*)\]")
_INDEX_RE = re.compile(r"\d+")

# Decoding builds plain dicts first and turns all-numeric ones into lists at the end,
# because the pairs of one array element can arrive in any order.
_Tree: TypeAlias = dict[str, "str | _Tree"]


def decode_form(pairs: Iterable[tuple[str, str]]) -> Params:
    """Decode Stripe's bracketed form pairs into nested dicts and lists.

    ``items[0][id]=si_1&items[0][quantity]=2`` → ``{"items": [{"id": "si_1", "quantity": "2"}]}``.
    An object whose keys are all decimal indexes becomes a list ordered by index;
    ``key[]`` appends. A repeated key keeps its last value, like Stripe's parser.
    """
    root: _Tree = {}
    for key, value in pairs:
        match = _KEY_RE.fullmatch(key)
        if match is None:
            raise StripeError(
                f"Invalid parameter name: {key!r}.", code="parameter_unknown", param=key
            )
        segments = [match["base"], *_SEGMENT_RE.findall(match["segments"])]
        node = root
        for depth, segment in enumerate(segments):
            if segment == "":
                # "expand[]=a&expand[]=b": each empty index is the next free one.
                segment = str(len(node))
            last = depth == len(segments) - 1
            existing = node.get(segment)
            if last:
                if isinstance(existing, dict):
                    raise _conflict(segments[: depth + 1])
                node[segment] = value
            else:
                if existing is None:
                    child: _Tree = {}
                    node[segment] = child
                    node = child
                elif isinstance(existing, dict):
                    node = existing
                else:
                    raise _conflict(segments[: depth + 1])
    return {key: _listify(value) for key, value in root.items()}


def _conflict(segments: Sequence[str]) -> StripeError:
    param = format_param(segments)
    return StripeError(
        f"Invalid {param}: it was given both as a value and as an object.",
        code="parameter_invalid_object",
        param=param,
    )


def _listify(node: str | _Tree) -> Value:
    if isinstance(node, str):
        return node
    if node and all(_INDEX_RE.fullmatch(key) for key in node):
        return [_listify(node[key]) for key in sorted(node, key=int)]
    return {key: _listify(child) for key, child in node.items()}


# --------------------------------------------------------------------------- schema

Rule: TypeAlias = Callable[[dict[str, Value], Path], None]


@dataclass(frozen=True)
class Scalar:
    """A leaf parameter. ``kind`` says how its string is checked.

    ``clearable``: ``""`` is accepted (Stripe reads it as "unset this").
    """

    kind: Literal["string", "enum", "integer", "url", "boolean"] = "string"
    required: bool = False
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None
    clearable: bool = False


@dataclass(frozen=True)
class Obj:
    """A hash parameter; ``rule`` holds the conditional checks between its fields."""

    fields: Mapping[str, Spec]
    required: bool = False
    rule: Rule | None = field(default=None, compare=False)
    clearable: bool = False


@dataclass(frozen=True)
class Arr:
    """An array parameter (``name[0]``, ``name[1]``...)."""

    item: Spec
    required: bool = False
    max_items: int | None = None
    clearable: bool = False


@dataclass(frozen=True)
class Map:
    """A hash of the caller's own keys (``metadata[key]=value``), each value a ``value``."""

    value: Scalar
    max_keys: int
    max_key_length: int
    required: bool = False
    clearable: bool = False


Spec: TypeAlias = Scalar | Obj | Arr | Map


def validate(params: Params, spec: Obj) -> None:
    """Raise the first :class:`StripeError` Stripe would give for ``params``.

    Three passes, so the error a client sees does not depend on where in the
    tree the problem sits: unknown parameters first, then empty strings, then
    types, required parameters, enums and conditional rules in schema order.
    """
    _check_unknown(params, spec, ())
    _check_empty(params, spec, ())
    _check_shape(params, spec, ())


def _check_unknown(value: Value, spec: Spec, path: Path) -> None:
    if isinstance(spec, Obj) and isinstance(value, dict):
        for key, child in value.items():
            child_spec = spec.fields.get(key)
            if child_spec is None:
                param = format_param((*path, key))
                raise StripeError(
                    f"Received unknown parameter: {param}", code="parameter_unknown", param=param
                )
            _check_unknown(child, child_spec, (*path, key))
    elif isinstance(spec, Arr) and isinstance(value, list):
        for index, child in enumerate(value):
            _check_unknown(child, spec.item, (*path, index))


def _child_spec(spec: Spec | None, key: str | int) -> Spec | None:
    """The spec of one child of a value ``spec`` describes (None where it has no say)."""
    if isinstance(spec, Obj) and isinstance(key, str):
        return spec.fields.get(key)
    if isinstance(spec, Arr) and isinstance(key, int):
        return spec.item
    if isinstance(spec, Map) and isinstance(key, str):
        return spec.value
    return None


def _check_empty(value: Value, spec: Spec | None, path: Path) -> None:
    if isinstance(value, dict):
        for key, child in value.items():
            _check_empty(child, _child_spec(spec, key), (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _check_empty(child, _child_spec(spec, index), (*path, index))
    elif value == "" and not (spec is not None and spec.clearable):
        # Stripe reads an empty value as "unset this", which a create call cannot do.
        param = format_param(path)
        raise StripeError(
            f"You passed an empty string for '{param}'. We assume empty values are an "
            f"attempt to unset a parameter; however '{param}' cannot be unset. You should "
            f"remove '{param}' from your request or supply a non-empty value.",
            code="parameter_invalid_empty",
            param=param,
        )


def _check_shape(value: Value, spec: Spec, path: Path) -> None:
    param = format_param(path) if path else ""
    if value == "" and spec.clearable:
        return  # "unset this", allowed here
    if isinstance(spec, Scalar):
        _check_scalar(value, spec, param)
    elif isinstance(spec, Arr):
        if not isinstance(value, list):
            raise StripeError(
                f"Invalid array: {param} must be an array (pass it as {param}[0]=...).",
                code="parameter_invalid_array",
                param=param,
            )
        if spec.max_items is not None and len(value) > spec.max_items:
            raise StripeError(
                f"Invalid {param}: must contain at most {spec.max_items} "
                f"element{'s' if spec.max_items != 1 else ''}; you passed {len(value)}.",
                code="parameter_invalid_array",
                param=param,
            )
        for index, child in enumerate(value):
            _check_shape(child, spec.item, (*path, index))
    else:
        if not isinstance(value, dict):
            raise StripeError(
                f"Invalid object: {param} must be an object (pass it as {param}[key]=...).",
                code="parameter_invalid_object",
                param=param,
            )
        if isinstance(spec, Map):
            _check_map(value, spec, path)
            return
        # Own fields first (presence, scalar checks), then the rule that ties them
        # together, then nested objects, so a conditional error on a parent wins
        # over a detail deep inside a child the parent should not have had.
        for key, child_spec in spec.fields.items():
            if key not in value:
                if child_spec.required:
                    missing = format_param((*path, key))
                    raise StripeError(
                        f"Missing required param: {missing}.",
                        code="parameter_missing",
                        param=missing,
                    )
            elif isinstance(child_spec, Scalar):
                _check_shape(value[key], child_spec, (*path, key))
        if spec.rule is not None:
            spec.rule(value, path)
        for key, child_spec in spec.fields.items():
            if key in value and not isinstance(child_spec, Scalar):
                _check_shape(value[key], child_spec, (*path, key))


def _check_map(value: dict[str, Value], spec: Map, path: Path) -> None:
    param = format_param(path)
    if len(value) > spec.max_keys:
        raise StripeError(
            f"Invalid {param}: it can have at most {spec.max_keys} keys; you passed {len(value)}.",
            code="parameter_invalid_object",
            param=param,
        )
    for key, child in value.items():
        if len(key) > spec.max_key_length:
            raise StripeError(
                f"Invalid {param}: keys must be at most {spec.max_key_length} characters "
                f"long; '{key}' is {len(key)}.",
                code="parameter_invalid_object",
                param=format_param((*path, key)),
            )
        _check_scalar(child, spec.value, format_param((*path, key)))


def _one_of(choices: Sequence[str]) -> str:
    if len(choices) == 1:
        return choices[0]
    return ", ".join(choices[:-1]) + f", or {choices[-1]}"


def _check_scalar(value: Value, spec: Scalar, param: str) -> None:
    if not isinstance(value, str):
        raise StripeError(
            f"Invalid {param}: must be a string, not an object or array.",
            code="parameter_invalid_string",
            param=param,
        )
    if spec.kind == "boolean" and value not in ("true", "false"):
        raise StripeError(
            f"Invalid boolean: {value}", code="parameter_invalid_boolean", param=param
        )
    if spec.kind == "enum" and value not in spec.choices:
        raise StripeError(
            f"Invalid {param}: must be one of {_one_of(spec.choices)}",
            code="parameter_invalid_string",
            param=param,
        )
    if spec.kind == "integer":
        if re.fullmatch(r"[+-]?\d+", value) is None:
            raise StripeError(
                f"Invalid integer: {value}", code="parameter_invalid_integer", param=param
            )
        number = int(value)
        if spec.minimum is not None and number < spec.minimum:
            raise StripeError(
                f"This value must be greater than or equal to {spec.minimum}.",
                code="parameter_invalid_integer",
                param=param,
            )
        if spec.maximum is not None and number > spec.maximum:
            raise StripeError(
                f"This value must be less than or equal to {spec.maximum}.",
                code="parameter_invalid_integer",
                param=param,
            )
    if spec.kind == "url" and not _is_url(value):
        raise StripeError("Not a valid URL", code="url_invalid", param=param)
    if spec.max_length is not None and len(value) > spec.max_length:
        too_long = f"Invalid {param}: must be at most {spec.max_length} characters long."
        raise StripeError(too_long, code="parameter_invalid_string", param=param)


def _is_url(value: str) -> bool:
    if any(ch.isspace() for ch in value):
        return False
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a non-numeric port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


# --------------------------------------------------------------------------- rules


def _require_exactly_one(obj: dict[str, Value], path: Path, first: str, second: str) -> None:
    if first in obj and second in obj:
        raise StripeError(
            f"You may only specify one of these parameters: "
            f"{format_param((*path, first))}, {format_param((*path, second))}.",
            code="parameters_exclusive",
            param=format_param((*path, second)),
        )
    if first not in obj and second not in obj:
        raise StripeError(
            f"You must provide one of these parameters: "
            f"{format_param((*path, first))}, {format_param((*path, second))}.",
            code="parameter_missing",
            param=format_param((*path, first)),
        )


def _customer_rule(obj: dict[str, Value], path: Path) -> None:
    _require_exactly_one(obj, path, "customer", "customer_account")


def _typed_children_rule(type_param: str, owners: Sequence[str], required: Sequence[str]) -> Rule:
    """A rule for ``{type: X, X: {...}}`` hashes: ``X`` only with its own type.

    ``required`` lists the types whose object must be present when chosen.
    """

    def rule(obj: dict[str, Value], path: Path) -> None:
        chosen = obj.get(type_param)
        type_name = format_param((*path, type_param))
        for owner in owners:
            param = format_param((*path, owner))
            if owner == chosen and owner in required and owner not in obj:
                raise StripeError(
                    f"Missing required param: {param}. It is required when {type_name} is {owner}.",
                    code="parameter_missing",
                    param=param,
                )
            if owner != chosen and owner in obj:
                raise StripeError(
                    f"Received unknown parameter: {param}. {param} can only be used when "
                    f"{type_name} is {owner}.",
                    code="parameter_unknown",
                    param=param,
                )

    return rule


def _discount_rule(obj: dict[str, Value], path: Path) -> None:
    _require_exactly_one(obj, path, "coupon", "promotion_code")


_ID = Scalar()
_REQUIRED_ID = Scalar(required=True)

PORTAL_SESSION = Obj(
    {
        "customer": _ID,
        "customer_account": _ID,
        "configuration": _ID,
        "flow_data": Obj(
            {
                "type": Scalar("enum", required=True, choices=FLOW_TYPES),
                "after_completion": Obj(
                    {
                        "type": Scalar("enum", required=True, choices=AFTER_COMPLETION_TYPES),
                        "hosted_confirmation": Obj({"custom_message": Scalar()}),
                        "redirect": Obj({"return_url": Scalar("url", required=True)}),
                    },
                    rule=_typed_children_rule(
                        "type", ("hosted_confirmation", "redirect"), required=("redirect",)
                    ),
                ),
                "subscription_cancel": Obj(
                    {
                        "subscription": _REQUIRED_ID,
                        "retention": Obj(
                            {
                                "type": Scalar("enum", required=True, choices=RETENTION_TYPES),
                                "coupon_offer": Obj({"coupon": _REQUIRED_ID}),
                            },
                            rule=_typed_children_rule(
                                "type", ("coupon_offer",), required=("coupon_offer",)
                            ),
                        ),
                    }
                ),
                "subscription_update": Obj({"subscription": _REQUIRED_ID}),
                "subscription_update_confirm": Obj(
                    {
                        "subscription": _REQUIRED_ID,
                        # Stripe: "Currently, only up to one may be specified".
                        "items": Arr(
                            Obj(
                                {
                                    "id": _REQUIRED_ID,
                                    "price": _ID,
                                    "quantity": Scalar("integer", minimum=1),
                                }
                            ),
                            required=True,
                            max_items=1,
                        ),
                        "discounts": Arr(
                            Obj({"coupon": _ID, "promotion_code": _ID}, rule=_discount_rule),
                            max_items=1,
                        ),
                    }
                ),
            },
            rule=_typed_children_rule(
                "type", SUBSCRIPTION_FLOW_TYPES, required=SUBSCRIPTION_FLOW_TYPES
            ),
        ),
        "locale": Scalar("enum", choices=LOCALES),
        "on_behalf_of": _ID,
        "return_url": Scalar("url"),
        # Every Stripe endpoint accepts expand[]; the stand-in has nothing to expand.
        "expand": Arr(Scalar()),
    },
    rule=_customer_rule,
)


def cursor_rule(obj: dict[str, Value], path: Path) -> None:
    """List endpoints take at most one of the two cursors."""
    if "starting_after" in obj and "ending_before" in obj:
        raise StripeError(
            "You may only specify one of these parameters: starting_after, ending_before.",
            code="parameters_exclusive",
            param="ending_before",
        )


# What every list endpoint takes: a page size and one cursor.
PAGINATION: Mapping[str, Spec] = {
    "limit": Scalar("integer", minimum=1, maximum=100),
    "starting_after": _ID,
    "ending_before": _ID,
    "expand": Arr(Scalar()),
}

# The subset of GET /v1/subscriptions filters the stand-in implements; the others
# are reported as unknown rather than silently ignored.
LIST_SUBSCRIPTIONS = Obj(
    {
        "customer": _ID,
        "price": _ID,
        "status": Scalar("enum", choices=LIST_STATUS_FILTERS),
        **PAGINATION,
    },
    rule=cursor_rule,
)

# GET /v1/customers: email (exact, case-sensitive, as Stripe) and pagination;
# Stripe's created[...] and test_clock filters are not implemented, so unknown.
LIST_CUSTOMERS = Obj({"email": Scalar(), **PAGINATION}, rule=cursor_rule)

# Retrieving one object by its id (the id is in the path): only expand[].
RETRIEVE = Obj({"expand": Arr(Scalar())})


# --------------------------------------------------------------------------- id references


@dataclass(frozen=True)
class IdRef:
    """An id a request refers to: Stripe answers ``resource_missing`` if it does not exist."""

    param: str
    value: str
    noun: str
    prefix: str | None

    def error(self) -> StripeError:
        return StripeError(
            f"No such {self.noun}: '{self.value}'", code="resource_missing", param=self.param
        )

    def looks_valid(self) -> bool:
        return self.prefix is None or (
            self.value.startswith(self.prefix) and len(self.value) > len(self.prefix)
        )


def _child(value: Value | None, key: str) -> Value | None:
    return value.get(key) if isinstance(value, dict) else None


def _ref(out: list[IdRef], path: Path, value: Value | None, noun: str, prefix: str | None) -> None:
    if isinstance(value, str):
        out.append(IdRef(format_param(path), value, noun, prefix))


def portal_session_ids(params: Params) -> list[IdRef]:
    """The ids a validated portal-session request names, in the order Stripe looks them up."""
    out: list[IdRef] = []
    _ref(out, ("customer",), params.get("customer"), "customer", "cus_")
    _ref(out, ("customer_account",), params.get("customer_account"), "account", "acct_")
    _ref(out, ("configuration",), params.get("configuration"), "configuration", "bpc_")
    _ref(out, ("on_behalf_of",), params.get("on_behalf_of"), "account", "acct_")
    flow = params.get("flow_data")
    for flow_type in SUBSCRIPTION_FLOW_TYPES:
        sub = _child(flow, flow_type)
        base: Path = ("flow_data", flow_type)
        _ref(out, (*base, "subscription"), _child(sub, "subscription"), "subscription", "sub_")
        offer = _child(_child(sub, "retention"), "coupon_offer")
        coupon_path = (*base, "retention", "coupon_offer", "coupon")
        _ref(out, coupon_path, _child(offer, "coupon"), "coupon", None)
        items = _child(sub, "items")
        for index, item in enumerate(items if isinstance(items, list) else []):
            item_path = (*base, "items", index)
            _ref(out, (*item_path, "id"), _child(item, "id"), "subscription item", "si_")
            _ref(out, (*item_path, "price"), _child(item, "price"), "price", "price_")
        discounts = _child(sub, "discounts")
        for index, discount in enumerate(discounts if isinstance(discounts, list) else []):
            d_path = (*base, "discounts", index)
            _ref(out, (*d_path, "coupon"), _child(discount, "coupon"), "coupon", None)
            promo = _child(discount, "promotion_code")
            _ref(out, (*d_path, "promotion_code"), promo, "promotion code", "promo_")
    return out


def list_subscription_ids(params: Params) -> list[IdRef]:
    """The ids a validated subscription-list request names (cursors are checked by the app)."""
    out: list[IdRef] = []
    _ref(out, ("customer",), params.get("customer"), "customer", "cus_")
    _ref(out, ("price",), params.get("price"), "price", "price_")
    _ref(out, ("starting_after",), params.get("starting_after"), "subscription", "sub_")
    _ref(out, ("ending_before",), params.get("ending_before"), "subscription", "sub_")
    return out
