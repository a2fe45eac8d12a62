"""Settings: one frozen, typed object built once from the environment.

Nothing else in the service reads ``os.environ``. Each setting is declared once,
as a field of :class:`Settings` made by :func:`setting`: its variable, parser,
default and one line of documentation. :meth:`Settings.from_env` and the
README's table (:func:`configuration_table`) both follow from those
declarations. Every secret can come from ``NAME`` or from a file named by
``NAME_FILE``; secrets are wrapped in :class:`Secret` so that ``repr()`` of the
settings never shows them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from service.return_urls import parse_origins, parse_return_url_allowlist

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/portal_gateway"
DEFAULT_STRIPE_API_VERSION = "2025-09-30.clover"
ALLOWED_JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384"}
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# SPEC §14: the upstream budget's defaults on Stripe's own API.
STRIPE_API_HOST = "api.stripe.com"
DEFAULT_LIVE_BUDGET = 80
DEFAULT_TEST_BUDGET = 20

T = TypeVar("T")
N = TypeVar("N", int, float)


class ConfigError(Exception):
    """A bad or missing environment variable; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"configuration error: {variable}: {problem}")
        self.variable = variable


class Secret:
    """A secret string that does not show itself in repr(), str() or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; call only where it is sent, never where it is logged."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# --- declaring a setting -----------------------------------------------------------

_DECLARATION = "portal_gateway.setting"  # the key of a declaration in a field's metadata


@dataclass(frozen=True, slots=True)
class _Declaration:
    variable: str
    parse: Callable[[str], object]
    default: object
    doc: str
    secret: bool
    required_to_serve: bool


def setting(
    variable: str,
    parse: Callable[[str], T],
    default: T,
    doc: str,
    *,
    secret: bool = False,
    required_to_serve: bool = False,
) -> T:
    """A field of :class:`Settings`, read from ``variable`` by ``parse``.

    ``parse`` gets the stripped, non-empty value and raises ValueError with a
    message such as "must be …"; an unset or empty variable leaves ``default``.
    A ``secret`` may also come from the file named by ``{variable}_FILE``, and
    its parser must never repeat the value.
    """
    declaration = _Declaration(variable, parse, default, doc, secret, required_to_serve)
    return dataclasses.field(default=default, metadata={_DECLARATION: declaration})


def _read(env: Mapping[str, str], variable: str, *, secret: bool) -> str | None:
    """The stripped value of ``variable``, or of the file ``variable_FILE`` names; None if unset."""
    direct = env.get(variable, "").strip()
    file_variable = f"{variable}_FILE"
    file_name = env.get(file_variable, "").strip() if secret else ""
    if direct and file_name:
        raise ConfigError(variable, f"set either {variable} or {file_variable}, not both")
    if not file_name:
        return direct or None
    try:
        value = Path(file_name).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(file_variable, f"cannot read file ({exc.strerror})") from None
    if not value:
        raise ConfigError(file_variable, "file is empty")
    return value


# --- parsers: str -> value, ValueError("must be …") when the value is bad ---------


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be a boolean (1/0/true/false), got {raw!r}")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    return _number_in(int, "an integer", low, high)


def _float_in(low: float, high: float) -> Callable[[str], float]:
    return _number_in(float, "a number", low, high)


def _number_in(kind: type[N], what: str, low: N, high: N) -> Callable[[str], N]:
    def parse(raw: str) -> N:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"must be {what}, got {raw!r}") from None
        if not math.isfinite(value) or not low <= value <= high:  # float() takes "nan" and "inf"
            raise ValueError(f"must be between {low} and {high}, got {raw}")
        return value

    return parse


def _one_of(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _http_base_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _absolute_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    return raw


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _public_base_url(raw: str) -> str:
    # The links we hand out start with it: an https origin (plain http only on a
    # loopback host, for development), an optional path prefix, nothing else.
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"must be an absolute https URL, got {raw!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an absolute https URL, got {raw!r}")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise ValueError("must use https (plain http only for localhost, 127.0.0.1 or [::1])")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise ValueError("must not have a query or a fragment")
    return raw.rstrip("/")


def _readable_path(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise ValueError(f"file not found: {raw}")
    return path


def _jwt_algorithms(raw: str) -> tuple[str, ...]:
    algorithms = _csv(raw)
    for alg in algorithms:
        if alg not in ALLOWED_JWT_ALGORITHMS:
            raise ValueError(f"unsupported algorithm {alg!r}")
    return algorithms


# The secret parsers below never put the value into their messages.


def _database_url(raw: str) -> Secret:
    # asyncpg takes only URLs; anything else would fail later, as a connection
    # error (exit 1) instead of a configuration error. The value may hold a
    # password, so the message never repeats it.
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in ("postgres", "postgresql") or not rest:
        raise ValueError("must be a postgresql://user@host:port/database URL")
    return Secret(raw)


def _stripe_key(raw: str) -> Secret:
    if not re.fullmatch(r"(sk|rk)_(test|live)_[A-Za-z0-9_]+", raw):
        raise ValueError("must be a Stripe secret or restricted key (sk_… or rk_…)")
    return Secret(raw)


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(raw: str) -> Secret:
    # redis-py would take a bad URL only at the first call, and fall back quietly
    # forever; said here, it is a configuration error. It may hold a password:
    # the messages never repeat it.
    try:
        parts = urlsplit(raw)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError("must be a redis://host:port/db URL") from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise ValueError("must start with redis://, rediss:// or unix://")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("must name the socket: unix:///path/to/redis.sock")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("must name a host: redis://host:port/db")
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ValueError("must name a database by number: redis://host:port/0")
    return Secret(raw)


def _hs256_secret(raw: str) -> Secret:
    if len(raw) < 32:
        raise ValueError("must be at least 32 characters")
    return Secret(raw)


def _secrets(raw: str) -> tuple[Secret, ...]:
    return tuple(Secret(part) for part in _csv(raw))


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _csv(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            problem = f"must be comma-separated CIDRs (10.0.0.0/8, ::1/128), got {item!r}"
            raise ValueError(problem) from None
    return tuple(networks)


_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_$]{0,62}")


def _role_name(raw: str) -> str:
    # Identifiers can't be bind parameters in GRANT: only plain names are accepted.
    if not _ROLE_NAME.fullmatch(raw):
        raise ValueError(f"must be a plain lower-case Postgres role name, got {raw!r}")
    return raw


def _metadata_key(raw: str) -> str:
    # Stripe's metadata keys are at most 40 characters and may not contain brackets.
    if len(raw) > 40 or not raw.isascii() or not raw.isprintable() or any(c in raw for c in "[]"):
        raise ValueError("must be a Stripe metadata key: up to 40 printable ASCII, no brackets")
    return raw


def _token_type(raw: str) -> str:
    if not raw.isascii() or not raw.isprintable() or len(raw) > 64:
        raise ValueError("must be a short printable ASCII value such as at+jwt")
    return raw


# --- the settings --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service. Build with :meth:`from_env`."""

    stripe_api_key: Secret | None = setting(
        "STRIPE_API_KEY",
        _stripe_key,
        None,
        "Stripe secret or restricted key (`sk_…`/`rk_…`); test vs live must match the database",
        secret=True,
        required_to_serve=True,
    )
    database_url: Secret = setting(
        "DATABASE_URL",
        _database_url,
        # Hashable and never mutated, so one instance may be every default.
        Secret(DEFAULT_DATABASE_URL),
        "Postgres to connect to (`postgresql://user@host:port/database`)",
        secret=True,
    )
    migrate_database_url: Secret | None = setting(
        "MIGRATE_DATABASE_URL",
        _database_url,
        None,
        "the schema owner's Postgres URL for `migrate` and `audit prune` (default: `DATABASE_URL`)",
        secret=True,
    )
    database_runtime_role: str | None = setting(
        "DATABASE_RUNTIME_ROLE",
        _role_name,
        None,
        "role `migrate` grants only what `serve` needs (as `--grant-to ROLE`)",
    )
    host: str = setting("HOST", str, "0.0.0.0", "address the API listens on")  # noqa: S104 - a container listens on all
    port: int = setting("PORT", _int_in(1, 65535), 8080, "TCP port of the API")
    metrics_port: int | None = setting(
        "METRICS_PORT",
        _int_in(1, 65535),
        None,
        "serve `/metrics` on this port only (unset: on `PORT` with the API)",
    )
    stripe_api_base: str = setting(
        "STRIPE_API_BASE",
        _http_base_url,
        "https://api.stripe.com",
        "Stripe's API; for the stand-in or stripe-mock: `http://127.0.0.1:12111`",
    )
    stripe_api_version: str = setting(
        "STRIPE_API_VERSION", str, DEFAULT_STRIPE_API_VERSION, "sent as `Stripe-Version`"
    )
    stripe_timeout_seconds: float = setting(
        "STRIPE_TIMEOUT_SECONDS", _float_in(0.01, 120), 5.0, "bound on one Stripe attempt"
    )
    stripe_connect_timeout_seconds: float = setting(
        "STRIPE_CONNECT_TIMEOUT_SECONDS",
        _float_in(0.01, 60),
        2.0,
        "bound on connecting to Stripe, per attempt",
    )
    stripe_max_retries: int = setting(
        "STRIPE_MAX_RETRIES", _int_in(0, 10), 2, "retries of retryable Stripe failures"
    )
    # Full jitter, as stripe-python (which waits 0.5 s initially, 2 s at most).
    stripe_backoff_initial_seconds: float = setting(
        "STRIPE_BACKOFF_INITIAL_SECONDS",
        _float_in(0, 60),
        0.25,
        "retry backoff: a random wait in `[0, min(max, initial·2ⁿ⁻¹)]`,"
        " or Stripe's `Retry-After` if longer",
    )
    stripe_backoff_max_seconds: float = setting(
        "STRIPE_BACKOFF_MAX_SECONDS", _float_in(0, 300), 2.0, "cap of the retry backoff"
    )
    stripe_max_connections: int = setting(
        "STRIPE_MAX_CONNECTIONS", _int_in(1, 10000), 100, "keep-alive pool to Stripe"
    )
    request_deadline_seconds: float = setting(
        "REQUEST_DEADLINE_SECONDS",
        _float_in(0.05, 300),
        10.0,
        "bound on a whole request, retries included",
    )
    breaker_failure_threshold: int = setting(
        "BREAKER_FAILURE_THRESHOLD",
        _int_in(1, 1000),
        5,
        "failures in a row that open the circuit breaker (per replica)",
    )
    breaker_cooldown_seconds: float = setting(
        "BREAKER_COOLDOWN_SECONDS",
        _float_in(0.01, 3600),
        30.0,
        "how long the open breaker refuses before one trial call",
    )
    stripe_webhook_secrets: tuple[Secret, ...] = setting(
        "STRIPE_WEBHOOK_SECRETS",
        _secrets,
        (),
        "webhook signing secrets, comma-separated (more than one during rotation)",
        secret=True,
    )
    stripe_user_metadata_key: str | None = setting(
        "STRIPE_USER_METADATA_KEY",
        _metadata_key,
        None,
        "Stripe customer metadata key holding our user id (e.g. `user_id`); unset: no linking",
    )
    stripe_sync_requests_per_second: float = setting(
        "STRIPE_SYNC_REQUESTS_PER_SECOND",
        _float_in(0.1, 1000),
        10.0,
        "cap on Stripe calls per second of `sync --from-stripe`",
    )
    stripe_max_requests_per_second: int | None = setting(
        "STRIPE_MAX_REQUESTS_PER_SECOND",
        _int_in(0, 10_000),
        None,
        "Stripe calls per second for the whole fleet, every caller included (`0`: off);"
        " unset: 80 with a live key and 20 with a test key on `https://api.stripe.com`,"
        " off for any other `STRIPE_API_BASE`. Shared with `REDIS_URL`, else per replica",
    )
    redis_url: Secret | None = setting(
        "REDIS_URL",
        _redis_url,
        None,
        "Redis the replicas share rate limits and the Stripe budget through"
        " (`redis://host:6379/0`, `rediss://…`, `unix://…`); unset: each replica alone",
        secret=True,
    )
    redis_timeout_seconds: float = setting(
        "REDIS_TIMEOUT_SECONDS",
        _float_in(0.01, 5),
        # Not the request deadline: a hung Redis costs a request this, then the
        # replica decides alone. Wide enough for a busy event loop's lag.
        0.25,
        "bound on one Redis call, connecting included; past it the replica uses its own limits",
    )
    return_url_allowlist: tuple[str, ...] = setting(
        "RETURN_URL_ALLOWLIST",
        parse_return_url_allowlist,
        (),
        "comma-separated origins return URLs may go to (`https://app.example.com`)",
    )
    default_return_url: str | None = setting(
        "DEFAULT_RETURN_URL",
        _absolute_url,
        None,
        "return URL used when neither the request nor the profile gives one",
    )
    allow_http_localhost: bool = setting(
        "ALLOW_HTTP_LOCALHOST",
        _bool,
        False,
        "allow plain-http return URLs to localhost, 127.0.0.1 and [::1] (development)",
    )
    jwt_issuer: str | None = setting("JWT_ISSUER", str, None, "`iss` required of end-user tokens")
    jwt_audience: str | None = setting(
        "JWT_AUDIENCE", str, None, "`aud` required of end-user tokens"
    )
    jwt_algorithms: tuple[str, ...] = setting(
        "JWT_ALGORITHMS",
        _jwt_algorithms,
        ("RS256",),
        "comma-separated algorithms end-user tokens may use",
    )
    jwt_max_lifetime_seconds: int = setting(
        "JWT_MAX_LIFETIME_SECONDS",
        _int_in(1, 31_536_000),
        86400,
        "longest lifetime (`exp - iat`, or `exp - now`) an end-user token may have",
    )
    jwt_required_typ: str | None = setting(
        "JWT_REQUIRED_TYP",
        _token_type,
        None,
        "`typ` an end-user token's header must carry (e.g. `at+jwt`)",
    )
    jwt_jwks_url: str | None = setting(
        "JWT_JWKS_URL", _http_base_url, None, "JWKS of the end-user token keys"
    )
    jwt_jwks_min_refresh_seconds: float = setting(
        "JWT_JWKS_MIN_REFRESH_SECONDS",
        _float_in(0, 3600),
        30.0,
        "least time between JWKS refetches for unknown `kid`s",
    )
    jwt_public_key_file: Path | None = setting(
        "JWT_PUBLIC_KEY_FILE", _readable_path, None, "PEM public key that verifies end-user tokens"
    )
    jwt_hs256_secret: Secret | None = setting(
        "JWT_HS256_SECRET",
        _hs256_secret,
        None,
        "shared secret (32 characters or more) that verifies HS* end-user tokens",
        secret=True,
    )
    end_user_rate_limit_per_minute: int = setting(
        "END_USER_RATE_LIMIT_PER_MINUTE",
        _int_in(1, 1_000_000),
        60,
        "requests per end user and minute (shared by the replicas with `REDIS_URL`)",
    )
    idempotency_ttl_seconds: int = setting(
        "IDEMPOTENCY_TTL_SECONDS",
        _int_in(1, 86400),
        300,
        "how long an `Idempotency-Key` replays its first answer",
    )
    public_base_url: str | None = setting(
        "PUBLIC_BASE_URL",
        _public_base_url,
        None,
        "the service's public https address, as browsers reach it; portal links start with it"
        " (unset: `POST /v1/portal-links` answers 501)",
    )
    portal_link_ttl_seconds: int = setting(
        "PORTAL_LINK_TTL_SECONDS",
        _int_in(1, 86400),
        600,
        "how long a portal link stays valid before it is clicked",
    )
    portal_link_opens_per_minute: int = setting(
        "PORTAL_LINK_OPENS_PER_MINUTE",
        _int_in(1, 1_000_000),
        60,
        "views and clicks of portal links allowed per client IP per minute"
        " (fleet-wide with `REDIS_URL`, else per replica)",
    )
    cors_allowed_origins: tuple[str, ...] = setting(
        "CORS_ALLOWED_ORIGINS",
        parse_origins,
        (),
        "comma-separated browser origins allowed by CORS (none: CORS off)",
    )
    max_in_flight: int = setting(
        "MAX_IN_FLIGHT",
        _int_in(1, 100_000),
        256,
        "concurrent requests above which new ones get `503 overloaded`",
    )
    webhook_max_in_flight: int = setting(
        "WEBHOOK_MAX_IN_FLIGHT",
        _int_in(1, 100_000),
        32,
        "concurrent unauthenticated (webhook) requests, a budget apart from `MAX_IN_FLIGHT`",
    )
    body_read_timeout_seconds: float = setting(
        "BODY_READ_TIMEOUT_SECONDS",
        _float_in(0.05, 300),
        5.0,
        "a request body not arrived within it is `408 request_timeout`",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        "TRUSTED_PROXIES",
        _networks,
        (),
        "comma-separated CIDRs whose `X-Forwarded-For` is believed for the client IP",
    )
    shutdown_timeout: float = setting(
        "SHUTDOWN_TIMEOUT",
        _float_in(0, 3600),
        20.0,
        "seconds in-flight requests get to finish on SIGTERM",
    )
    db_pool_min_size: int = setting(
        "DB_POOL_MIN_SIZE", _int_in(0, 1000), 2, "Postgres connections kept open"
    )
    db_pool_max_size: int = setting(
        "DB_POOL_MAX_SIZE", _int_in(1, 1000), 10, "most Postgres connections"
    )
    # An outage is a `503 database_unavailable` within this bound, under the 2 s
    # SPEC §8 promises.
    db_timeout_seconds: float = setting(
        "DB_TIMEOUT_SECONDS",
        _float_in(0.05, 60),
        1.5,
        "bound on a whole database call: pool wait, reconnect, statement",
    )
    log_level: str = setting(
        "LOG_LEVEL", _one_of(_LOG_LEVELS, upper=True), "INFO", "DEBUG, INFO, WARNING or ERROR"
    )
    event_loop: str = setting(
        "EVENT_LOOP",
        _one_of(("uvloop", "asyncio")),
        "uvloop",
        "`serve`'s event loop: `uvloop` (libuv; less CPU per request) or `asyncio`"
        " (the standard library's)",
    )
    log_format: str = setting(
        "LOG_FORMAT",
        _one_of(("json", "console")),
        "json",
        "`json` (one object per line) or `console`",
    )

    @property
    def livemode(self) -> bool:
        """Whether the Stripe key is a live-mode key."""
        key = self.stripe_api_key.reveal() if self.stripe_api_key else ""
        return key.startswith(("sk_live_", "rk_live_"))

    @property
    def upstream_budget_per_second(self) -> int:
        """Stripe calls per second for the fleet (SPEC §14); 0 when the budget is off.

        Unset, it follows Stripe's documented account limits (100 live, 25 in
        test mode) with a fifth left over, and only on Stripe's own API: a
        stand-in or stripe-mock has no such limit.
        """
        if self.stripe_max_requests_per_second is not None:
            return self.stripe_max_requests_per_second
        parts = urlsplit(self.stripe_api_base)
        if parts.scheme != "https" or parts.hostname != STRIPE_API_HOST:
            return 0
        return DEFAULT_LIVE_BUDGET if self.livemode else DEFAULT_TEST_BUDGET

    @property
    def jwt_enabled(self) -> bool:
        """End-user tokens are accepted only when a key source is configured."""
        return bool(self.jwt_jwks_url or self.jwt_public_key_file or self.jwt_hs256_secret)

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests and the demo use this)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_os_env(cls, *, serving: bool = True) -> Settings:
        """Settings from this process's environment (the only reader of os.environ)."""
        return cls.from_env(os.environ, serving=serving)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, serving: bool = True) -> Settings:
        """Build and validate the settings; raise ConfigError naming the first bad variable.

        ``serving=False`` is for CLI commands that never call Stripe (migrate,
        import, clients): they need no Stripe key.
        """
        values: dict[str, Any] = {}
        for field, declaration in _DECLARED:
            variable = declaration.variable
            raw = _read(env, variable, secret=declaration.secret)
            if raw is not None:
                try:
                    values[field] = declaration.parse(raw)
                except ValueError as exc:
                    raise ConfigError(variable, str(exc)) from None
            elif serving and declaration.required_to_serve:
                raise ConfigError(variable, f"is required (or {variable}_FILE)")
        # Unset variables are left out, so the field's declared default applies.
        settings = cls(**values)
        _check_cross_field(settings)
        return settings


def _declarations() -> tuple[tuple[str, _Declaration], ...]:
    """(field, declaration) of every setting, in declaration order."""
    found = []
    for field in dataclasses.fields(Settings):
        declaration = field.metadata.get(_DECLARATION)
        if not isinstance(declaration, _Declaration):
            raise TypeError(f"Settings.{field.name} is not declared with setting()")
        found.append((field.name, declaration))
    return tuple(found)


_DECLARED = _declarations()


def _check_cross_field(s: Settings) -> None:
    if s.db_pool_min_size > s.db_pool_max_size:
        raise ConfigError("DB_POOL_MIN_SIZE", "must not exceed DB_POOL_MAX_SIZE")
    if s.jwt_enabled and not (s.jwt_issuer and s.jwt_audience):
        missing = "JWT_ISSUER" if not s.jwt_issuer else "JWT_AUDIENCE"
        raise ConfigError(missing, "is required when end-user tokens are enabled")
    hmac_algs = [a for a in s.jwt_algorithms if a.startswith("HS")]
    if s.jwt_hs256_secret is not None and not hmac_algs:
        raise ConfigError("JWT_ALGORITHMS", "must include HS256 when JWT_HS256_SECRET is set")
    if hmac_algs and s.jwt_hs256_secret is None and s.jwt_enabled:
        # An RSA/EC public key must never be usable as an HMAC secret.
        raise ConfigError("JWT_ALGORITHMS", "HS* algorithms need JWT_HS256_SECRET")
    # Not checked, because any positive pair works (SPEC §3): a per-attempt
    # timeout longer than REQUEST_DEADLINE_SECONDS is cut by the deadline, and a
    # backoff whose initial window exceeds its cap is simply capped.
    if s.metrics_port is not None and s.metrics_port == s.port:
        raise ConfigError("METRICS_PORT", "must differ from PORT (or be unset to serve both)")


# --- the README's table --------------------------------------------------------------


def configuration_variables() -> tuple[str, ...]:
    """Every variable the settings read, in declaration order (``NAME_FILE`` aside)."""
    return tuple(declaration.variable for _, declaration in _DECLARED)


def configuration_table() -> str:
    """The Markdown table of variables the README's "Configuration" section shows."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for _, d in _DECLARED:
        shown = f"`{d.variable}`" + (f" (or `{d.variable}_FILE`)" if d.secret else "")
        default = "required for `serve`" if d.required_to_serve else _shown(d.default)
        rows.append(f"| {shown} | {default} | {d.doc} |")
    return "\n".join(rows) + "\n"


def _shown(default: object) -> str:
    if default is None or default == ():
        return "—"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float):
        return f"`{default:g}`"
    if isinstance(default, tuple):
        return f"`{','.join(str(item) for item in default)}`"
    if isinstance(default, Secret):
        # A default is written in this file for all to read: it is no secret.
        return f"`{default.reveal()}`"
    return f"`{default}`"
