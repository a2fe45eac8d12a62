"""A fast path in front of marshmallow for the hot request bodies.

``schema.load`` of a portal-session body costs 50-120 µs: the schema
machinery (error stores, hooks, a closure and a ``Field.deserialize`` per
field), not the checks themselves. :func:`fast_load` answers in a few µs for a
body it can prove valid, and says "not sure" (None) for anything else, so the
caller runs ``schema.load`` as before: every refusal, and every 422 message, is
still marshmallow's.

Nothing here restates a rule. :func:`compile_loader` reads the schema once
(its fields in declaration order, their validators' bounds and choices, the
nested schemas) and calls the schema's own ``@validates_schema`` methods, so
the schema stays the single source of truth. A schema that uses anything this
module does not reproduce exactly (another field type, ``allow_none``, a
default, ``data_key``, a pre/post-load hook, an unknown validator...) gets no
loader, and marshmallow handles all of its bodies. tests/test_fast_validation.py
checks, over generated bodies, that an answer is always what ``schema.load``
returns.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, cast

from marshmallow import RAISE, Schema, ValidationError, fields, missing, validate
from marshmallow.decorators import POST_LOAD, PRE_LOAD, VALIDATES, VALIDATES_SCHEMA

from service.schemas import PortalSessionRequestSchema, StrictInteger

# The request schemas of the hot routes (POST /v1/portal-sessions and
# /v1/portal-links); any other schema goes to marshmallow only.
FAST_SCHEMAS: Final = frozenset({PortalSessionRequestSchema})

# A field check returns the loaded value, or this for "not sure".
_NO: Final = object()

Check = Callable[[Any], Any]
Loader = Callable[[Any], dict[str, Any] | None]


class Unsupported(Exception):
    """The schema uses something the fast path does not reproduce exactly."""


def compile_loader(schema: Schema) -> Loader:
    """A loader for ``schema``: the dict ``schema.load(body)`` returns, or None.

    Raises :class:`Unsupported` for a schema it cannot mirror exactly.
    """
    load = _schema_check(schema)

    def loader(body: Any) -> dict[str, Any] | None:
        loaded = load(body)
        return None if loaded is _NO else loaded

    return loader


_LOADERS: dict[Schema, Loader | None] = {}


def fast_load(schema: Schema, body: Any) -> dict[str, Any] | None:
    """``schema.load(body)`` for a body proved valid; None: run ``schema.load``.

    Loaders are compiled on first use, per schema instance (a route's schema
    lives as long as the process), from that instance's options.
    """
    try:
        loader = _LOADERS[schema]
    except KeyError:
        loader = None
        if type(schema) in FAST_SCHEMAS:
            try:
                loader = compile_loader(schema)
            except Unsupported:
                loader = None  # marshmallow handles every body of this schema
        _LOADERS[schema] = loader
    return None if loader is None else loader(body)


def _schema_check(schema: Schema) -> Check:
    """A check that mirrors ``schema.load`` (RAISE on unknown keys) for valid input."""
    if (
        schema.many
        or (schema.partial is not None and schema.partial is not False)
        or schema.unknown != RAISE
        or schema.dict_class is not dict
    ):
        raise Unsupported(f"{type(schema).__name__}: options")
    hooks = type(schema).resolve_hooks()
    if hooks.get(PRE_LOAD) or hooks.get(POST_LOAD) or hooks.get(VALIDATES):
        raise Unsupported(f"{type(schema).__name__}: a load hook or field validator method")
    validators = []
    for attr_name, pass_many, kwargs in hooks.get(VALIDATES_SCHEMA, []):
        if pass_many or kwargs.get("pass_original"):
            raise Unsupported(f"{type(schema).__name__}.{attr_name}: pass_many/pass_original")
        validators.append(getattr(schema, attr_name))
    checks: list[tuple[str, Check, bool]] = []
    for name, field in schema.load_fields.items():
        if (
            field.data_key is not None
            or field.attribute is not None
            or "." in name  # marshmallow's set_value would nest it
            or field.allow_none
            or field.load_default is not missing
        ):
            raise Unsupported(f"{type(schema).__name__}.{name}: field options")
        checks.append((name, _field_check(field), field.required))
    field_checks = tuple(checks)
    schema_validators = tuple(validators)

    def check(body: Any) -> Any:
        if type(body) is not dict:
            return _NO
        out: dict[str, Any] = {}
        # In declaration order, as marshmallow builds its result.
        for name, value_check, required in field_checks:
            value = body.get(name, missing)
            if value is missing:
                if required:
                    return _NO
                continue
            loaded = value_check(value)
            if loaded is _NO:
                return _NO
            out[name] = loaded
        if len(out) != len(body):
            return _NO  # a key the schema does not declare (marshmallow: "Unknown field.")
        for validator in schema_validators:
            try:
                # As marshmallow's Schema._run_validator calls it.
                validator(out, partial=None, many=False)
            except ValidationError:
                return _NO
        return out

    return check


def _field_check(field: fields.Field) -> Check:
    kind = type(field)
    if kind is fields.Nested:
        return _nested_check(cast(fields.Nested, field))
    if kind is fields.String:
        return _string_check(field)
    if kind in (fields.Integer, StrictInteger):
        return _integer_check(field)
    raise Unsupported(f"{kind.__name__} fields")


def _nested_check(field: fields.Nested) -> Check:
    if field.many or field.only is not None or field.exclude or field.unknown is not None:
        raise Unsupported("Nested options")
    if field.validators:
        raise Unsupported("validators on a Nested field")
    return _schema_check(field.schema)


def _string_check(field: fields.Field) -> Check:
    """A str (exactly; marshmallow also takes bytes, JSON never gives them)
    that passes the field's Length, Regexp and OneOf validators."""
    low, high = _length_bounds(field)
    patterns: list[re.Pattern[str]] = []
    choices: frozenset[str] | None = None
    for validator in field.validators:
        if isinstance(validator, validate.Length):
            continue
        if type(validator) is validate.Regexp and isinstance(validator.regex.pattern, str):
            patterns.append(cast(re.Pattern[str], validator.regex))
        elif type(validator) is validate.OneOf and all(type(c) is str for c in validator.choices):
            # For a str value, `in` a set of str is `in` their tuple.
            allowed = frozenset(validator.choices)
            choices = allowed if choices is None else choices & allowed
        else:
            raise Unsupported(f"{type(validator).__name__} on a String")
    regexes = tuple(patterns)

    def check(value: Any) -> Any:
        if type(value) is not str:
            return _NO
        length = len(value)
        if length < low or length > high:
            return _NO
        if choices is not None and value not in choices:
            return _NO
        for regex in regexes:
            if regex.match(value) is None:  # as validate.Regexp
                return _NO
        return value

    return check


def _length_bounds(field: fields.Field) -> tuple[float, float]:
    """The length interval every Length validator of the field admits."""
    low: float = 0
    high: float = float("inf")
    for validator in field.validators:
        if type(validator) is not validate.Length and isinstance(validator, validate.Length):
            raise Unsupported("a Length subclass")
        if type(validator) is validate.Length:
            if validator.equal is not None:
                low, high = max(low, validator.equal), min(high, validator.equal)
                continue
            if validator.min is not None:
                low = max(low, validator.min)
            if validator.max is not None:
                high = min(high, validator.max)
    return low, high


def _integer_check(field: fields.Field) -> Check:
    """An int (exactly: not a bool, a float or a numeric string, which marshmallow
    may take or refuse) inside the field's Range validators. Integer and
    StrictInteger both load such an int as itself."""
    ranges: list[validate.Range] = []
    for validator in field.validators:
        if type(validator) is not validate.Range:
            raise Unsupported(f"{type(validator).__name__} on an Integer")
        ranges.append(validator)
    bounds = tuple((r.min, r.min_inclusive, r.max, r.max_inclusive) for r in ranges)

    def check(value: Any) -> Any:
        if type(value) is not int:
            return _NO
        # validate.Range's comparisons, one by one.
        for low, low_inclusive, high, high_inclusive in bounds:
            if low is not None and (value < low if low_inclusive else value <= low):
                return _NO
            if high is not None and (value > high if high_inclusive else value >= high):
                return _NO
        return value

    return check
