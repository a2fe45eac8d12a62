"""What differs between a portal configuration as the file declares it and as Stripe has it.

Pure functions, shared by ``profiles plan``, ``apply`` and ``sync``
(:mod:`service.profiles`). The file's ``configuration`` is a body of create
params; Stripe fills in what it leaves out (every feature disabled, lists
empty, cancel ``at_period_end``, prorations ``none``, no headline …). So the
configuration a body describes is :func:`expected_object`: the params laid
over those defaults. :func:`changes` compares it with a configuration object
field by field (dotted paths); a list of values is compared as a set (Stripe
keeps no meaningful order in prices or allowed updates), and ``null``, ``""``
and ``[]`` are all "none". Only the fields a file can set are compared
(``login_page.url``, ``created``, ``livemode`` … are Stripe's).

A file controls the fields it declares, and the fields its previous version
declared (:func:`file_changes`): a field it never named is Stripe's default,
or the Dashboard's, and nobody's drift (:mod:`service.profile_drift` judges
drift the same way). An update leaves unsent fields as they are, so
:func:`update_params` sends the file's whole body (a list sent replaces the
old one; an empty one becomes ``""``, which clears it) plus the default of
every field the file no longer declares where Stripe's value differs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# What Stripe fills in for a field a create leaves out (stripe-portal-configurations.md).
DEFAULTS: dict[str, Any] = {
    "business_profile": {
        "headline": None,
        "privacy_policy_url": None,
        "terms_of_service_url": None,
    },
    "default_return_url": None,
    "name": None,
    "login_page": {"enabled": False},
    "features": {
        "customer_update": {"enabled": False, "allowed_updates": []},
        "invoice_history": {"enabled": False},
        "payment_method_update": {"enabled": False},
        "subscription_cancel": {
            "enabled": False,
            "mode": "at_period_end",
            "proration_behavior": "none",
            "cancellation_reason": {"enabled": False, "options": []},
        },
        "subscription_update": {
            "enabled": False,
            "default_allowed_updates": [],
            "products": None,
            "proration_behavior": "none",
            "schedule_at_period_end": {"conditions": []},
            "trial_update_behavior": "end_trial",
        },
    },
}
Key = str | int
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class Change:
    """One field that differs: where (``keys``), what it is (``old``), what it becomes (``new``)."""

    keys: tuple[Key, ...]
    old: Any
    new: Any

    @property
    def path(self) -> str:
        """``features.subscription_update.products[0].prices``."""
        text = ""
        for key in self.keys:
            text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
        return text

    def line(self) -> str:
        """``path: old → new``, values rendered for a reader."""
        return f"{self.path}: {render(self.old)} → {render(self.new)}"


def expected_object(params: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration (its file-controlled fields) a create with ``params`` makes."""
    return _overlay(DEFAULTS, params)


def changes(actual: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> list[Change]:
    """Every field of ``expected`` where ``actual`` (a configuration) differs."""
    return list(_walk(expected, actual if actual is not None else {}, ()))


def file_changes(
    actual: Mapping[str, Any] | None,
    params: Mapping[str, Any],
    previous: Mapping[str, Any] | None = None,
) -> list[Change]:
    """What an apply of ``params`` would change in ``actual``, Stripe's configuration.

    A file controls the fields it declares, and those its ``previous`` body
    declared (dropping one returns it to Stripe's default); the rest is nobody's
    (as :mod:`service.profile_drift` judges drift). An inactive configuration
    is made active again.
    """
    found = [
        c
        for c in changes(actual, expected_object(params))
        if _covered(params, c.keys) or (previous is not None and _covered(previous, c.keys))
    ]
    if actual is not None and actual.get("active") is False:
        found.insert(0, Change(("active",), False, True))
    return found


def update_params(params: Mapping[str, Any], differing: list[Change]) -> dict[str, Any]:
    """The body of an update making Stripe's configuration what ``params`` declares."""
    body: dict[str, Any] = _clearing(copy.deepcopy(dict(params)))
    for change in differing:
        if _covered(body, change.keys):
            continue
        _put(body, change.keys, _as_param(change.new))
    return body


def render(value: Any) -> str:
    """A value as ``plan`` prints it: ``[price_a, price_b]``, ``true``, ``null``."""
    if value is _ABSENT or value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in value.items()) + "}"
    if value == "":
        return '""'
    return str(value)


# --- helpers -----------------------------------------------------------------


def _overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` laid over it, nested mappings merged key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _overlay(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _walk(expected: Any, actual: Any, keys: tuple[Key, ...]) -> Iterator[Change]:
    if isinstance(expected, Mapping):
        here = actual if isinstance(actual, Mapping) else {}
        for key, sub in expected.items():
            yield from _walk(sub, here.get(key, _ABSENT), (*keys, key))
        return
    if _is_records(expected) or _is_records(actual):
        wanted = expected if isinstance(expected, list) else []
        found = actual if isinstance(actual, list) else []
        if not wanted or not found:  # one side has none: the list as a whole differs
            if not (_none(expected) and _none(actual)):
                yield Change(keys, _shown(actual), expected)
            return
        for index in range(max(len(wanted), len(found))):
            if index >= len(found):
                yield Change((*keys, index), None, wanted[index])
            elif index >= len(wanted):
                yield Change((*keys, index), found[index], None)
            else:
                yield from _walk(wanted[index], found[index], (*keys, index))
        return
    if _normal(expected) != _normal(actual):
        yield Change(keys, _shown(actual), expected)


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(v, Mapping) for v in value)


def _none(value: Any) -> bool:
    return value is _ABSENT or value is None or value == "" or value == []


def _normal(value: Any) -> Any:
    """Comparable form: none is none; a list of values is a set."""
    if _none(value):
        return None
    if isinstance(value, list | tuple):
        return sorted((str(v) for v in value), key=str)
    return value


def _shown(value: Any) -> Any:
    return None if value is _ABSENT else value


def _clearing(value: Any) -> Any:
    """Empty lists and nulls become ``""``: sent in an update, they clear the field."""
    if isinstance(value, dict):
        return {k: _clearing(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clearing(v) for v in value] if value else ""
    if value is None:
        return ""
    return value


def _covered(body: Mapping[str, Any], keys: tuple[Key, ...]) -> bool:
    """Whether the body already sends the field (or the whole list holding it)."""
    node: Any = body
    for key in keys:
        if isinstance(node, list) or node == "":
            return True  # a list (or a cleared value) is sent whole
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def _put(body: dict[str, Any], keys: tuple[Key, ...], value: Any) -> None:
    node = body
    for key in keys[:-1]:
        node = node.setdefault(str(key), {})
    node[str(keys[-1])] = value


def _as_param(value: Any) -> Any:
    if _none(value):
        return ""
    if isinstance(value, list):
        return list(value)
    return value
