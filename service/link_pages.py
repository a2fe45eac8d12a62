"""The HTML a person sees when they open a portal link (SPEC §13).

Self-contained pages: no external asset, one inline style and (on the page
that opens the portal) one inline script, each allowed by its SHA-256 in a
strict ``Content-Security-Policy`` and nothing else. The script only submits
the page's form, so a link scanner or chat preview that fetches the URL
(without running scripts or submitting forms) never spends the link; with
scripts off, the form's button does the same.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from urllib.parse import urlsplit

from aiohttp import web

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;"
    "color:#1a1a1a}button{font:inherit;padding:.6rem 1.2rem;cursor:pointer}"
)
# Submitting once at load; the button is there when scripts are off.
_SCRIPT = "document.getElementById('open-form').submit();"


def _source_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


# No form-action: Chromium applies it to the redirect that follows the form's
# POST (to Stripe's portal origin), and the form's target is fixed here anyway.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_source_hash(_SCRIPT)}; "
    f"style-src {_source_hash(_STYLE)}; base-uri 'none'; frame-ancestors 'none'"
)

# Every page: never cached (a link is a credential), never framed, never sniffed,
# and the link's URL never sent on as a Referer (to Stripe or anyone).
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="robots" content="noindex,nofollow">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


# The form posts to the page's own URL (an empty action), whatever prefix or
# host PUBLIC_BASE_URL gives it.
_OPEN_PAGE = _page(
    "Opening your billing portal",
    "<h1>Opening your billing portal…</h1>"
    '<form id="open-form" method="post" action="">'
    '<button id="open" type="submit">Continue to the billing portal</button></form>'
    f"<script>{_SCRIPT}</script>",
).encode()


def open_page() -> web.Response:
    """The page that POSTs itself to open the portal."""
    return web.Response(
        status=200,
        body=_OPEN_PAGE,
        content_type="text/html",
        charset="utf-8",
        headers=PAGE_HEADERS,
    )


def message_page(
    status: int, title: str, text: str, *, back_url: str | None, headers: dict[str, str]
) -> web.Response:
    """A page saying why the portal did not open, with a way back when we know one."""
    back = ""
    if back_url is not None and urlsplit(back_url).scheme in ("http", "https"):
        back = f'<p><a id="back" href="{escape(back_url)}">Go back</a></p>'
    html = _page(title, f"<h1>{escape(title)}</h1><p>{escape(text)}</p>{back}")
    return web.Response(
        status=status,
        body=html.encode(),
        content_type="text/html",
        charset="utf-8",
        headers={**headers, **PAGE_HEADERS},
    )
