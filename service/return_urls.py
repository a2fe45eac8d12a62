"""The return-URL rule: where may Stripe send the customer back to?

A portal return URL is an open-redirect target, so it is checked strictly:
printable ASCII only (browsers silently strip tabs/newlines and turn ``\\`` into
``/``, so such URLs mean something else to a browser than to us), absolute
``https`` with an authority, no userinfo, a plain DNS name or IP literal for
host, and an origin that is in ``RETURN_URL_ALLOWLIST`` after normalisation.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from urllib.parse import urlsplit

from service.config import normalise_origin

MAX_URL_LENGTH = 2048
# RFC 3986 characters; no space, backslash, quote, angle bracket or control.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


class ReturnUrlMalformed(ValueError):
    """Not an absolute http(s) URL we can reason about (a 422)."""


class ReturnUrlNotAllowed(ValueError):
    """Well-formed, but its origin may not receive customers (a 403)."""


def check_return_url(url: str, allowlist: Collection[str], *, allow_http_localhost: bool) -> str:
    """Return ``url`` unchanged if it may be used; raise one of the two errors above."""
    if len(url) > MAX_URL_LENGTH:
        raise ReturnUrlMalformed(f"must be at most {MAX_URL_LENGTH} characters")
    if not _URL_CHARS.fullmatch(url):
        raise ReturnUrlMalformed("contains characters that are not allowed in a URL")
    if not url[:8].lower().startswith(("https://", "http://")):
        if "://" in url or url.startswith("//"):
            raise ReturnUrlNotAllowed("only https URLs are allowed")
        raise ReturnUrlMalformed("must be an absolute https URL")
    parts = urlsplit(url)
    netloc = parts.netloc
    if not netloc:
        raise ReturnUrlMalformed("must have a host")
    if "@" in netloc:
        raise ReturnUrlNotAllowed("must not contain user information")
    host = _host(netloc)
    try:
        port = parts.port
    except ValueError:
        raise ReturnUrlMalformed("has an invalid port") from None
    scheme = parts.scheme.lower()
    if scheme == "http" and not (allow_http_localhost and host in _LOCAL_HOSTS):
        raise ReturnUrlNotAllowed("only https URLs are allowed")
    if normalise_origin(scheme, host, port) not in allowlist:
        raise ReturnUrlNotAllowed("its origin is not in the allowlist")
    return url


def _host(netloc: str) -> str:
    hostport = netloc.lower()
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ReturnUrlMalformed("has an invalid host")
        literal = hostport[1:end]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ReturnUrlMalformed("has an invalid host") from None
        return hostport[: end + 1]
    host = hostport.rpartition(":")[0] if ":" in hostport else hostport
    if "%" in host:
        raise ReturnUrlMalformed("has a percent-encoded host")
    # A trailing dot is another origin to a browser; it must match the allowlist as is.
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not host or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ReturnUrlMalformed("has an invalid host")
    return host
