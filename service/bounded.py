"""One bounded body reader for every body we take in: requests and Stripe's answers.

A body is read chunk by chunk and refused as soon as it is known to exceed its
limit (announced by ``Content-Length`` or counted as it arrives), so a client
or a broken proxy streaming without end never makes us buffer it.
"""

from __future__ import annotations

import aiohttp


class BodyTooLarge(Exception):
    """More than the limit was announced or arrived."""


async def read_bounded(stream: aiohttp.StreamReader, limit: int, declared: int | None) -> bytes:
    """The whole body of ``stream``, or BodyTooLarge past ``limit`` bytes."""
    if declared is not None and declared > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.readany():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)
