"""The return-URL rule of ``service/return_urls.py``, unit by unit, with no database.

Each refusal is checked for its class (422 malformed or 403 not allowed) *and*
its reason, since the reason is what the caller reads in ``detail``; each
boundary (the length cap, the default ports, a trailing dot, the IPv6 brackets)
is probed on both sides. ``make mutation`` runs these against hand-made bugs.
"""

from __future__ import annotations

import pytest

from service.return_urls import (
    MAX_URL_LENGTH,
    ReturnUrlMalformed,
    ReturnUrlNotAllowed,
    check_return_url,
    normalise_origin,
    parse_origins,
    parse_return_url_allowlist,
)
from tests.test_security_matrix import ALLOW, LEGIT, OPEN_REDIRECTS

IPV6_ALLOW = (*ALLOW, "https://[::1]:8443", "https://[2001:db8::1]")
MALFORMED = ReturnUrlMalformed
NOT_ALLOWED = ReturnUrlNotAllowed


def refusal(
    url: str, allowlist: tuple[str, ...] = IPV6_ALLOW, *, http_localhost: bool = False
) -> tuple[type[ValueError], str]:
    """The error class and reason with which ``url`` is refused."""
    with pytest.raises((ReturnUrlMalformed, ReturnUrlNotAllowed)) as info:
        check_return_url(url, allowlist, allow_http_localhost=http_localhost)
    return type(info.value), str(info.value)


def accepted(
    url: str, allowlist: tuple[str, ...] = IPV6_ALLOW, *, http_localhost: bool = False
) -> bool:
    return check_return_url(url, allowlist, allow_http_localhost=http_localhost) == url


# --- the attack matrix of §5, without the service around it -----------------------


@pytest.mark.parametrize("url", OPEN_REDIRECTS)
def test_the_attack_matrix_is_refused(url: str) -> None:
    refusal(url, ALLOW)


@pytest.mark.parametrize("url", LEGIT)
def test_the_legit_urls_are_accepted(url: str) -> None:
    assert accepted(url, ALLOW)


# --- each refusal says why ---------------------------------------------------------

REFUSALS = [
    # Characters a browser reads differently from us.
    ("https://app.example.com/a b", MALFORMED, "contains characters that are not allowed in a URL"),
    (
        "https://app.example.com\\@evil.com/",
        MALFORMED,
        "contains characters that are not allowed in a URL",
    ),
    (
        "https://app.example.com/\u00e9",
        MALFORMED,
        "contains characters that are not allowed in a URL",
    ),
    ("", MALFORMED, "contains characters that are not allowed in a URL"),
    # Not absolute https.
    ("/account", MALFORMED, "must be an absolute https URL"),
    ("javascript:alert(1)", MALFORMED, "must be an absolute https URL"),
    ("https:/evil.example.net/", MALFORMED, "must be an absolute https URL"),
    ("ftp://app.example.com/", NOT_ALLOWED, "only https URLs are allowed"),
    ("//evil.example.net/", NOT_ALLOWED, "only https URLs are allowed"),
    ("http://app.example.com/", NOT_ALLOWED, "only https URLs are allowed"),
    ("https:///app.example.com", MALFORMED, "must have a host"),
    ("https://", MALFORMED, "must have a host"),
    # Someone else's host behind ours.
    ("https://app.example.com@evil.com/", NOT_ALLOWED, "must not contain user information"),
    ("https://user:pass@app.example.com/", NOT_ALLOWED, "must not contain user information"),
    ("https://[::1]:8443@evil.com/", NOT_ALLOWED, "must not contain user information"),
    # Host syntax.
    ("https://app%2eexample%2ecom/", MALFORMED, "has a percent-encoded host"),
    ("https://APP%2eexample.com/", MALFORMED, "has a percent-encoded host"),
    ("https://[fe80::1%25eth0]/", MALFORMED, "has a percent-encoded host"),
    ("https://-app.example.com/", MALFORMED, "has an invalid host"),
    ("https://app-.example.com/", MALFORMED, "has an invalid host"),
    ("https://app.example-/", MALFORMED, "has an invalid host"),
    ("https://app..example.com/", MALFORMED, "has an invalid host"),
    ("https://bad-.example.com./", MALFORMED, "has an invalid host"),
    ("https://a./", NOT_ALLOWED, "its origin is not in the allowlist"),
    ("https://./", MALFORMED, "has an invalid host"),
    ("https://:443/", MALFORMED, "has an invalid host"),
    ("https://" + "a" * 64 + ".example.com/", MALFORMED, "has an invalid host"),
    ("https://app_x.example.com/", MALFORMED, "has an invalid host"),
    ("https://app.example.com:1:2/", MALFORMED, "has an invalid host"),
    ("https://app.example.com:8443x/", MALFORMED, "has an invalid port"),
    ("https://app.example.com:99999/", MALFORMED, "has an invalid port"),
    # IPv6 literals: brackets that close, then only a port.
    ("https://[::1/", MALFORMED, "has an invalid host"),
    ("https://[::1]x/", MALFORMED, "has an invalid host"),
    ("https://[::1]]/", MALFORMED, "has an invalid host"),
    ("https://[::1]evil.com:8443/x", MALFORMED, "has an invalid host"),
    ("https://[app.example.com]/", MALFORMED, "has an invalid host"),
    ("https://[::g]/", MALFORMED, "has an invalid host"),
    ("https://[]/", MALFORMED, "has an invalid host"),
    # An IPvFuture literal passes urlsplit; it is no IPv6 address.
    ("https://[v1.fe]/", MALFORMED, "has an invalid host"),
    ("https://[::1]:8443]/", MALFORMED, "has an invalid port"),
    # Well-formed, but another origin.
    ("https://evil.example.net/", NOT_ALLOWED, "its origin is not in the allowlist"),
    ("https://app.example.com./", NOT_ALLOWED, "its origin is not in the allowlist"),
    ("https://app.example.com:8443/", NOT_ALLOWED, "its origin is not in the allowlist"),
    ("https://billing.example.org/", NOT_ALLOWED, "its origin is not in the allowlist"),
    ("https://[::1]/", NOT_ALLOWED, "its origin is not in the allowlist"),
    ("https://[::2]:8443/", NOT_ALLOWED, "its origin is not in the allowlist"),
    ("https://443/", NOT_ALLOWED, "its origin is not in the allowlist"),
]


@pytest.mark.parametrize(("url", "error", "reason"), REFUSALS)
def test_each_refusal_names_its_reason(url: str, error: type[ValueError], reason: str) -> None:
    assert refusal(url) == (error, reason)


# --- boundaries --------------------------------------------------------------------


def test_the_length_cap_is_exactly_max_url_length() -> None:
    base = "https://app.example.com/"
    longest = base + "a" * (MAX_URL_LENGTH - len(base))
    assert len(longest) == MAX_URL_LENGTH == 2048
    assert accepted(longest)
    # One more character, and a URL that is otherwise perfectly allowed is refused.
    assert refusal(longest + "a") == (MALFORMED, "must be at most 2048 characters")
    # The cap comes first: a long URL is not even parsed.
    assert refusal("https://evil.example.net/" + "a" * MAX_URL_LENGTH) == (
        MALFORMED,
        "must be at most 2048 characters",
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM/",
        "hTtPs://app.example.com/",
        "https://app.example.com:443/account",
        "https://billing.example.org:8443/x",
        "https://[::1]:8443/",
        "https://[::1]:8443",
        "https://[0:0::1]:8443/",
        "https://[::0:1]:8443/account",
        "https://[2001:DB8::1]/",
        "https://[2001:db8:0:0::1]:443/",
        "https://app-1.example.com/",
    ],
)
def test_allowlisted_origins_in_every_spelling_are_accepted(url: str) -> None:
    allow = (*IPV6_ALLOW, "https://app-1.example.com")
    assert accepted(url, allow)


def test_a_trailing_dot_is_its_own_origin() -> None:
    assert accepted("https://app.example.com./", ("https://app.example.com.",))
    assert accepted("https://a.b./x", ("https://a.b.",))
    assert refusal("https://app.example.com/", ("https://app.example.com.",)) == (
        NOT_ALLOWED,
        "its origin is not in the allowlist",
    )


def test_plain_http_only_to_a_local_host_and_only_when_enabled() -> None:
    local = ("http://localhost:3000", "http://127.0.0.1:3000", "http://[::1]:3000")
    for url in ("http://localhost:3000/x", "http://127.0.0.1:3000/x", "http://[::1]:3000/x"):
        assert accepted(url, local, http_localhost=True)
        assert refusal(url, local) == (NOT_ALLOWED, "only https URLs are allowed")
    # Enabled, but the host is not local: refused even when allowlisted.
    assert refusal("http://evil.com/", ("http://evil.com",), http_localhost=True) == (
        NOT_ALLOWED,
        "only https URLs are allowed",
    )
    assert refusal("HTTP://EVIL.COM/", ("http://evil.com",), http_localhost=True) == (
        NOT_ALLOWED,
        "only https URLs are allowed",
    )
    # Local and enabled, but still only allowlisted origins.
    assert refusal("http://localhost:4000/", local, http_localhost=True) == (
        NOT_ALLOWED,
        "its origin is not in the allowlist",
    )
    # https to a local host needs no switch.
    assert accepted("https://localhost:3000/", ("https://localhost:3000",))


# --- origins, as the settings parse them ----------------------------------------


@pytest.mark.parametrize(
    ("scheme", "host", "port", "origin"),
    [
        ("https", "app.example.com", None, "https://app.example.com"),
        ("HTTPS", "App.Example.COM", 443, "https://app.example.com"),
        ("https", "app.example.com", 444, "https://app.example.com:444"),
        ("https", "app.example.com", 80, "https://app.example.com:80"),
        ("http", "localhost", 80, "http://localhost"),
        ("Http", "localhost", 81, "http://localhost:81"),
        ("http", "localhost", 443, "http://localhost:443"),
        ("http", "[::1]", 8080, "http://[::1]:8080"),
        ("ftp", "files.example.com", 21, "ftp://files.example.com:21"),
    ],
)
def test_normalise_origin(scheme: str, host: str, port: int | None, origin: str) -> None:
    assert normalise_origin(scheme, host, port) == origin


def test_parse_origins_normalises_and_skips_empty_items() -> None:
    raw = " HTTPS://App.Example.COM:443/ , ,http://[0:0::1]:8080,https://b.example.org:8443,"
    expected = ("https://app.example.com", "http://[::1]:8080", "https://b.example.org:8443")
    assert parse_origins(raw) == expected
    assert parse_origins("") == ()
    assert parse_origins(" , ") == ()
    # Plain http to any host is a valid CORS origin.
    assert parse_origins("http://intranet.example.com") == ("http://intranet.example.com",)


@pytest.mark.parametrize(
    "item",
    [
        "app.example.com",
        "//app.example.com",
        "ftp://app.example.com",
        "https://",
        "https://user@app.example.com",
        "https://app.example.com/account",
        "https://app.example.com/?x=1",
        "https://app.example.com?x=1",
        # The port would hide where the host really is: after the "@".
        "https://app.example.com:443@evil.example.net",
        "https://app.example.com#top",
        "https://app.example.com/#top",
        "https://[::1",
        "https://app.example.com:99999",
        "https://app%2eexample.com",
    ],
)
def test_parse_origins_refuses_anything_but_an_origin(item: str) -> None:
    with pytest.raises(ValueError, match=r"^must be comma-separated origins") as info:
        parse_origins(f"https://ok.example.com,{item}")
    assert str(info.value) == (
        f"must be comma-separated origins like https://app.example.com, got {item!r}"
    )


def test_the_allowlist_takes_plain_http_only_for_local_hosts() -> None:
    raw = "https://App.Example.com, http://localhost:3000, http://127.0.0.1, http://[0::1]:8080"
    assert parse_return_url_allowlist(raw) == (
        "https://app.example.com",
        "http://localhost:3000",
        "http://127.0.0.1",
        "http://[::1]:8080",
    )
    assert parse_return_url_allowlist(" ,") == ()
    for origin, shown in (
        ("http://app.example.com", "http://app.example.com"),
        ("HTTP://App.Example.com:8080/", "http://app.example.com:8080"),
        ("http://[::2]", "http://[::2]"),
    ):
        with pytest.raises(ValueError, match=r"^plain http") as info:
            parse_return_url_allowlist(f"https://ok.example.com,{origin}")
        assert str(info.value) == f"plain http is only allowed for localhost, got {shown!r}"
    with pytest.raises(ValueError, match=r"^must be comma-separated origins"):
        parse_return_url_allowlist("https://ok.example.com/x")
