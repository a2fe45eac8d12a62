"""Untrusted text (header values) made safe to store in Postgres and to log as JSON.

aiohttp keeps a header byte that is not UTF-8 as a lone surrogate
(``surrogateescape``): Postgres refuses such a string, and NUL; orjson refuses
surrogates. :func:`printable` turns any value into printable text that both
accept, escaping what is not printable so it stays visible.
"""

from __future__ import annotations

# The cap on stored header text (the audit ``user_agent``).
MAX_HEADER_TEXT = 512

# aiohttp maps a byte 0x80-0xff that is not part of UTF-8 to U+DC80-U+DCFF.
_RAW_BYTE_FIRST = 0xDC80
_RAW_BYTE_LAST = 0xDCFF


def _escape(char: str) -> str:
    code = ord(char)
    if _RAW_BYTE_FIRST <= code <= _RAW_BYTE_LAST:
        return f"\\x{code - 0xDC00:02x}"  # the byte as it came
    if code < 0x80:
        return f"\\x{code:02x}"  # NUL, TAB, DEL and the other C0 controls
    if code <= 0xFFFF:
        return f"\\u{code:04x}"  # C1 controls, bidi overrides, separators, other surrogates
    return f"\\U{code:08x}"


def printable(value: str, limit: int | None = MAX_HEADER_TEXT) -> str:
    r"""``value`` as printable text of at most ``limit`` characters.

    Printable characters (``str.isprintable``), ASCII or not, stay themselves;
    any other is escaped: a raw byte as ``\xe9``, a control below U+0080 as
    ``\x00``, anything else as ``\u202e`` or ``\U000e0001``. The result is
    valid UTF-8 without NUL, so Postgres text and a JSON encoder take it; an
    escape is never cut in half by the limit.
    """
    if value.isascii() and value.isprintable():  # every well-behaved header
        return value if limit is None else value[:limit]
    pieces: list[str] = []
    size = 0
    for char in value:
        piece = char if char.isprintable() else _escape(char)
        size += len(piece)
        if limit is not None and size > limit:
            break
        pieces.append(piece)
    return "".join(pieces)
