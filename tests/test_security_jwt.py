"""End-user JWTs, attacked the way an attacker would: every bad token is the same 401.

The identity provider's JWKS is served by a real aiohttp server in the test,
and rotates keys mid-test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service import keys
from service.auth import JWT_CACHE_SECONDS, JWT_LEEWAY_SECONDS, trusted_until
from tests.conftest import Standin
from tests.helpers import created, post_session, problem

pytestmark = pytest.mark.usefixtures("world")
ISSUER = "https://id.example.com/"
AUDIENCE = "portal-gateway"


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY_1 = _rsa()
KEY_2 = _rsa()


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": "RS256"}


@dataclass
class IdentityProvider:
    """A JWKS endpoint whose key set the test can change; counts fetches."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    url: str = ""


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    provider = IdentityProvider(keys=[_jwk(KEY_1, "k1")])

    async def jwks(request: web.Request) -> web.Response:
        provider.fetches += 1
        return web.json_response({"keys": provider.keys})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    provider.url = str(server.make_url("/.well-known/jwks.json"))
    try:
        yield provider
    finally:
        await server.close()


def token_for(
    sub: str = "u_42",
    *,
    key: Any = KEY_1,
    kid: str | None = "k1",
    alg: str = "RS256",
    **claims: Any,
) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "u_42", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, **extra}


@pytest.fixture
async def jwt_service(make_service: Any, idp: IdentityProvider) -> Any:
    return await make_service(
        JWT_JWKS_URL=idp.url,
        JWT_ISSUER=ISSUER,
        JWT_AUDIENCE=AUDIENCE,
        JWT_ALGORITHMS="RS256",
        JWT_JWKS_MIN_REFRESH_SECONDS="0",
    )


async def test_user_opens_own_portal_without_user_id(jwt_service: Any, standin: Standin) -> None:
    body = await created(await post_session(jwt_service, {}, token_for()))
    assert body["user_id"] == "u_42"
    assert standin.requests()[0].params["customer"] == "cus_42"


async def test_user_id_may_repeat_own_sub(jwt_service: Any) -> None:
    await created(await post_session(jwt_service, {"user_id": "u_42"}, token_for()))


async def test_user_cannot_act_for_another_user(jwt_service: Any, standin: Standin) -> None:
    await problem(
        await post_session(jwt_service, {"user_id": "u_7"}, token_for()), 403, "forbidden_user"
    )
    assert standin.requests() == []


def _public_pem() -> bytes:
    return KEY_1.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


BAD_TOKENS = {
    "expired": lambda: token_for(exp=int(time.time()) - 120),
    "not_yet_valid": lambda: token_for(nbf=int(time.time()) + 600),
    "issued_in_future": lambda: token_for(iat=int(time.time()) + 600),
    "wrong_issuer": lambda: token_for(iss="https://evil.example.com/"),
    "wrong_audience": lambda: token_for(aud="someone-else"),
    "missing_exp": lambda: token_for(exp=None),
    "missing_sub": lambda: token_for(sub=None),
    "alg_none": lambda: _forge({"alg": "none", "kid": "k1"}, _claims(), None),
    "hs256_with_public_key": lambda: _forge(
        {"alg": "HS256", "kid": "k1", "typ": "JWT"}, _claims(), _public_pem()
    ),
    "tampered_payload": lambda: (
        lambda parts: f"{parts[0]}.{_b64(json.dumps(_claims(sub='u_7')).encode())}.{parts[2]}"
    )(token_for().split(".")),
    "unknown_kid": lambda: token_for(key=KEY_2, kid="k-unknown"),
    "signed_by_other_key_with_known_kid": lambda: token_for(key=KEY_2, kid="k1"),
    "no_kid": lambda: token_for(kid=None),
    "valid_for_ten_years": lambda: token_for(exp=int(time.time()) + 10 * 365 * 86400),
    "valid_for_two_days_without_iat": lambda: token_for(iat=None, exp=int(time.time()) + 2 * 86400),
    "garbage": lambda: "not-a-token",
    "three_dots_garbage": lambda: "eyJ.eyJ.x",
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_tokens_are_one_uniform_401(
    jwt_service: Any, standin: Standin, case: str
) -> None:
    body = await problem(
        await post_session(jwt_service, {"user_id": "u_42"}, BAD_TOKENS[case]()),
        401,
        "unauthenticated",
    )
    assert {k: v for k, v in body.items() if k != "request_id"} == {
        "type": "about:blank",
        "title": "Unauthorized",
        "status": 401,
        "code": "unauthenticated",
        "detail": "A valid bearer token is required.",
    }
    assert standin.requests() == []


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Token abc", "bearer"])
async def test_empty_or_malformed_authorization(jwt_service: Any, header: str) -> None:
    resp = await jwt_service.post(
        "/v1/portal-sessions",
        data=b"{}",
        headers={"Authorization": header, "Content-Type": "application/json"},
    )
    await problem(resp, 401, "unauthenticated")


async def test_key_rotation_is_picked_up(jwt_service: Any, idp: IdentityProvider) -> None:
    await created(await post_session(jwt_service, {}, token_for()))
    # The provider rotates: k2 is published, k1 withdrawn.
    idp.keys = [_jwk(KEY_2, "k2")]
    await created(await post_session(jwt_service, {}, token_for(key=KEY_2, kid="k2")))
    assert idp.fetches == 2


async def test_garbage_kids_do_not_hammer_the_provider(
    make_service: Any, idp: IdentityProvider
) -> None:
    service = await make_service(
        JWT_JWKS_URL=idp.url, JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE, JWT_ALGORITHMS="RS256"
    )
    await created(await post_session(service, {}, token_for()))
    for i in range(30):
        await problem(
            await post_session(service, {}, token_for(key=KEY_2, kid=f"junk-{i}")),
            401,
            "unauthenticated",
        )
    assert idp.fetches == 1  # the refresh bound (30 s by default) holds


async def test_hmac_secret_mode_and_algorithm_confusion(make_service: Any) -> None:
    secret = "s" * 40
    service = await make_service(
        JWT_HS256_SECRET=secret, JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE, JWT_ALGORITHMS="HS256"
    )
    await created(await post_session(service, {}, token_for(key=secret, alg="HS256", kid=None)))
    # An RS256 token is refused when only HS256 is allowed, and vice versa a
    # token MACed with some public key is just a wrong MAC.
    await problem(await post_session(service, {}, token_for()), 401, "unauthenticated")
    forged = _forge({"alg": "HS256"}, _claims(), _public_pem())
    await problem(await post_session(service, {}, forged), 401, "unauthenticated")


async def test_public_key_file_mode(make_service: Any, tmp_path: Any) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(_public_pem())
    service = await make_service(
        JWT_PUBLIC_KEY_FILE=str(pem), JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE
    )
    await created(await post_session(service, {}, token_for(kid=None)))
    await problem(
        await post_session(service, {}, token_for(key=KEY_2, kid=None)), 401, "unauthenticated"
    )


async def test_jwt_refused_when_end_users_are_not_configured(service: Any) -> None:
    await problem(await post_session(service, {}, token_for()), 401, "unauthenticated")


async def test_auth_failures_counted_by_reason(jwt_service: Any) -> None:
    await post_session(jwt_service, {}, token_for(exp=int(time.time()) - 120))
    await post_session(jwt_service, {}, "pgw_nope")
    text = await (await jwt_service.get("/metrics")).text()
    assert 'portal_gateway_auth_failures_total{reason="jwt_expired"} 1.0' in text
    assert 'portal_gateway_auth_failures_total{reason="unknown_token"} 1.0' in text


def _auth_failures(service: Any, reason: str) -> float:
    value = service.app[keys.METRICS].registry.get_sample_value(
        "portal_gateway_auth_failures_total", {"reason": reason}
    )
    return value or 0.0


async def test_lifetime_is_bounded_by_jwt_max_lifetime_seconds(make_service: Any) -> None:
    service = await make_service(
        JWT_HS256_SECRET="s" * 40,
        JWT_ISSUER=ISSUER,
        JWT_AUDIENCE=AUDIENCE,
        JWT_ALGORITHMS="HS256",
        JWT_MAX_LIFETIME_SECONDS="600",
    )

    def hs256(**claims: Any) -> str:
        return token_for(key="s" * 40, alg="HS256", kid=None, **claims)

    now = int(time.time())
    # exp - iat: exactly the limit passes, a second more does not, however young the token.
    await created(await post_session(service, {}, hs256(iat=now, exp=now + 600)))
    refused = hs256(iat=now, exp=now + 601)
    await problem(await post_session(service, {}, refused), 401, "unauthenticated")
    # Without iat the lifetime left (exp - now) counts.
    await created(await post_session(service, {}, hs256(iat=None, exp=now + 300)))
    refused = hs256(iat=None, exp=now + 3600)
    await problem(await post_session(service, {}, refused), 401, "unauthenticated")
    # An old token with a little time left is still one minted for too long.
    old = hs256(iat=now - 3000, exp=now + 60)
    await problem(await post_session(service, {}, old), 401, "unauthenticated")
    assert _auth_failures(service, "jwt_lifetime") == 3


async def test_default_max_lifetime_refuses_a_ten_year_token(jwt_service: Any) -> None:
    now = int(time.time())
    await created(await post_session(jwt_service, {}, token_for(iat=now, exp=now + 86400)))
    ten_years = token_for(iat=now, exp=now + 10 * 365 * 86400)
    await problem(await post_session(jwt_service, {}, ten_years), 401, "unauthenticated")
    assert _auth_failures(jwt_service, "jwt_lifetime") == 1


def _typed(typ: str | None) -> str:
    now = int(time.time())
    payload = {"sub": "u_42", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    # PyJWT writes typ "JWT" unless told otherwise; None leaves typ out.
    return jwt.encode(payload, KEY_1, algorithm="RS256", headers={"kid": "k1", "typ": typ})


async def test_jwt_required_typ_must_match_the_header(
    make_service: Any, idp: IdentityProvider
) -> None:
    service = await make_service(
        JWT_JWKS_URL=idp.url,
        JWT_ISSUER=ISSUER,
        JWT_AUDIENCE=AUDIENCE,
        JWT_ALGORITHMS="RS256",
        JWT_REQUIRED_TYP="at+jwt",
    )
    # An ID token (typ JWT) or an untyped one is not an access token.
    for typ in ("JWT", None, "at+jwt-not", "application/jwt"):
        body = await problem(await post_session(service, {}, _typed(typ)), 401, "unauthenticated")
        assert body["detail"] == "A valid bearer token is required."
    assert _auth_failures(service, "jwt_typ") == 4
    assert idp.fetches == 0  # refused before any key lookup
    # A media type: case-insensitive, with or without its application/ prefix (RFC 7515).
    for typ in ("at+jwt", "AT+JWT", "application/at+jwt"):
        await created(await post_session(service, {}, _typed(typ)))


async def test_typ_is_not_checked_unless_required(jwt_service: Any) -> None:
    for typ in ("JWT", None, "at+jwt"):
        await created(await post_session(jwt_service, {}, _typed(typ)))


async def test_a_cached_jwt_is_the_exact_token_verified(jwt_service: Any) -> None:
    """Verified tokens are remembered for a while (auth.JWT_CACHE_SECONDS), keyed by
    the whole token: any other bytes, a forged signature included, are verified."""
    token = token_for()
    await created(await post_session(jwt_service, {}, token))
    header, payload, signature = token.split(".")
    forged_payload = _b64(json.dumps(_claims(sub="u_7")).encode())
    for forged in (
        f"{header}.{forged_payload}.{signature}",
        f"{header}.{payload}.{signature[:-2]}AA",
        token + "x",
    ):
        await problem(await post_session(jwt_service, {}, forged), 401, "unauthenticated")
    await created(await post_session(jwt_service, {}, token))


def test_a_verified_jwt_is_trusted_for_a_minute_at_most_and_never_past_exp() -> None:
    now = 1_800_000_000.0
    assert trusted_until(now, now + 3600) == now + JWT_CACHE_SECONDS
    assert trusted_until(now, now + 5) == now + 5 + JWT_LEEWAY_SECONDS
    assert trusted_until(now, now - JWT_LEEWAY_SECONDS) == now  # already gone: not kept
