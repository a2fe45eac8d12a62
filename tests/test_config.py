"""Configuration (SPEC §8): one frozen Settings built from the environment,
validated at start; a bad value stops `serve` with one line naming the
variable and exit code 2, never a traceback, never a secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from service.config import ConfigError, Settings
from service.return_urls import ReturnUrlMalformed, ReturnUrlNotAllowed, check_return_url
from tests.conftest import _admin_url, _with_database

REPO = Path(__file__).resolve().parent.parent
KEY = "sk_test_configtests0123456789"
# Recognisable secrets: if one of these shows up in output, it leaked.
SECRET_KEY = "sk_test_LEAKCANARY9f8e7d6c5b4a"
SECRET_HS = "hs-LEAKCANARY-0123456789abcdefghijklmnop"
SECRET_WEBHOOK = "whsec_LEAKCANARYwebhook"
SECRET_DB_PASSWORD = "LEAKCANARYdbpassword"
SERVE_TIMEOUT = 30


def from_env(**env: str) -> Settings:
    return Settings.from_env({"STRIPE_API_KEY": KEY, **env})


def config_error(env: dict[str, str], *, serving: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env, serving=serving)
    return info.value


# --- Settings.from_env ---------------------------------------------------------------


def test_defaults() -> None:
    s = from_env()
    # The defaults SPEC §3 and §8 promise.
    assert s.database_url.reveal() == "postgresql://postgres@127.0.0.1:5432/portal_gateway"
    assert s.stripe_api_base == "https://api.stripe.com"
    assert s.stripe_api_version == "2025-09-30.clover"
    assert s.stripe_timeout_seconds == 5
    assert s.request_deadline_seconds == 10
    assert s.stripe_max_retries == 2
    assert s.breaker_failure_threshold == 5
    assert s.breaker_cooldown_seconds == 30
    assert s.idempotency_ttl_seconds == 300
    # Off unless configured.
    assert s.return_url_allowlist == ()
    assert s.cors_allowed_origins == ()
    assert s.default_return_url is None
    assert s.allow_http_localhost is False
    assert s.stripe_webhook_secrets == ()
    assert s.jwt_enabled is False
    # Where and how it runs.
    assert s.port == 8080
    assert s.log_level == "INFO"
    assert s.log_format == "json"
    assert s.max_in_flight > 0
    assert s.shutdown_timeout > 0


def test_settings_are_frozen() -> None:
    s = from_env()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_serve_needs_a_stripe_key_but_admin_commands_do_not() -> None:
    error = config_error({})
    assert error.variable == "STRIPE_API_KEY"
    assert "STRIPE_API_KEY" in str(error)
    assert Settings.from_env({}, serving=False).stripe_api_key is None


def test_values_are_parsed() -> None:
    s = from_env(
        PORT=" 9000 ",
        HOST="127.0.0.1",
        STRIPE_API_BASE="http://127.0.0.1:12111/",
        STRIPE_TIMEOUT_SECONDS="2.5",
        STRIPE_MAX_RETRIES="0",
        REQUEST_DEADLINE_SECONDS="4",
        IDEMPOTENCY_TTL_SECONDS="60",
        ALLOW_HTTP_LOCALHOST="true",
        LOG_LEVEL="debug",
        LOG_FORMAT="console",
        JWT_ALGORITHMS="RS256, ES256",
        DEFAULT_RETURN_URL="https://app.example.com/account",
    )
    assert s.port == 9000
    assert s.host == "127.0.0.1"
    assert s.stripe_api_base == "http://127.0.0.1:12111"
    assert s.stripe_timeout_seconds == 2.5
    assert s.stripe_max_retries == 0
    assert s.request_deadline_seconds == 4
    assert s.idempotency_ttl_seconds == 60
    assert s.allow_http_localhost is True
    assert s.log_level == "DEBUG"
    assert s.log_format == "console"
    assert s.jwt_algorithms == ("RS256", "ES256")
    assert s.default_return_url == "https://app.example.com/account"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(v, True) for v in ("1", "true", "TRUE", "yes", "on")]
    + [(v, False) for v in ("0", "false", "no", "off")],
)
def test_booleans(raw: str, expected: bool) -> None:
    assert from_env(ALLOW_HTTP_LOCALHOST=raw).allow_http_localhost is expected


BAD_VALUES = [
    ("PORT", "abc"),
    ("PORT", "0"),
    ("PORT", "65536"),
    ("PORT", "80.5"),
    ("STRIPE_TIMEOUT_SECONDS", "-1"),
    ("STRIPE_TIMEOUT_SECONDS", "fast"),
    ("STRIPE_TIMEOUT_SECONDS", "nan"),
    ("STRIPE_TIMEOUT_SECONDS", "inf"),
    ("STRIPE_CONNECT_TIMEOUT_SECONDS", "0"),
    ("STRIPE_MAX_RETRIES", "-1"),
    ("STRIPE_MAX_RETRIES", "many"),
    ("STRIPE_MAX_CONNECTIONS", "0"),
    ("REQUEST_DEADLINE_SECONDS", "0"),
    ("REQUEST_DEADLINE_SECONDS", "ten"),
    ("BREAKER_FAILURE_THRESHOLD", "0"),
    ("BREAKER_FAILURE_THRESHOLD", "x"),
    ("BREAKER_COOLDOWN_SECONDS", "-5"),
    ("END_USER_RATE_LIMIT_PER_MINUTE", "0"),
    ("END_USER_RATE_LIMIT_PER_MINUTE", "1.5"),
    ("IDEMPOTENCY_TTL_SECONDS", "0"),
    ("IDEMPOTENCY_TTL_SECONDS", "5m"),
    ("MAX_IN_FLIGHT", "0"),
    ("MAX_IN_FLIGHT", "lots"),
    ("SHUTDOWN_TIMEOUT", "-1"),
    ("SHUTDOWN_TIMEOUT", "soon"),
    ("DB_POOL_MIN_SIZE", "-1"),
    ("DB_POOL_MAX_SIZE", "0"),
    ("DB_TIMEOUT_SECONDS", "0"),
    ("ALLOW_HTTP_LOCALHOST", "maybe"),
    ("ALLOW_HTTP_LOCALHOST", "2"),
    ("LOG_LEVEL", "verbose"),
    ("LOG_FORMAT", "xml"),
    ("EVENT_LOOP", "trio"),
    ("JWT_ALGORITHMS", "none"),
    ("JWT_ALGORITHMS", "RS256,HS1"),
    ("STRIPE_API_BASE", "api.stripe.com"),
    ("STRIPE_API_BASE", "ftp://api.stripe.com"),
    ("JWT_JWKS_URL", "not a url"),
    ("DEFAULT_RETURN_URL", "/account"),
    ("JWT_PUBLIC_KEY_FILE", "/nonexistent/public.pem"),
    ("DATABASE_URL", "mysql://db/portal"),
    ("DATABASE_URL", "portal_gateway"),
    ("RETURN_URL_ALLOWLIST", "app.example.com"),
    ("CORS_ALLOWED_ORIGINS", "*"),
    ("REDIS_URL", "localhost:6379"),
    ("REDIS_URL", "http://redis:6379"),
    ("REDIS_URL", "redis://"),
    ("REDIS_URL", "redis://redis:port/0"),
    ("REDIS_URL", "redis://redis:6379/cache"),
    ("REDIS_URL", "unix://"),
    ("REDIS_TIMEOUT_SECONDS", "0"),
    ("REDIS_TIMEOUT_SECONDS", "10"),
    ("STRIPE_MAX_REQUESTS_PER_SECOND", "-1"),
    ("STRIPE_MAX_REQUESTS_PER_SECOND", "2.5"),
    ("STRIPE_MAX_REQUESTS_PER_SECOND", "fast"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_a_bad_value_is_refused_naming_its_variable(variable: str, value: str) -> None:
    error = config_error({"STRIPE_API_KEY": KEY, variable: value})
    assert error.variable == variable
    message = str(error)
    assert variable in message
    assert "\n" not in message


def test_any_positive_timeout_pair_is_valid() -> None:
    # SPEC §3: a per-attempt timeout longer than the deadline is cut by the deadline.
    s = Settings.from_env(
        {"STRIPE_API_KEY": KEY, "STRIPE_TIMEOUT_SECONDS": "15", "REQUEST_DEADLINE_SECONDS": "10"}
    )
    assert (s.stripe_timeout_seconds, s.request_deadline_seconds) == (15.0, 10.0)
    # A backoff whose first window exceeds its cap is simply capped.
    s = Settings.from_env(
        {
            "STRIPE_API_KEY": KEY,
            "STRIPE_BACKOFF_INITIAL_SECONDS": "3",
            "STRIPE_BACKOFF_MAX_SECONDS": "1",
        }
    )
    assert (s.stripe_backoff_initial_seconds, s.stripe_backoff_max_seconds) == (3.0, 1.0)


def test_cross_field_rules_name_a_variable() -> None:
    error = config_error({"STRIPE_API_KEY": KEY, "METRICS_PORT": "8080", "PORT": "8080"})
    assert error.variable == "METRICS_PORT"
    error = config_error({"STRIPE_API_KEY": KEY, "DB_POOL_MIN_SIZE": "5", "DB_POOL_MAX_SIZE": "2"})
    assert error.variable == "DB_POOL_MIN_SIZE"
    # End-user tokens need an issuer and an audience to check.
    hs = {"STRIPE_API_KEY": KEY, "JWT_HS256_SECRET": SECRET_HS, "JWT_ALGORITHMS": "HS256"}
    assert config_error(hs).variable == "JWT_ISSUER"
    assert config_error({**hs, "JWT_ISSUER": "https://id.example.com"}).variable == "JWT_AUDIENCE"
    # An HMAC algorithm with only public keys configured would be key confusion.
    error = config_error(
        {
            "STRIPE_API_KEY": KEY,
            "JWT_JWKS_URL": "https://id.example.com/jwks.json",
            "JWT_ISSUER": "https://id.example.com",
            "JWT_AUDIENCE": "portal-gateway",
            "JWT_ALGORITHMS": "RS256,HS256",
        }
    )
    assert error.variable == "JWT_ALGORITHMS"


# --- secrets from files, and never shown -------------------------------------------

JWT_ENV = {
    "JWT_ISSUER": "https://id.example.com",
    "JWT_AUDIENCE": "portal-gateway",
    "JWT_ALGORITHMS": "HS256",
}
FILE_SECRETS: list[tuple[str, str, dict[str, str]]] = [
    ("STRIPE_API_KEY", SECRET_KEY, {}),
    ("JWT_HS256_SECRET", SECRET_HS, JWT_ENV),
    ("STRIPE_WEBHOOK_SECRETS", f"{SECRET_WEBHOOK},whsec_second", {}),
    ("DATABASE_URL", f"postgresql://svc:{SECRET_DB_PASSWORD}@db:5432/portal", {}),
]


def _revealed(s: Settings, variable: str) -> str:
    if variable == "STRIPE_API_KEY":
        assert s.stripe_api_key is not None
        return s.stripe_api_key.reveal()
    if variable == "JWT_HS256_SECRET":
        assert s.jwt_hs256_secret is not None
        return s.jwt_hs256_secret.reveal()
    if variable == "STRIPE_WEBHOOK_SECRETS":
        return ",".join(secret.reveal() for secret in s.stripe_webhook_secrets)
    return s.database_url.reveal()


@pytest.mark.parametrize(("variable", "value", "extra"), FILE_SECRETS)
def test_secret_from_a_file(
    tmp_path: Path, variable: str, value: str, extra: dict[str, str]
) -> None:
    path = tmp_path / "secret"
    path.write_text(value + "\n")  # as `echo` and most secret stores write it
    env = {"STRIPE_API_KEY": KEY, **extra}
    env.pop(variable, None)
    s = Settings.from_env({**env, f"{variable}_FILE": str(path)})
    assert _revealed(s, variable) == value

    # The variable and its file at once is ambiguous: refused, naming it, showing neither.
    error = config_error({**env, variable: value, f"{variable}_FILE": str(path)})
    assert error.variable == variable
    assert value not in str(error)
    assert SECRET_DB_PASSWORD not in str(error)

    missing = config_error({**env, f"{variable}_FILE": str(tmp_path / "missing")})
    assert missing.variable == f"{variable}_FILE"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert config_error({**env, f"{variable}_FILE": str(empty)}).variable == f"{variable}_FILE"


def test_webhook_secrets_are_a_comma_separated_list() -> None:
    s = from_env(STRIPE_WEBHOOK_SECRETS=f" {SECRET_WEBHOOK} , whsec_next ,")
    assert [secret.reveal() for secret in s.stripe_webhook_secrets] == [
        SECRET_WEBHOOK,
        "whsec_next",
    ]


def test_repr_and_str_never_show_a_secret() -> None:
    s = Settings.from_env(
        {
            "STRIPE_API_KEY": SECRET_KEY,
            "JWT_HS256_SECRET": SECRET_HS,
            "STRIPE_WEBHOOK_SECRETS": SECRET_WEBHOOK,
            "DATABASE_URL": f"postgresql://svc:{SECRET_DB_PASSWORD}@db:5432/portal",
            **JWT_ENV,
        }
    )
    shown = repr(s) + str(s) + f"{s}" + repr(dataclasses.astuple(s))
    for secret in (SECRET_KEY, SECRET_HS, SECRET_WEBHOOK, SECRET_DB_PASSWORD):
        assert secret not in shown
    assert "LEAKCANARY" not in shown


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"STRIPE_API_KEY": "pk_live_LEAKCANARYpublishable"}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": "sk_test_LEAKCANARY with space"}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": KEY, "JWT_HS256_SECRET": "LEAKCANARY-short"}, "JWT_HS256_SECRET"),
        ({"STRIPE_API_KEY": KEY, "DATABASE_URL": "mysql://u:LEAKCANARY@db/x"}, "DATABASE_URL"),
        ({"STRIPE_API_KEY": SECRET_KEY, "PORT": "abc"}, "PORT"),
        ({"STRIPE_API_KEY": KEY, "REDIS_URL": "http://:LEAKCANARY@redis/0"}, "REDIS_URL"),
        ({"STRIPE_API_KEY": KEY, "REDIS_URL": "redis://:LEAKCANARY@redis:x/0"}, "REDIS_URL"),
    ],
)
def test_config_errors_never_echo_a_secret(env: dict[str, str], variable: str) -> None:
    error = config_error(env)
    assert error.variable == variable
    assert "LEAKCANARY" not in str(error)


# --- origins -----------------------------------------------------------------------


def test_allowlist_origins_are_normalised() -> None:
    s = from_env(
        RETURN_URL_ALLOWLIST=(
            "HTTPS://App.Example.COM:443/, https://billing.example.org:8443 ,"
            " http://localhost:3000, http://[::1]:8080,,"
        )
    )
    assert s.return_url_allowlist == (
        "https://app.example.com",
        "https://billing.example.org:8443",
        "http://localhost:3000",
        "http://[::1]:8080",
    )
    # ...to exactly the form the return-URL rule compares against.
    for url in (
        "https://app.example.com/account",
        "https://billing.example.org:8443/x",
        "http://localhost:3000/done",
        "http://[::1]:8080/done",
    ):
        check_return_url(url, s.return_url_allowlist, allow_http_localhost=True)


def test_ipv6_loopback_is_one_local_host_for_the_allowlist_and_the_check() -> None:
    # One rule for both: the allowlist entry and the return URL name [::1] alike,
    # whichever way the literal is spelled.
    s = from_env(RETURN_URL_ALLOWLIST="http://[0:0:0:0:0:0:0:1]:8080", ALLOW_HTTP_LOCALHOST="1")
    assert s.return_url_allowlist == ("http://[::1]:8080",)
    for url in ("http://[::1]:8080/done", "http://[0::1]:8080/done"):
        check_return_url(url, s.return_url_allowlist, allow_http_localhost=True)
        with pytest.raises(ReturnUrlNotAllowed):
            check_return_url(url, s.return_url_allowlist, allow_http_localhost=False)
    # Another IPv6 host is not local: plain http to it is refused in the allowlist.
    error = config_error({"STRIPE_API_KEY": KEY, "RETURN_URL_ALLOWLIST": "http://[::2]:8080"})
    assert error.variable == "RETURN_URL_ALLOWLIST"


@pytest.mark.parametrize("url", ["https://[::1/", "https://[fe80::1%25eth0]/", "https://[::1]x/"])
def test_a_broken_ipv6_literal_is_malformed(url: str) -> None:
    with pytest.raises(ReturnUrlMalformed):
        check_return_url(url, ("https://[::1]",), allow_http_localhost=False)


def test_cors_origins_are_normalised() -> None:
    s = from_env(CORS_ALLOWED_ORIGINS="https://App.Example.com, http://intranet.example.com:80")
    assert s.cors_allowed_origins == ("https://app.example.com", "http://intranet.example.com")


@pytest.mark.parametrize(
    "origin",
    [
        "app.example.com",  # no scheme
        "//app.example.com",
        "https://app.example.com/account",  # a URL, not an origin
        "https://app.example.com?x=1",
        "https://app.example.com#top",
        "https://user@app.example.com",
        "https://app.example.com@evil.example",
        "ftp://app.example.com",
        "javascript:alert(1)",
        "https://*.example.com",  # no wildcards: they would never match
        "https://äpp.example.com",  # browsers send the punycode form
        "https://app.example.com:99999",
        "https://",
    ],
)
@pytest.mark.parametrize("variable", ["RETURN_URL_ALLOWLIST", "CORS_ALLOWED_ORIGINS"])
def test_bad_origins_are_refused(variable: str, origin: str) -> None:
    error = config_error({"STRIPE_API_KEY": KEY, variable: f"https://ok.example.com,{origin}"})
    assert error.variable == variable


def test_plain_http_return_origin_only_for_localhost() -> None:
    # Return URLs must be https except on localhost, so such an entry could never match.
    error = config_error({"STRIPE_API_KEY": KEY, "RETURN_URL_ALLOWLIST": "http://app.example.com"})
    assert error.variable == "RETURN_URL_ALLOWLIST"


# --- the test/live guard's input ---------------------------------------------------


@pytest.mark.parametrize(
    ("key", "livemode"),
    [
        ("sk_test_abc123", False),
        ("rk_test_abc123", False),
        ("sk_live_abc123", True),
        ("rk_live_abc123", True),
    ],
)
def test_livemode_follows_the_key(key: str, livemode: bool) -> None:
    assert Settings.from_env({"STRIPE_API_KEY": key}).livemode is livemode


def test_no_key_is_not_live() -> None:
    assert Settings.from_env({}, serving=False).livemode is False


# --- `serve` as a process ----------------------------------------------------------


async def serve(env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m service serve`` with exactly this environment (plus PATH)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SERVE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"serve did not exit within {SERVE_TIMEOUT}s with {env}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def assert_refused(result: tuple[int, str, str], variable: str) -> str:
    returncode, stdout, stderr = result
    assert returncode == 2, result
    assert "Traceback" not in stderr + stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr  # exactly one line
    assert variable in lines[0], lines[0]
    assert "LEAKCANARY" not in stderr + stdout
    return lines[0]


async def test_serve_refuses_bad_configuration_with_one_line_and_exit_2() -> None:
    missing_db = _with_database(_admin_url(), f"pgw_missing_{uuid.uuid4().hex[:12]}")
    cases = [
        ({"STRIPE_API_KEY": SECRET_KEY, "PORT": "abc"}, "PORT"),
        ({}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": SECRET_KEY, "STRIPE_TIMEOUT_SECONDS": "-1"}, "STRIPE_TIMEOUT_SECONDS"),
        ({"STRIPE_API_KEY_FILE": "/nonexistent/stripe-key"}, "STRIPE_API_KEY_FILE"),
        # Well-formed, but the server has no such database: still a configuration error.
        (
            {"STRIPE_API_KEY": SECRET_KEY, "DATABASE_URL": missing_db, "PORT": str(free_port())},
            "DATABASE_URL",
        ),
    ]
    results = await asyncio.gather(*(serve(env) for env, _ in cases))
    for (_, variable), result in zip(cases, results, strict=True):
        assert_refused(result, variable)


async def test_serve_refuses_a_live_database_with_a_test_key(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("INSERT INTO deployment (livemode) VALUES (true)")
    result = await serve(
        {"DATABASE_URL": database_url, "STRIPE_API_KEY": SECRET_KEY, "PORT": str(free_port())}
    )
    line = assert_refused(result, "STRIPE_API_KEY")
    assert "live" in line
    # The record of what the database maps is not rewritten by the refused start.
    assert await conn.fetchval("SELECT livemode FROM deployment") is True


# --- SPEC §14: Redis and the upstream budget ------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:LEAKCANARY@redis:6379/3",
        "rediss://user:LEAKCANARY@redis.internal:6380",
        "unix:///run/redis/redis.sock?db=2",
    ],
)
def test_redis_url_is_a_secret_of_three_schemes(url: str) -> None:
    settings = from_env(REDIS_URL=url)
    assert settings.redis_url is not None
    assert settings.redis_url.reveal() == url
    assert "LEAKCANARY" not in repr(settings)


def test_redis_is_optional_with_a_short_timeout() -> None:
    settings = from_env()
    assert settings.redis_url is None
    assert 0 < settings.redis_timeout_seconds <= 0.25


@pytest.mark.parametrize(
    ("env", "budget"),
    [
        # Stripe's own API: a fifth under its documented limits (100 live, 25 test).
        ({}, 20),
        ({"STRIPE_API_KEY": "sk_live_abc123"}, 80),
        ({"STRIPE_API_KEY": "rk_live_abc123"}, 80),
        ({"STRIPE_API_BASE": "https://api.stripe.com/"}, 20),
        # A stand-in or stripe-mock has no such limit, and the benchmark must not be throttled.
        ({"STRIPE_API_BASE": "http://127.0.0.1:12111"}, 0),
        ({"STRIPE_API_BASE": "http://api.stripe.com"}, 0),
        ({"STRIPE_API_BASE": "https://stripe-mock.internal"}, 0),
        # Set, it wins either way; 0 is off.
        ({"STRIPE_MAX_REQUESTS_PER_SECOND": "0"}, 0),
        ({"STRIPE_MAX_REQUESTS_PER_SECOND": "5"}, 5),
        ({"STRIPE_API_BASE": "http://127.0.0.1:12111", "STRIPE_MAX_REQUESTS_PER_SECOND": "7"}, 7),
    ],
)
def test_the_upstream_budget_defaults_by_key_mode_on_stripes_api(
    env: dict[str, str], budget: int
) -> None:
    assert Settings.from_env({"STRIPE_API_KEY": KEY, **env}).upstream_budget_per_second == budget
