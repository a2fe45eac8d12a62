"""Response helpers both faces of the stand-in share.

JSON bodies (pretty-printed like Stripe's), the ``Request-Id`` of the request
being answered (set per request by the middleware in :mod:`.app`), and the
random tokens ids are made of.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar

from aiohttp import web

__all__ = ["Handler", "current_request_id", "dumps", "json_response", "random_token"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ALNUM = string.ascii_letters + string.digits

# A context variable rather than a request attribute so that code deep in a
# handler (error bodies, recordings) can read it without being passed the request.
current_request_id: ContextVar[str] = ContextVar("stripe_standin_request_id", default="req_unknown")


def random_token(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def dumps(value: object) -> str:
    # Stripe pretty-prints its JSON; clients must not depend on either form.
    return json.dumps(value, indent=2)


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(body).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )
