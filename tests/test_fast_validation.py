"""The validation fast path (service/fast_validation.py) never answers differently
from marshmallow.

Generated portal-session bodies, valid and near-valid (every field and flow
type, wrong types, None, extra keys, NULs, lone surrogates, lengths at each
bound), go through ``schema.load`` and through the fast path: whenever the fast
path answers, it is exactly what marshmallow loads (the same keys in the same
order, the same values and types), and the protected pipeline's ``_validate``
answers every body as marshmallow alone would (the same dict, or the same 422
field map). For the valid shapes clients send, the fast path must answer.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError, fields, pre_load, validate

from service.domain import AFTER_COMPLETION_TYPES, FLOW_FIELDS, FLOW_TYPES, LOCALES
from service.errors import ValidationFailed
from service.fast_validation import FAST_SCHEMAS, Unsupported, compile_loader, fast_load
from service.protected import _validate
from service.schemas import PortalSessionRequestSchema, UserPathSchema, flatten_errors

SCHEMA = PortalSessionRequestSchema()
SETTINGS = settings(
    max_examples=3000,
    deadline=None,
    database=None,
    derandomize=True,  # the same bodies every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Each side of every length bound of the schema (1, 128, 255, 500, 2048).
LENGTHS = (0, 1, 2, 127, 128, 129, 254, 255, 256, 499, 500, 501, 2047, 2048, 2049)
CLEAN = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")

good_text = st.one_of(
    st.text(CLEAN, min_size=1, max_size=12),
    st.sampled_from(["u_42", "pro", "stay-20", "sub_42a", "https://app.example.com/billing"]),
)
any_text = st.one_of(
    st.text(max_size=12),  # any unicode, NUL and other controls included
    st.tuples(st.sampled_from(LENGTHS), st.sampled_from(["a", "é", "😀", "\n"])).map(
        lambda t: t[1] * t[0]
    ),
    st.tuples(
        good_text, st.sampled_from(["\x00", "\n\x00", "\x00\n", "\n", "\ud800", "\udcff"])
    ).map(lambda t: t[0] + t[1]),
    st.sampled_from(["\x00", "\ud800", " ", "a\x00b"]),
)
wrong_type = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),  # JSON has no NaN nor inf
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def mostly(good: st.SearchStrategy[Any], *bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four: enough valid bodies for the fast path to answer."""
    return st.one_of(good, good, good, st.one_of(*bad))


def word(choices: tuple[str, ...]) -> st.SearchStrategy[Any]:
    near = [c.upper() for c in choices] + [c + " " for c in choices] + [c[:-1] for c in choices]
    return mostly(st.sampled_from(choices), st.sampled_from(near), any_text, wrong_type)


def text() -> st.SearchStrategy[Any]:
    return mostly(good_text, any_text, wrong_type)


quantity = mostly(
    st.integers(min_value=1, max_value=10000),
    st.sampled_from([-1, 0, 1, 10000, 10001, 2**63, -(2**70), 2**70]),
    st.sampled_from([True, False, 5.0, "5", 1.5]),
    wrong_type,
)
EXTRA_KEYS = st.dictionaries(
    st.sampled_from(["extra", "USER_ID", "", "flow.type", "type", "Type", "user_id "]),
    st.one_of(good_text, wrong_type),
    min_size=1,
    max_size=2,
)


def record(
    required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Any]:
    """A JSON object with these keys, now and then an undeclared one, now and then
    not an object at all."""
    base = st.fixed_dictionaries(required, optional=optional)
    with_extra = st.tuples(base, EXTRA_KEYS).map(lambda t: {**t[0], **t[1]})
    return mostly(base, with_extra, wrong_type, any_text)


after_completion = record(
    {},
    {"type": word(AFTER_COMPLETION_TYPES), "message": text(), "return_url": text()},
)
flow = record(
    {},
    {
        "type": word(FLOW_TYPES),
        "subscription": text(),
        "plan": text(),
        "quantity": quantity,
        "discount": text(),
        "retention_offer": text(),
        "after_completion": after_completion,
    },
)
bodies = record(
    {},
    {
        "user_id": text(),
        "return_url": text(),
        "locale": word(LOCALES),
        "portal": text(),
        "flow": flow,
    },
)


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """The valid shapes: every flow type with any of the fields it allows."""
    body: dict[str, Any] = {"user_id": draw(good_text)}
    for key, value in (
        ("return_url", good_text),
        ("locale", st.sampled_from(LOCALES)),
        ("portal", good_text),
    ):
        if draw(st.booleans()):
            body[key] = draw(value)
    kind = draw(st.sampled_from((None, *FLOW_TYPES)))
    if kind is None:
        return body
    flow: dict[str, Any] = {"type": kind}
    for key in sorted(FLOW_FIELDS[kind]):
        if draw(st.booleans()):
            flow[key] = draw(st.integers(1, 10000) if key == "quantity" else good_text)
    if kind == "subscription_update_confirm" and "plan" not in flow and "quantity" not in flow:
        flow["quantity"] = draw(st.integers(1, 10000))
    done = draw(st.sampled_from((None, *AFTER_COMPLETION_TYPES)))
    if done is not None:
        flow["after_completion"] = {"type": done}
        if done == "redirect":
            flow["after_completion"]["return_url"] = draw(good_text)
        if done == "hosted_confirmation" and draw(st.booleans()):
            flow["after_completion"]["message"] = draw(good_text)
    body["flow"] = flow
    return body


FIELD_NAMES = sorted(
    {"user_id", "return_url", "locale", "portal", "flow", "type", "message"}
    | set().union(*FLOW_FIELDS.values())
    | {"after_completion"}
)


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> Any:
    """A valid body, or one with a single change: a value replaced (any type, NUL,
    a bound crossed, a word of another field), a key dropped or one added."""
    body = draw(valid_bodies())
    if draw(st.booleans()):
        return body
    flow = body.get("flow")
    places: list[dict[str, Any]] = [body]
    if flow is not None:
        places.append(flow)
        if "after_completion" in flow:
            places.append(flow["after_completion"])
    place = draw(st.sampled_from(places))
    change = draw(st.sampled_from(["set", "drop", "add"]))
    if change == "set":
        value = st.one_of(any_text, wrong_type, quantity, word(FLOW_TYPES), word(LOCALES))
        place[draw(st.sampled_from(FIELD_NAMES))] = draw(value)
    elif change == "drop":
        place.pop(draw(st.sampled_from(sorted(place))))
    else:
        place.update(draw(EXTRA_KEYS))
    return body


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types and (for dicts) the same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def marshmallow(body: Any) -> tuple[bool, Any]:
    try:
        return True, SCHEMA.load(body)
    except ValidationError as exc:
        return False, flatten_errors(exc.messages)


def test_fast_path_agrees_with_marshmallow() -> None:
    seen: Counter[str] = Counter()

    @SETTINGS
    @given(body=st.one_of(bodies, near_valid_bodies()))
    @example(body={"user_id": "u_42"})
    @example(body={"user_id": "a" * 128, "flow": {"type": "subscription_update_confirm"}})
    @example(body={"user_id": "u_42", "flow": {"type": "subscription_cancel", "plan": "pro"}})
    @example(body={"flow": {"type": "payment_method_update", "after_completion": {}}})
    @example(body={"user_id": "u\x00"})
    @example(body={"user_id": None})
    def agree(body: Any) -> None:
        before = copy.deepcopy(body)
        fast = fast_load(SCHEMA, body)
        assert same(body, before)  # the fast path does not touch the body
        ok, expected = marshmallow(body)
        if fast is not None:
            seen["answered"] += 1
            assert ok, (body, expected)
            assert same(fast, expected), (body, fast, expected)
        else:
            seen["valid, not answered" if ok else "invalid"] += 1
        # And through the protected pipeline: the same dict, or the same 422 map.
        if ok:
            assert same(_validate(SCHEMA, body), expected)
        else:
            with pytest.raises(ValidationFailed) as refused:
                _validate(SCHEMA, body)
            assert refused.value.errors == expected

    agree()
    # Not vacuous: both sides were exercised, many times.
    assert seen["answered"] >= 300, seen
    assert seen["invalid"] >= 300, seen


def test_fast_path_answers_every_valid_shape() -> None:
    seen: Counter[str] = Counter()

    @SETTINGS
    @given(body=valid_bodies())
    def answers(body: Any) -> None:
        fast = fast_load(SCHEMA, body)
        assert fast is not None, body
        assert same(fast, SCHEMA.load(body))
        seen[body.get("flow", {}).get("type", "home")] += 1

    answers()
    assert set(seen) == {"home", *FLOW_TYPES}, seen


@pytest.mark.parametrize(
    "body",
    [  # the benchmark's mix (bench/dataset.py)
        {"user_id": "u_1"},
        {"user_id": "u_1", "locale": "fr", "return_url": "https://app.example.com/billing"},
        {
            "user_id": "u_1",
            "flow": {
                "type": "payment_method_update",
                "after_completion": {"type": "redirect", "return_url": "https://a.example/d"},
            },
        },
        {"user_id": "u_1", "flow": {"type": "subscription_cancel", "retention_offer": "stay-20"}},
        {
            "user_id": "u_1",
            "flow": {
                "type": "subscription_update_confirm",
                "plan": "pro",
                "quantity": 3,
                "discount": "stay-20",
            },
        },
    ],
)
def test_fast_path_answers_the_common_bodies(body: dict[str, Any]) -> None:
    fast = fast_load(SCHEMA, body)
    assert fast is not None
    assert same(fast, SCHEMA.load(body))


def test_only_the_hot_schemas_take_the_fast_path() -> None:
    assert {PortalSessionRequestSchema} == FAST_SCHEMAS
    compile_loader(PortalSessionRequestSchema())  # supported: would raise Unsupported
    assert fast_load(UserPathSchema(), {"user_id": "u_42"}) is None


class _WithDefault(Schema):
    name = fields.String(load_default="x")


class _Nullable(Schema):
    name = fields.String(allow_none=True)


class _Renamed(Schema):
    name = fields.String(data_key="Name")


class _Email(Schema):
    name = fields.Email()


class _CustomValidator(Schema):
    name = fields.String(validate=lambda v: v != "x")


class _Hooked(Schema):
    name = fields.String()

    @pre_load
    def _strip(self, data: Any, **_: Any) -> Any:
        return data


class _NestedMany(Schema):
    items = fields.Nested(_Nullable, many=True)


class _Predicate(Schema):
    name = fields.String(validate=validate.Predicate("isidentifier"))


@pytest.mark.parametrize(
    "schema",
    [_WithDefault, _Nullable, _Renamed, _Email, _CustomValidator, _Hooked, _NestedMany, _Predicate],
)
def test_a_schema_it_cannot_mirror_gets_no_loader(schema: type[Schema]) -> None:
    """A schema change the fast path does not reproduce turns it off, never wrong."""
    with pytest.raises(Unsupported):
        compile_loader(schema())
