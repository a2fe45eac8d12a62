"""Property-based checks of the return-URL rule (SPEC §2, §5).

Any string is either accepted unchanged or refused with one of the two
documented errors (422 malformed, 403 not allowed) — never anything else — and
an accepted URL is one whose origin, as a browser reads it, is allowlisted.
The CSV import path, which applies the same rule to profiles'
``default_return_url``, refuses what the rule refuses with a one-line error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.db.pool import Database
from service.importer import ImportFailed, import_csv
from service.return_urls import (
    ReturnUrlMalformed,
    ReturnUrlNotAllowed,
    check_return_url,
    normalise_origin,
)

ALLOW = ("https://app.example.com", "https://billing.example.org:8443", "https://[::1]:8443")

HOSTS = st.sampled_from(
    [
        "app.example.com",
        "APP.example.com",
        "app.example.com.",
        "billing.example.org",
        "evil.com",
        "app.example.com.evil.com",
        "[::1]",
        "[0:0::1]",
        "[::1",
        "::1]",
        "[::1]evil.com",
        "[app.example.com]",
        "[fe80::1%25eth0]",
        "app.example.com@evil.com",
        "evil.com@app.example.com",
        "user:pw@app.example.com",
        "app%2eexample.com",
        "xn--pple-43d.com",
        "",
        "127.0.0.1",
    ]
)
PORTS = st.one_of(
    st.just(""),
    st.integers(min_value=0, max_value=70000).map(lambda p: f":{p}"),
    st.sampled_from([":", ":443", ":8443", ":08443", ":8443x", ":-1", ": 443"]),
)
SCHEMES = st.sampled_from(
    ["https://", "HTTPS://", "http://", "https:", "https:/", "//", "javascript:", "", "ftp://"]
)
TAILS = st.text(alphabet=st.sampled_from(list("/?#@[]:%.\\abc-_~!$&'()*+,;= \t\n")), max_size=12)


@st.composite
def url_shaped(draw: st.DrawFn) -> str:
    return draw(SCHEMES) + draw(HOSTS) + draw(PORTS) + draw(TAILS)


def _verdict(url: str) -> str:
    try:
        assert check_return_url(url, ALLOW, allow_http_localhost=False) == url
    except ReturnUrlMalformed:
        return "malformed"
    except ReturnUrlNotAllowed:
        return "not_allowed"
    return "accepted"


def _browser_origin(url: str) -> str:
    """The origin a browser navigates to, by the standard library's reading."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # a browser serialises an IPv6 literal compressed
        host = f"[{ipaddress.IPv6Address(host).compressed}]"
    return normalise_origin(parts.scheme, host, parts.port)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_any_text_is_accepted_or_refused_as_documented(text: str) -> None:
    assert _verdict(text) in ("accepted", "malformed", "not_allowed")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url_shaped())
@example("https://[::1]evil.com:8443/x")
@example("https://[::1/")
@example("https://app.example.com]/")
def test_an_accepted_url_goes_to_an_allowlisted_origin(url: str) -> None:
    verdict = _verdict(url)
    if verdict != "accepted":
        return
    assert url.isascii()
    assert url.isprintable()
    assert "@" not in urlsplit(url).netloc
    assert "\\" not in url
    assert _browser_origin(url) in ALLOW, url


@pytest.mark.parametrize(
    "url",
    [
        "https://[::1]evil.com:8443/x",
        "https://[::1/",
        "https://[::1]:8443@evil.com/",
        "https://app.example.com]/",
        "https://[app.example.com]/",
        "https://[fe80::1%25eth0]:8443/",
        "https://app.example.com:99999/",
        "https://" + "a" * 2100 + ".com/",
    ],
)
def test_bracket_port_and_length_tricks_are_refused(url: str) -> None:
    assert _verdict(url) in ("malformed", "not_allowed")


def test_allowlisted_ipv6_and_ports_are_accepted() -> None:
    for url in (
        "https://[::1]:8443/account",
        "https://[0:0::1]:8443/",
        "https://billing.example.org:8443/x?y=1#z",
        "https://APP.example.com/",
        "https://app.example.com:443/",
    ):
        assert _verdict(url) == "accepted", url


# --- the import path ----------------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database.connect(database_url, min_size=1, max_size=2)
    try:
        yield database
    finally:
        await database.close()


async def test_import_profiles_refuses_malformed_return_urls_naming_the_line(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    import_settings = Settings.from_env(
        {"DATABASE_URL": database_url, "RETURN_URL_ALLOWLIST": ",".join(ALLOW)}, serving=False
    )
    for url in ("https://[::1/", "https://[::1]evil.com:8443/x", "https://app.example.com]/"):
        path = tmp_path / "profiles.csv"
        path.write_text(
            "name,configuration_id,on_behalf_of,default_return_url,is_default\n"
            f"main,bpc_main1,,{url},true\n"
        )
        with pytest.raises(ImportFailed) as info:
            await import_csv(db, "profiles", path, import_settings)
        message = str(info.value)
        assert "line 2" in message, message
        assert "default_return_url" in message, message
        assert "\n" not in message
