"""A request's body, read once and bounded: the protected routes' JSON and Stripe's webhooks."""

from __future__ import annotations

from aiohttp import web

from service.bounded import BodyTooLarge, read_bounded
from service.errors import BadRequest, PayloadTooLarge


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
