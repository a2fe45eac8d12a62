"""``GET /p/session/{id}``: the page a portal session's ``url`` opens.

Stripe's real portal lives on billing.stripe.com, which tests and ``make run``
cannot reach. With ``session_url_base`` set to the stand-in's own URL, a session
URL is this page instead: a browser that follows a redirect to the portal (a
portal link, SPEC §13) lands somewhere it can load and a test can recognise.
Only sessions this stand-in created have a page; any other id is a 404.
"""

from __future__ import annotations

import html
from typing import Final

from aiohttp import web

from .state import STATE

__all__ = ["PAGE_HEADERS", "session_page"]

# Self-contained (no script, style or image), so nothing may be loaded at all;
# and, like Stripe's session URLs, never cached.
PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'",
    "X-Content-Type-Options": "nosniff",
}

_NOT_FOUND: Final = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Stand-in customer portal</title></head>
<body><h1 id="not-found">No such portal session</h1></body>
</html>
"""


def _page(customer: str, return_url: str | None) -> str:
    back = (
        f'<p><a id="return" href="{html.escape(return_url)}">Return to the site</a></p>\n'
        if return_url
        else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Stand-in customer portal</title></head>
<body>
<h1 id="portal">Customer portal</h1>
<p>Customer: <code id="customer">{html.escape(customer)}</code></p>
{back}</body>
</html>
"""


async def session_page(request: web.Request) -> web.Response:
    page = request.app[STATE].portal_sessions.get(request.match_info["id"])
    if page is None:
        return web.Response(
            text=_NOT_FOUND, status=404, content_type="text/html", headers=PAGE_HEADERS
        )
    return web.Response(
        text=_page(page.customer, page.return_url),
        content_type="text/html",
        headers=PAGE_HEADERS,
    )
