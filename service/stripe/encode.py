"""Stripe's form encoding of nested params, as its SDKs do it (stripe-python ``_encode.py``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def encode_form(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten nested params into Stripe's ``a[b][0][c]=v`` form pairs; None is omitted."""
    return list(_flatten(params, None))


def _flatten(value: Any, prefix: str | None) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            yield from _flatten(sub, key if prefix is None else f"{prefix}[{key}]")
    elif isinstance(value, list | tuple):
        for index, sub in enumerate(value):
            yield from _flatten(sub, f"{prefix}[{index}]")
    elif value is None:
        return
    elif prefix is None:
        raise TypeError("top-level params must be a mapping")
    elif isinstance(value, bool):
        yield prefix, "true" if value else "false"
    else:
        yield prefix, str(value)
