"""``service/auth.py`` without a server or a database: who a bearer token says is calling.

``tests/test_security_jwt.py`` attacks the service over HTTP, where every bad
token is the same 401; here each refusal's ``reason`` (what metrics and logs
get) is pinned, and each bound (token length, ``sub`` length, leeway, lifetime)
is probed on both sides. The keys and the client lookup are stand-ins that
record what they were asked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import string
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from service import auth
from service.auth import (
    MAX_TOKEN_LENGTH,
    SCOPE_CREATE_SESSIONS,
    Authenticator,
    Principal,
    bearer_token,
    generate_client_token,
    hash_token,
)
from service.config import Settings
from service.db import clients
from service.db.clients import ClientRow
from service.errors import Unauthenticated
from service.jwt_keys import UnknownKey

SECRET = "s3cret-" * 10  # long enough for HS384 too
ISSUER = "https://id.example.com/"
AUDIENCE = "portal-gateway"
MAX_LIFETIME = 3600
BASE_ENV = {
    "JWT_HS256_SECRET": SECRET,
    "JWT_ISSUER": ISSUER,
    "JWT_AUDIENCE": AUDIENCE,
    "JWT_ALGORITHMS": "HS256",
    "JWT_MAX_LIFETIME_SECONDS": str(MAX_LIFETIME),
    "END_USER_RATE_LIMIT_PER_MINUTE": "42",
}
SETTINGS = Settings.from_env(BASE_ENV, serving=False)
USER = Principal("user", "u_42", frozenset({SCOPE_CREATE_SESSIONS}), 42)


class Keys:
    """JwtKeys' one method: the HMAC secret for kid ``k1``, UnknownKey for any other."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, object]] = []

    async def key_for(self, alg: str, kid: object) -> Any:
        self.asked.append((alg, kid))
        if kid != "k1":
            raise UnknownKey(f"no key {kid!r}")
        return SECRET


class Db:
    """The database handle; only passed through to clients.find_client."""


DB = Db()
CLIENT_TOKEN = "pgw_" + "t" * 43
CLIENT_ROW = ClientRow(7, "billing", ("portal_sessions:create", "reports:read"), 600)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """clients.find_client against one known token; returns the hashes looked up."""
    seen: list[bytes] = []

    async def find_client(db: object, token_hash: bytes) -> ClientRow | None:
        assert db is DB
        seen.append(token_hash)
        return CLIENT_ROW if token_hash == hashlib.sha256(CLIENT_TOKEN.encode()).digest() else None

    monkeypatch.setattr(clients, "find_client", find_client)
    return seen


def token(
    sub: str | None = "u_42",
    *,
    kid: str | None = "k1",
    alg: str = "HS256",
    typ: object = "JWT",
    key: str = SECRET,
    **claims: Any,
) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    payload.update(claims)
    # PyJWT leaves typ out of the header when it is given as None.
    headers = {"typ": typ} | ({"kid": kid} if kid is not None else {})
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None}, key, algorithm=alg, headers=headers
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any]) -> str:
    now = int(time.time())
    claims = {"sub": "u_42", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


async def authenticate(
    value: str, settings: Settings = SETTINGS, keys: Keys | None = None
) -> Principal:
    return await Authenticator(settings, DB, keys or Keys()).authenticate(f"Bearer {value}")  # type: ignore[arg-type]


async def reason(value: str, settings: Settings = SETTINGS) -> str:
    with pytest.raises(Unauthenticated) as info:
        await authenticate(value, settings)
    assert info.value.detail == "A valid bearer token is required."  # never says which
    return info.value.reason


# --- the Authorization header -----------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc ", "abc"),
        ("Bearer  abc", "abc"),
        ("Bearer a b", "a b"),
        ("Bearer " + "x" * MAX_TOKEN_LENGTH, "x" * MAX_TOKEN_LENGTH),
    ],
)
def test_bearer_token(header: str, expected: str) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Bearer", "malformed"),
        ("Bearer ", "malformed"),
        ("Bearer    ", "malformed"),
        ("Basic abc", "malformed"),
        ("Bearerabc", "malformed"),
        ("Token abc", "malformed"),
        ("Bearer " + "x" * (MAX_TOKEN_LENGTH + 1), "malformed"),
    ],
)
def test_bad_authorization_headers(header: str | None, why: str) -> None:
    assert MAX_TOKEN_LENGTH == 8192
    with pytest.raises(Unauthenticated) as info:
        bearer_token(header)
    assert info.value.reason == why


# --- service clients ------------------------------------------------------------------


def test_client_tokens_are_256_random_bits_behind_the_prefix() -> None:
    tokens = {generate_client_token() for _ in range(20)}
    assert len(tokens) == 20
    for value in tokens:
        assert value.startswith("pgw_")
        assert len(value) == 4 + 43  # 32 bytes in unpadded URL-safe base64
        assert set(value[4:]) <= set(string.ascii_letters + string.digits + "-_")


def test_only_the_hash_of_a_token_is_looked_up() -> None:
    assert hash_token("pgw_abc") == hashlib.sha256(b"pgw_abc").digest()


async def test_a_known_client_token(lookups: list[bytes]) -> None:
    principal = await authenticate(CLIENT_TOKEN)
    assert principal == Principal(
        "client", "billing", frozenset({"portal_sessions:create", "reports:read"}), 600
    )
    assert principal.key == "client:billing"
    assert lookups == [hash_token(CLIENT_TOKEN)]


async def test_an_unknown_client_token(lookups: list[bytes]) -> None:
    assert await reason("pgw_nope") == "unknown_token"
    assert lookups == [hash_token("pgw_nope")]


async def test_a_jwt_is_never_looked_up_as_a_client(lookups: list[bytes]) -> None:
    assert await authenticate(token()) == USER
    assert lookups == []


# --- end users -----------------------------------------------------------------------


async def test_a_valid_token_is_the_user_of_its_sub() -> None:
    keys = Keys()
    principal = await authenticate(token(), keys=keys)
    assert principal == USER
    assert principal.key == "user:u_42"
    assert keys.asked == [("HS256", "k1")]


async def test_end_users_need_keys() -> None:
    with pytest.raises(Unauthenticated) as info:
        await Authenticator(SETTINGS, DB, None).authenticate(f"Bearer {token()}")  # type: ignore[arg-type]
    assert info.value.reason == "jwt_disabled"


BAD: dict[str, tuple[Callable[[], str], str]] = {
    "expired": (lambda: token(exp=int(time.time()) - 60), "jwt_expired"),
    "wrong_issuer": (lambda: token(iss="https://evil.example.com/"), "jwt_claims"),
    "wrong_audience": (lambda: token(aud="someone-else"), "jwt_claims"),
    "unknown_kid": (lambda: token(kid="k-unknown"), "jwt_unknown_key"),
    "no_kid": (lambda: token(kid=None), "jwt_unknown_key"),
    "other_algorithm": (lambda: token(alg="HS384"), "jwt_algorithm"),
    "alg_none": (lambda: unsigned({"alg": "none", "kid": "k1"}), "jwt_algorithm"),
    "no_alg": (lambda: unsigned({"kid": "k1"}), "jwt_algorithm"),
    "wrong_key": (lambda: token(key="another-secret-" * 3), "jwt_invalid"),
    "garbage": (lambda: "not-a-token", "jwt_invalid"),
    "missing_exp": (lambda: token(exp=None), "jwt_invalid"),
    "missing_iss": (lambda: token(iss=None), "jwt_invalid"),
    "missing_aud": (lambda: token(aud=None), "jwt_invalid"),
    "missing_sub": (lambda: token(sub=None), "jwt_invalid"),
    "not_yet_valid": (lambda: token(nbf=int(time.time()) + 600), "jwt_invalid"),
    "empty_sub": (lambda: token(sub=""), "jwt_invalid"),
    "long_sub": (lambda: token(sub="u" * 129), "jwt_invalid"),
    "long_lived": (lambda: token(exp=int(time.time()) + MAX_LIFETIME + 1), "jwt_lifetime"),
    "forever": (lambda: token(exp=10**400), "jwt_lifetime"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_each_bad_token_has_its_reason(case: str) -> None:
    make, why = BAD[case]
    assert await reason(make()) == why


@pytest.mark.parametrize("sub", ["u", "u" * 128])
async def test_sub_length_bounds(sub: str) -> None:
    assert (await authenticate(token(sub))).id == sub


async def test_expiry_has_a_leeway_of_30_seconds() -> None:
    assert auth.JWT_LEEWAY_SECONDS == 30
    assert await authenticate(token(exp=int(time.time()) - 15)) == USER
    assert await reason(token(exp=int(time.time()) - 45)) == "jwt_expired"


async def test_lifetime_is_exp_minus_iat_up_to_the_maximum() -> None:
    now = int(time.time())
    assert await authenticate(token(iat=now, exp=now + MAX_LIFETIME)) == USER
    assert await reason(token(iat=now, exp=now + MAX_LIFETIME + 1)) == "jwt_lifetime"
    # Minted long ago for long: refused even though only minutes are left.
    old = token(iat=now - MAX_LIFETIME, exp=now + 200)
    assert await reason(old) == "jwt_lifetime"


async def test_without_iat_the_lifetime_is_what_is_left_less_the_leeway() -> None:
    now = int(time.time())
    assert await authenticate(token(iat=None, exp=now + MAX_LIFETIME + 20)) == USER
    assert await reason(token(iat=None, exp=now + MAX_LIFETIME + 45)) == "jwt_lifetime"


# --- the header's typ, when JWT_REQUIRED_TYP asks for one -------------------------------


@pytest.mark.parametrize(
    ("required", "typ", "ok"),
    [
        ("at+jwt", "at+jwt", True),
        ("at+jwt", "AT+JWT", True),
        ("at+jwt", "application/at+jwt", True),
        ("at+jwt", " at+jwt ", True),
        ("application/AT+JWT", "at+jwt", True),
        ("at+jwt", "JWT", False),
        ("at+jwt", "at+jwt/application", False),
        ("at+jwt", "application/JWT", False),
        ("at+jwt", None, False),
        ("at+jwt", 123, False),
        ("at+jwt", ["at+jwt"], False),
    ],
)
async def test_a_required_typ(required: str, typ: object, ok: bool) -> None:
    settings = Settings.from_env({**BASE_ENV, "JWT_REQUIRED_TYP": required}, serving=False)
    value = token(typ=typ)
    if ok:
        assert await authenticate(value, settings) == USER
    else:
        assert await reason(value, settings) == "jwt_typ"


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", None, 123])
async def test_any_typ_when_none_is_required(typ: object) -> None:
    assert await authenticate(token(typ=typ)) == USER
