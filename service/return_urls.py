"""The return-URL rule: where may Stripe send the customer back to?

A portal return URL is an open-redirect target, so it is checked strictly:
printable ASCII only (browsers silently strip tabs/newlines and turn ``\\`` into
``/``, so such URLs mean something else to a browser than to us), absolute
``https`` with an authority, no userinfo, a plain DNS name or IP literal for
host, and an origin that is in ``RETURN_URL_ALLOWLIST`` after normalisation.

The origin lists of the settings (``RETURN_URL_ALLOWLIST``,
``CORS_ALLOWED_ORIGINS``) are parsed here too, by the same host rule, so that
an allowlist entry is in exactly the form a return URL is compared in. This
module imports nothing of the service: the settings import it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Collection
from urllib.parse import SplitResult, urlsplit

MAX_URL_LENGTH = 2048
# RFC 3986 characters; no space, backslash, quote, angle bracket or control.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# In the form _host() gives them (IPv6 literals bracketed and compressed), the
# hosts to which plain http may go: nothing on the wire leaves the machine.
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
    parts = _split(url)
    if not parts.netloc:
        raise ReturnUrlMalformed("must have a host")
    if "@" in parts.netloc:
        raise ReturnUrlNotAllowed("must not contain user information")
    scheme = parts.scheme.lower()
    host = _host(parts.netloc)
    port = _port(parts)
    if scheme == "http" and not (allow_http_localhost and host in _LOCAL_HOSTS):
        raise ReturnUrlNotAllowed("only https URLs are allowed")
    if normalise_origin(scheme, host, port) not in allowlist:
        raise ReturnUrlNotAllowed("its origin is not in the allowlist")
    return url


def normalise_origin(scheme: str, host: str, port: int | None) -> str:
    """``scheme://host[:port]`` lower-cased, with the scheme's default port dropped."""
    scheme = scheme.lower()
    host = host.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    if port is None or port == default:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_origins(raw: str) -> tuple[str, ...]:
    """Comma-separated origins, normalised; ValueError naming the first bad one."""
    return tuple(normalise_origin(*_origin(item)) for item in _items(raw))


def parse_return_url_allowlist(raw: str) -> tuple[str, ...]:
    """Origins as :func:`parse_origins`, refusing plain http except for local hosts."""
    origins = []
    for item in _items(raw):
        scheme, host, port = _origin(item)
        origin = normalise_origin(scheme, host, port)
        if scheme == "http" and host not in _LOCAL_HOSTS:
            # check_return_url would refuse every URL of this origin, so refuse
            # the entry rather than ignore it silently.
            raise ValueError(f"plain http is only allowed for localhost, got {origin!r}")
        origins.append(origin)
    return tuple(origins)


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _origin(item: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of an origin such as ``https://app.example.com``."""
    with contextlib.suppress(ValueError):
        parts = _split(item)
        scheme = parts.scheme.lower()
        if (
            scheme in ("http", "https")
            and parts.netloc
            and "@" not in parts.netloc
            and parts.path in ("", "/")
            and not parts.query
            and not parts.fragment
        ):
            return scheme, _host(parts.netloc), _port(parts)
    raise ValueError(f"must be comma-separated origins like https://app.example.com, got {item!r}")


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError:  # an unbalanced "[" in the authority
        raise ReturnUrlMalformed("has an invalid host") from None


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        raise ReturnUrlMalformed("has an invalid port") from None


def _host(netloc: str) -> str:
    """The host of ``host[:port]``, lower-cased; an IPv6 literal bracketed and compressed."""
    hostport = netloc.lower()
    if "%" in hostport:  # percent-encoding, or an IPv6 zone browsers do not accept
        raise ReturnUrlMalformed("has a percent-encoded host")
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or hostport[end + 1 :][:1] not in ("", ":"):
            raise ReturnUrlMalformed("has an invalid host")
        try:
            # Compressed, as a browser serialises it: [0:0::1] is the origin of [::1].
            return f"[{ipaddress.IPv6Address(hostport[1:end]).compressed}]"
        except ValueError:
            raise ReturnUrlMalformed("has an invalid host") from None
    host = hostport.rpartition(":")[0] if ":" in hostport else hostport
    # A trailing dot is another origin to a browser; it must match the allowlist as is.
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not host or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ReturnUrlMalformed("has an invalid host")
    return host
