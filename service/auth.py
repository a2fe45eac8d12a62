"""Who is calling: service clients (opaque tokens) and end users (JWTs).

A bearer token that starts with ``pgw_`` is a service-client token; anything
else is treated as a JWT. The two can't be confused: a JWT always starts with
``eyJ`` (base64 of ``{"``) and contains two dots, a client token contains none.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from service.config import Settings
from service.db import clients
from service.db.pool import Database
from service.errors import Forbidden, Unauthenticated
from service.jwt_keys import JwtKeys

CLIENT_TOKEN_PREFIX = "pgw_"  # noqa: S105 - a public prefix, not a secret
SCOPE_CREATE_SESSIONS = "portal_sessions:create"
SCOPE_MAPPINGS_WRITE = "mappings:write"
SCOPE_MAPPINGS_READ = "mappings:read"
# Every scope a route checks: `clients create --scope` takes only these.
KNOWN_SCOPES = (SCOPE_CREATE_SESSIONS, SCOPE_MAPPINGS_WRITE, SCOPE_MAPPINGS_READ)
JWT_LEEWAY_SECONDS = 30
MAX_TOKEN_LENGTH = 8192


@dataclass(slots=True)
class PendingToken:
    """A client token taken from the authenticator's cache, still to be confirmed
    active by a query of this request (see Authenticator)."""

    token_hash: bytes
    # The scope the route requires: checked again against what the query reads.
    scope: str
    confirmed: bool = False
    # What the confirming query read: the client's row, None if the token is revoked.
    row: clients.ClientRow | None = None


def confirm_token(principal: Principal, row: clients.ClientRow | None) -> None:
    """Record what this request's query read of a cached principal's token; a
    revoked token is a 401 here and now (and is forgotten when the request settles)."""
    pending = principal.pending
    if pending is None:
        return
    pending.confirmed = True
    pending.row = row
    if row is None:
        raise Unauthenticated("revoked_token")
    if pending.scope not in row.scopes:
        raise Forbidden("insufficient_scope", f"This client lacks the {pending.scope} scope.")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    type: str  # "client" or "user"
    id: str  # client name, or the user's id (the JWT's `sub`)
    scopes: frozenset[str]
    rate_limit_per_minute: int
    # Set when the token came from the cache: it must be confirmed before any answer.
    pending: PendingToken | None = None

    @property
    def key(self) -> str:
        """A stable identity for rate limits and idempotency keys."""
        return f"{self.type}:{self.id}"


def generate_client_token() -> str:
    """A new service-client token: 256 bits of randomness behind the prefix."""
    return CLIENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """What we store and look up instead of the token.

    The token has 256 bits of entropy, so a plain SHA-256 is enough; the lookup
    is an index probe on the hash, which tells an attacker nothing about which
    tokens exist (they cannot steer the hash).
    """
    return hashlib.sha256(token.encode()).digest()


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header, or Unauthenticated."""
    if not header:
        raise Unauthenticated("missing")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated("malformed")
    return token


# Client tokens remembered per replica; past this many the cache starts over.
MAX_CACHED_CLIENTS = 10_000
# A verified JWT is trusted again without verifying its signature for at most this
# long (and never past its `exp` plus the leeway): a key withdrawn from the JWKS
# stops working within it. The same bound on how many are kept.
JWT_CACHE_SECONDS = 60.0
MAX_CACHED_JWTS = 10_000


class Authenticator:
    """Turns a bearer token into a Principal, or raises Unauthenticated.

    Client tokens seen before come from an in-process cache, so a request whose
    own query can confirm the token (``deferred=True``: the portal routes, whose
    resolving statement reads the token's row too) saves a round trip. Such a
    principal carries a :class:`PendingToken`; the protected pipeline never
    answers before it is confirmed — by that statement or, on any other path,
    by :meth:`confirm` — so a revoked token is refused on the very next request.
    """

    def __init__(self, settings: Settings, db: Database, jwt_keys: JwtKeys | None) -> None:
        self._settings = settings
        self._db = db
        self._jwt_keys = jwt_keys
        self._clients: dict[bytes, clients.ClientRow] = {}
        # token -> (principal, trusted until, by ``clock``)
        self._jwts: dict[str, tuple[Principal, float]] = {}
        # The JWT cache's clock: wall time, as it is compared with `exp`.
        self.clock: Callable[[], float] = time.time

    async def authenticate(
        self, authorization: str | None, *, deferred: str | None = None
    ) -> Principal:
        """The caller. ``deferred``: the route's scope, when a query of the request
        confirms a cached client token (else every client token is looked up)."""
        token = bearer_token(authorization)
        if token.startswith(CLIENT_TOKEN_PREFIX):
            return await self._client(hash_token(token), deferred=deferred)
        return await self._end_user(token)

    async def _client(self, token_hash: bytes, *, deferred: str | None) -> Principal:
        if deferred is not None:
            cached = self._clients.get(token_hash)
            if cached is not None:
                return _client_principal(cached, PendingToken(token_hash, deferred))
        row = await clients.find_client(self._db, token_hash)
        if row is None:
            self._clients.pop(token_hash, None)
            raise Unauthenticated("unknown_token")
        self._remember(token_hash, row)
        return _client_principal(row, None)

    async def settle(self, principal: Principal) -> None:
        """Before any answer: confirm a cached principal's token if its request did not
        (a lookup of its own; 401 if revoked), and keep the cache to what was read."""
        pending = principal.pending
        if pending is None:
            return
        try:
            if not pending.confirmed:
                confirm_token(principal, await clients.find_client(self._db, pending.token_hash))
        finally:
            if pending.confirmed and pending.row is None:
                self._clients.pop(pending.token_hash, None)
            elif pending.row is not None:
                # New scopes or a new rate limit apply from the next request on.
                self._remember(pending.token_hash, pending.row)

    def _remember(self, token_hash: bytes, row: clients.ClientRow) -> None:
        if len(self._clients) >= MAX_CACHED_CLIENTS and token_hash not in self._clients:
            self._clients.clear()
        self._clients[token_hash] = row

    async def _end_user(self, token: str) -> Principal:
        cached = self._jwts.get(token)
        if cached is not None:
            if time.time() < cached[1]:
                return cached[0]
            del self._jwts[token]
        principal, exp = await self._verify(token)
        if len(self._jwts) >= MAX_CACHED_JWTS:
            self._jwts.clear()
        self._jwts[token] = (
            principal,
            min(time.time() + JWT_CACHE_SECONDS, exp + JWT_LEEWAY_SECONDS),
        )
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal of a JWT whose signature and claims hold, and its ``exp``."""
        if self._jwt_keys is None:
            raise Unauthenticated("jwt_disabled")
        s = self._settings
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in s.jwt_algorithms:
                raise Unauthenticated("jwt_algorithm")
            if s.jwt_required_typ is not None and not _typ_matches(
                header.get("typ"), s.jwt_required_typ
            ):
                raise Unauthenticated("jwt_typ")
            key = await self._jwt_keys.key_for(alg, header.get("kid"))
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=JWT_LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("jwt_expired") from None
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError):
            raise Unauthenticated("jwt_claims") from None
        except jwt.PyJWKClientError:
            raise Unauthenticated("jwt_unknown_key") from None
        except jwt.PyJWTError:
            raise Unauthenticated("jwt_invalid") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= 128:
            raise Unauthenticated("jwt_invalid")
        if _lifetime(claims) > s.jwt_max_lifetime_seconds:
            raise Unauthenticated("jwt_lifetime")
        principal = Principal(
            "user", sub, frozenset({SCOPE_CREATE_SESSIONS}), s.end_user_rate_limit_per_minute
        )
        return principal, float(claims["exp"])


def trusted_until(now: float, exp: float) -> float:
    """Until when a JWT verified at ``now`` is trusted again without verifying it:
    JWT_CACHE_SECONDS, and never past its ``exp`` plus the leeway PyJWT gives."""
    return min(now + JWT_CACHE_SECONDS, exp + JWT_LEEWAY_SECONDS)


def _client_principal(row: clients.ClientRow, pending: PendingToken | None) -> Principal:
    return Principal("client", row.name, frozenset(row.scopes), row.rate_limit_per_minute, pending)


def _lifetime(claims: dict[str, Any]) -> float:
    """How long the token is valid in all: ``exp - iat``; without ``iat``, ``exp - now``
    less the clock-skew leeway the other time claims get (``now`` is our clock).

    PyJWT has checked both are numbers (and ``iat`` not in the future). A token
    minted for ten years is refused even when it is young: a stolen one would
    be good for as long as it says.
    """
    iat = claims.get("iat")
    try:
        if iat is not None:
            return float(claims["exp"]) - float(iat)
        return float(claims["exp"]) - time.time() - JWT_LEEWAY_SECONDS
    except (TypeError, ValueError, OverflowError):  # e.g. an exp of 10**400: forever
        return float("inf")


def _typ_matches(typ: object, required: str) -> bool:
    """The header's ``typ`` against JWT_REQUIRED_TYP: a media type, so compared
    case-insensitively and with its optional ``application/`` prefix (RFC 7515 §4.1.9)."""
    if not isinstance(typ, str):
        return False

    def bare(value: str) -> str:
        value = value.strip().lower()
        return value.removeprefix("application/")

    return bare(typ) == bare(required)
