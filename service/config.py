"""Settings: one frozen, typed object built once from the environment.

Nothing else in the service reads ``os.environ``. Every secret can come from
``NAME`` or from a file named by ``NAME_FILE``; secrets are wrapped in
:class:`Secret` so that ``repr()`` of the settings never shows them.
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
from typing import TypeVar
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/portal_gateway"
DEFAULT_STRIPE_API_VERSION = "2025-09-30.clover"
ALLOWED_JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384"}
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service. Build with :meth:`from_env`."""

    stripe_api_key: Secret | None = None
    database_url: Secret = dataclasses.field(default_factory=lambda: Secret(DEFAULT_DATABASE_URL))
    host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on all interfaces
    port: int = 8080
    stripe_api_base: str = "https://api.stripe.com"
    stripe_api_version: str = DEFAULT_STRIPE_API_VERSION
    stripe_timeout_seconds: float = 5.0
    stripe_connect_timeout_seconds: float = 2.0
    stripe_max_retries: int = 2
    # Full-jitter backoff window: initial * 2**(n-1), capped (stripe-python: 0.5 s / 2 s).
    stripe_backoff_initial_seconds: float = 0.25
    stripe_backoff_max_seconds: float = 2.0
    stripe_max_connections: int = 100
    request_deadline_seconds: float = 10.0
    breaker_failure_threshold: int = 5
    breaker_cooldown_seconds: float = 30.0
    stripe_webhook_secrets: tuple[Secret, ...] = ()
    return_url_allowlist: tuple[str, ...] = ()
    default_return_url: str | None = None
    allow_http_localhost: bool = False
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_algorithms: tuple[str, ...] = ("RS256",)
    jwt_jwks_url: str | None = None
    jwt_jwks_min_refresh_seconds: float = 30.0
    jwt_public_key_file: Path | None = None
    jwt_hs256_secret: Secret | None = None
    end_user_rate_limit_per_minute: int = 60
    idempotency_ttl_seconds: int = 300
    cors_allowed_origins: tuple[str, ...] = ()
    max_in_flight: int = 256
    shutdown_timeout: float = 20.0
    db_pool_min_size: int = 2
    db_pool_max_size: int = 10
    # Bounds each database call whole (pool wait, connect, statement): an outage
    # is a 503 within it, under the 2 s SPEC §8 promises.
    db_timeout_seconds: float = 1.5
    log_level: str = "INFO"
    log_format: str = "json"

    @property
    def livemode(self) -> bool:
        """Whether the Stripe key is a live-mode key."""
        key = self.stripe_api_key.reveal() if self.stripe_api_key else ""
        return key.startswith(("sk_live_", "rk_live_"))

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
        r = _Reader(env)
        api_key = r.secret("STRIPE_API_KEY", required=serving)
        if api_key is not None and not re.fullmatch(
            r"(sk|rk)_(test|live)_[A-Za-z0-9_]+", api_key.reveal()
        ):
            raise ConfigError(
                "STRIPE_API_KEY", "must be a Stripe secret or restricted key (sk_… or rk_…)"
            )
        hs_secret = r.secret("JWT_HS256_SECRET")
        if hs_secret is not None and len(hs_secret.reveal()) < 32:
            raise ConfigError("JWT_HS256_SECRET", "must be at least 32 characters")
        default_algorithms: tuple[str, ...] = ("RS256",)
        algorithms = r.parse("JWT_ALGORITHMS", _csv, default_algorithms)
        for alg in algorithms:
            if alg not in ALLOWED_JWT_ALGORITHMS:
                raise ConfigError("JWT_ALGORITHMS", f"unsupported algorithm {alg!r}")
        public_key_file = r.parse("JWT_PUBLIC_KEY_FILE", _readable_path, None)
        settings = cls(
            stripe_api_key=api_key,
            database_url=_database_url(r.secret("DATABASE_URL")),
            host=r.parse("HOST", _nonempty, "0.0.0.0"),  # noqa: S104
            port=r.parse("PORT", _int_in(1, 65535), 8080),
            stripe_api_base=r.parse("STRIPE_API_BASE", _http_base_url, "https://api.stripe.com"),
            stripe_api_version=r.parse("STRIPE_API_VERSION", _nonempty, DEFAULT_STRIPE_API_VERSION),
            stripe_timeout_seconds=r.parse("STRIPE_TIMEOUT_SECONDS", _float_in(0.01, 120), 5.0),
            stripe_connect_timeout_seconds=r.parse(
                "STRIPE_CONNECT_TIMEOUT_SECONDS", _float_in(0.01, 60), 2.0
            ),
            stripe_max_retries=r.parse("STRIPE_MAX_RETRIES", _int_in(0, 10), 2),
            stripe_backoff_initial_seconds=r.parse(
                "STRIPE_BACKOFF_INITIAL_SECONDS", _float_in(0, 60), 0.25
            ),
            stripe_backoff_max_seconds=r.parse(
                "STRIPE_BACKOFF_MAX_SECONDS", _float_in(0, 300), 2.0
            ),
            stripe_max_connections=r.parse("STRIPE_MAX_CONNECTIONS", _int_in(1, 10000), 100),
            request_deadline_seconds=r.parse(
                "REQUEST_DEADLINE_SECONDS", _float_in(0.05, 300), 10.0
            ),
            breaker_failure_threshold=r.parse("BREAKER_FAILURE_THRESHOLD", _int_in(1, 1000), 5),
            breaker_cooldown_seconds=r.parse(
                "BREAKER_COOLDOWN_SECONDS", _float_in(0.01, 3600), 30.0
            ),
            stripe_webhook_secrets=tuple(
                Secret(s) for s in _csv((r.secret("STRIPE_WEBHOOK_SECRETS") or Secret("")).reveal())
            ),
            return_url_allowlist=r.parse("RETURN_URL_ALLOWLIST", _return_url_origins, ()),
            default_return_url=r.parse("DEFAULT_RETURN_URL", _absolute_url, None),
            allow_http_localhost=r.parse("ALLOW_HTTP_LOCALHOST", _bool, False),
            jwt_issuer=r.parse("JWT_ISSUER", _nonempty, None),
            jwt_audience=r.parse("JWT_AUDIENCE", _nonempty, None),
            jwt_algorithms=algorithms,
            jwt_jwks_url=r.parse("JWT_JWKS_URL", _http_base_url, None),
            jwt_jwks_min_refresh_seconds=r.parse(
                "JWT_JWKS_MIN_REFRESH_SECONDS", _float_in(0, 3600), 30.0
            ),
            jwt_public_key_file=public_key_file,
            jwt_hs256_secret=hs_secret,
            end_user_rate_limit_per_minute=r.parse(
                "END_USER_RATE_LIMIT_PER_MINUTE", _int_in(1, 1_000_000), 60
            ),
            idempotency_ttl_seconds=r.parse("IDEMPOTENCY_TTL_SECONDS", _int_in(1, 86400), 300),
            cors_allowed_origins=r.parse("CORS_ALLOWED_ORIGINS", _origins, ()),
            max_in_flight=r.parse("MAX_IN_FLIGHT", _int_in(1, 100_000), 256),
            shutdown_timeout=r.parse("SHUTDOWN_TIMEOUT", _float_in(0, 3600), 20.0),
            db_pool_min_size=r.parse("DB_POOL_MIN_SIZE", _int_in(0, 1000), 2),
            db_pool_max_size=r.parse("DB_POOL_MAX_SIZE", _int_in(1, 1000), 10),
            db_timeout_seconds=r.parse("DB_TIMEOUT_SECONDS", _float_in(0.05, 60), 1.5),
            log_level=r.parse("LOG_LEVEL", _one_of(_LOG_LEVELS, upper=True), "INFO"),
            log_format=r.parse("LOG_FORMAT", _one_of(("json", "console")), "json"),
        )
        _check_cross_field(settings)
        return settings


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
    if s.stripe_backoff_initial_seconds > s.stripe_backoff_max_seconds:
        raise ConfigError(
            "STRIPE_BACKOFF_INITIAL_SECONDS", "must not exceed STRIPE_BACKOFF_MAX_SECONDS"
        )
    if s.stripe_timeout_seconds > s.request_deadline_seconds:
        raise ConfigError("STRIPE_TIMEOUT_SECONDS", "must not exceed REQUEST_DEADLINE_SECONDS")


class _Reader:
    """Reads variables, turning parse failures into ConfigErrors that name them."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def parse(self, name: str, parser: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parser(raw.strip())
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None

    def secret(self, name: str, *, required: bool = False) -> Secret | None:
        direct = self._env.get(name, "").strip()
        file_name = self._env.get(f"{name}_FILE", "").strip()
        if direct and file_name:
            raise ConfigError(name, f"set either {name} or {name}_FILE, not both")
        if file_name:
            try:
                value = Path(file_name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{name}_FILE", f"cannot read file ({exc.strerror})") from None
            if not value:
                raise ConfigError(f"{name}_FILE", "file is empty")
            return Secret(value)
        if direct:
            return Secret(direct)
        if required:
            raise ConfigError(name, f"is required (or {name}_FILE)")
        return None


def _nonempty(raw: str) -> str:
    return raw


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be a boolean (1/0/true/false), got {raw!r}")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number, got {raw!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {raw}")
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


def _database_url(url: Secret | None) -> Secret:
    # asyncpg takes only URLs; anything else would fail later, as a connection
    # error (exit 1) instead of a configuration error. The value may hold a
    # password, so the message never repeats it.
    if url is None:
        return Secret(DEFAULT_DATABASE_URL)
    scheme, sep, rest = url.reveal().partition("://")
    if not sep or scheme.lower() not in ("postgres", "postgresql") or not rest:
        raise ConfigError("DATABASE_URL", "must be a postgresql://user@host:port/database URL")
    return url


# A plain DNS name (a trailing dot is another origin to a browser, so it is kept).
_DNS_NAME = re.compile(r"(?:(?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)\.?")
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _origins(raw: str) -> tuple[str, ...]:
    origins = []
    for item in _csv(raw):
        problem = f"must be comma-separated origins like https://app.example.com, got {item!r}"
        parts = urlsplit(item)
        if (
            parts.scheme.lower() not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
        ):
            raise ValueError(problem)
        host = parts.hostname
        if ":" in host:  # an IPv6 literal: keep the brackets an Origin header has
            try:
                host = f"[{ipaddress.IPv6Address(host).compressed}]"
            except ValueError:
                raise ValueError(problem) from None
        elif not _DNS_NAME.fullmatch(host):
            # Wildcards, spaces and non-ASCII names could never match a request's origin.
            raise ValueError(problem)
        origins.append(normalise_origin(parts.scheme, host, parts.port))
    return tuple(origins)


def _return_url_origins(raw: str) -> tuple[str, ...]:
    origins = _origins(raw)
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme == "http" and (parts.hostname or "") not in _LOCAL_HOSTS:
            # Return URLs must be https (plain http only for localhost), so this
            # entry could never match: refuse it rather than ignore it silently.
            raise ValueError(f"plain http is only allowed for localhost, got {origin!r}")
    return origins


def normalise_origin(scheme: str, host: str, port: int | None) -> str:
    """``scheme://host[:port]`` lower-cased, with the scheme's default port dropped."""
    scheme = scheme.lower()
    host = host.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    if port is None or port == default:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _readable_path(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise ValueError(f"file not found: {raw}")
    return path
