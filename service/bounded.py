"""One bounded body reader for every body we take in: requests and Stripe's answers.

A body is read chunk by chunk and refused as soon as it is known to exceed its
limit (announced by ``Content-Length`` or counted as it arrives), so a client
or a broken proxy streaming without end never makes us buffer it.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from service.errors import BadRequest, PayloadTooLarge


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


async def read_request_body(request: web.Request, limit: int) -> bytes:
    """A request's body: 413 past ``limit``, 400 when the caller hangs up mid-body."""
    try:
        return await read_bounded(request.content, limit, request.content_length)
    except BodyTooLarge:
        raise PayloadTooLarge(detail=f"The body must be at most {limit} bytes.") from None
    except ConnectionResetError:
        # The caller hung up mid-body: nobody will read the answer, but the
        # request is still decided (and audited) as malformed, not as a crash.
        raise BadRequest("malformed_json", "The request body ended early.") from None
