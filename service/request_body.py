"""A request's body, read once and bounded: the protected routes' JSON and Stripe's webhooks.

Bounded in size and in time: a sender that trickles its body (or announces more
than it sends) would otherwise hold an in-flight slot for as long as it keeps
the socket open (SPEC §5).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from service import keys
from service.bounded import BodyTooLarge, read_bounded
from service.errors import ClientClosedRequest, PayloadTooLarge, RequestTimeout


async def read_request_body(request: web.Request, limit: int) -> bytes:
    """A request's body: 413 past ``limit``, 408 when it has not all arrived within
    BODY_READ_TIMEOUT_SECONDS, 499 when the caller hangs up mid-body."""
    timeout = request.app[keys.SETTINGS].body_read_timeout_seconds
    try:
        if request.content.is_eof():
            # All of it arrived with the head (the usual small JSON body): nothing
            # to wait for, so no timer to arm.
            return await read_bounded(request.content, limit, request.content_length)
        async with asyncio.timeout(timeout):
            return await read_bounded(request.content, limit, request.content_length)
    except BodyTooLarge:
        raise PayloadTooLarge(detail=f"The body must be at most {limit} bytes.") from None
    except TimeoutError:
        # The rest of the body is not worth waiting for: answer, then close.
        raise RequestTimeout(
            detail=f"The request body did not arrive within {timeout:g} seconds.",
            headers={"Connection": "close"},
        ) from None
    except ConnectionResetError:
        # The caller hung up mid-body (aiohttp's ClientConnectionResetError is
        # one too): decided and audited as such, never a crash.
        raise ClientClosedRequest(detail="The caller closed the connection.") from None
