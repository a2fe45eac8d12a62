"""Stripe's form encoding of nested params, as its SDKs do it (stripe-python ``_encode.py``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def encode_form(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten nested params into Stripe's ``a[b][0][c]=v`` form pairs; None is omitted."""
    if not isinstance(params, Mapping):
        raise TypeError("top-level params must be a mapping")
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        _flatten(value, key, pairs)
    return pairs


def _flatten(value: Any, prefix: str, into: list[tuple[str, str]]) -> None:
    # Appends instead of yielding: a call per leaf, no generator frames.
    if isinstance(value, str):
        into.append((prefix, value))
    elif value is None:
        return
    elif isinstance(value, bool):
        into.append((prefix, "true" if value else "false"))
    elif isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(sub, f"{prefix}[{key}]", into)
    elif isinstance(value, list | tuple):
        for index, sub in enumerate(value):
            _flatten(sub, f"{prefix}[{index}]", into)
    else:
        into.append((prefix, str(value)))


def form_body(pairs: Sequence[tuple[str, str]]) -> bytes:
    """The pairs as an ``application/x-www-form-urlencoded`` body, byte for byte what
    aiohttp's FormData (``urlencode``) makes of them, without building one per call."""
    return "&".join(f"{_quoted(key)}={_quoted(value)}" for key, value in pairs).encode()


# Keys and most values (a profile's configuration, return URLs, locales) repeat
# from request to request; quoting them is the costly part.
@functools.lru_cache(maxsize=2048)
def _quoted(text: str) -> str:
    return quote_plus(text)
