"""Where end-user JWT verification keys come from: a JWKS URL, a PEM file or an HMAC secret.

JWKS is fetched with the application's shared aiohttp session (never a
blocking call on the event loop), cached, and refetched when a token names an
unknown ``kid`` — at most once per ``JWT_JWKS_MIN_REFRESH_SECONDS`` so a flood of
garbage ``kid``s can't make us hammer the identity provider.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import structlog
from cryptography.hazmat.primitives import serialization

from service.config import Settings

logger = structlog.get_logger("app")

MAX_AGE = 600.0  # refetch a JWKS older than this on the next use
FETCH_TIMEOUT = 5.0


class UnknownKey(jwt.PyJWKClientError):
    """No key matches the token's ``kid``."""


class JwtKeys:
    """Verification keys for end-user tokens."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession | None = None) -> None:
        self._public_key: Any = None
        self._hmac_secret: str | None = None
        self._jwks_url = settings.jwt_jwks_url
        self._session = session
        self._jwks: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._min_refresh = settings.jwt_jwks_min_refresh_seconds
        self._last_attempt = -self._min_refresh
        self._lock = asyncio.Lock()
        self.fetches = 0
        if settings.jwt_public_key_file is not None:
            pem = settings.jwt_public_key_file.read_bytes()
            # A parsed key object, never the PEM text: PyJWT would accept PEM
            # bytes as an HMAC secret, the classic algorithm-confusion attack.
            self._public_key = serialization.load_pem_public_key(pem)
        if settings.jwt_hs256_secret is not None:
            self._hmac_secret = settings.jwt_hs256_secret.reveal()

    async def key_for(self, alg: str, kid: object) -> Any:
        """The key for this token; an RSA/EC key is never offered to an HMAC algorithm."""
        if alg.startswith("HS"):
            if self._hmac_secret is None:
                raise jwt.InvalidAlgorithmError("no HMAC secret configured")
            return self._hmac_secret
        if self._jwks_url is not None and isinstance(kid, str) and kid:
            return await self._jwks_key(kid)
        if self._public_key is None:
            raise UnknownKey("no public key for this token")
        return self._public_key

    async def _jwks_key(self, kid: str) -> Any:
        now = time.monotonic()
        key = self._jwks.get(kid)
        stale = now - self._fetched_at > MAX_AGE
        if key is not None and not stale:
            return key
        async with self._lock:  # one fetch at a time; waiters reuse its result
            key = self._jwks.get(kid)
            may_fetch = time.monotonic() - self._last_attempt >= self._min_refresh
            if (key is None or stale) and may_fetch:
                await self._fetch()
                key = self._jwks.get(kid)
        if key is None:
            raise UnknownKey("unknown kid")
        return key

    async def _fetch(self) -> None:
        assert self._jwks_url is not None
        assert self._session is not None
        self._last_attempt = time.monotonic()
        self.fetches += 1
        try:
            async with self._session.get(
                self._jwks_url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            ) as resp:
                resp.raise_for_status()
                document = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # Keep the keys we have: an IdP blip must not log everyone out.
            logger.warning("jwks_fetch_failed", error=type(exc).__name__)
            return
        keys: dict[str, Any] = {}
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") not in ("RSA", "EC", "OKP") or not entry.get("kid"):
                continue  # symmetric keys from a JWKS are never trusted
            try:
                keys[str(entry["kid"])] = jwt.PyJWK(entry).key
            except jwt.PyJWTError:
                logger.warning("jwks_key_skipped", kid=str(entry.get("kid"))[:64])
        self._jwks = keys
        self._fetched_at = time.monotonic()
