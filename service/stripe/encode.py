"""Stripe's form encoding of nested params, as its SDKs do it (stripe-python ``_encode.py``)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


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


def form_body(pairs: Sequence[tuple[str, str]]) -> bytes:
    """The pairs as an ``application/x-www-form-urlencoded`` body, byte for byte what
    aiohttp's FormData (``urlencode``) makes of them, without building one per call."""
    return "&".join(f"{_quoted(key)}={_quoted(value)}" for key, value in pairs).encode()


# Keys and most values (a profile's configuration, return URLs, locales) repeat
# from request to request; quoting them is the costly part.
@functools.lru_cache(maxsize=2048)
def _quoted(text: str) -> str:
    return quote_plus(text)
