"""The benchmark's data: the id scheme, the mapping load (COPY) and the request pool.

One deterministic scheme maps our user ``u_<n>`` to its Stripe ids, so the
service finds them in Postgres and the floor (``floor.py``) computes the very
same ids with no database at all: both send Stripe the same form params.

The request pool is written once per run to a TSV file (``token<TAB>body``)
that both load generators read: wrk's Lua script (closed loop) and
``openloop.py`` (open loop). Every request names its ``user_id`` (allowed for
end users too when it equals the token's ``sub``), so the floor needs no JWT.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import orjson
from service.auth import generate_client_token, hash_token

from scheme import (
    ACTIVE_PLANS,
    CLIENT_NAME,
    CLIENT_RATE_LIMIT,
    JWT_AUDIENCE,
    JWT_ISSUER,
    LOCALES,
    OFFERS,
    PLANS,
    PROFILE,
    RETURN_ORIGIN,
    SUBSCRIPTION_REF,
    current_price,
    customer_id,
    item_id,
    subscription_id,
    user_id,
)


@dataclass(frozen=True)
class Credentials:
    client_token: str
    jwt_secret: str


async def load(conn: asyncpg.Connection, users: int) -> Credentials:
    """Load ``users`` customers with one active, updatable subscription each, plus
    plans, offers, the default portal profile and one service client. COPY, one
    transaction per table; the schema is the migrated one, indexes included."""
    await conn.execute("SET synchronous_commit = off")
    await conn.execute(
        "INSERT INTO portal_profiles (name, configuration_id, default_return_url, is_default)"
        " VALUES ($1, $2, $3, true)",
        *PROFILE,
    )
    # Self-serve, since half the pool are end users asking for plans and offers
    # (SPEC §5: for an end user anything else is an unknown name, a 404).
    await conn.executemany(
        "INSERT INTO plans (plan, stripe_price_id, active, self_serve) VALUES ($1, $2, $3, true)",
        [(plan, price, active) for plan, (price, active) in PLANS.items()],
    )
    await conn.executemany(
        "INSERT INTO offers (name, kind, stripe_id, self_serve) VALUES ($1, $2, $3, true)",
        [(name, kind, stripe) for name, (kind, stripe) in OFFERS.items()],
    )

    def customers() -> Iterator[tuple[Any, ...]]:
        for n in range(users):
            yield (user_id(n), customer_id(n), None, None, None)

    def subscriptions() -> Iterator[tuple[Any, ...]]:
        for n in range(users):
            yield (
                subscription_id(n),
                user_id(n),
                SUBSCRIPTION_REF,
                "active",
                item_id(n),
                current_price(n),
                n % 5 + 1,
            )

    await conn.copy_records_to_table(
        "customers",
        records=customers(),
        columns=["user_id", "stripe_customer_id", "stripe_account_id", "portal", "locale"],
    )
    await conn.copy_records_to_table(
        "subscriptions",
        records=subscriptions(),
        columns=[
            "stripe_subscription_id",
            "user_id",
            "external_ref",
            "status",
            "item_id",
            "price_id",
            "quantity",
        ],
    )
    token = generate_client_token()
    await conn.execute(
        "INSERT INTO api_clients (name, token_hash, scopes, rate_limit_per_minute)"
        " VALUES ($1, $2, $3, $4)",
        CLIENT_NAME,
        hash_token(token),
        ["portal_sessions:create"],
        CLIENT_RATE_LIMIT,
    )
    await conn.execute("ANALYZE")
    return Credentials(client_token=token, jwt_secret=secrets.token_urlsafe(48))


def make_jwts(secret: str, users: int, count: int, rng: random.Random) -> list[tuple[int, str]]:
    """``count`` HS256 tokens for distinct random users: (user number, token)."""
    now = int(time.time())
    numbers = rng.sample(range(users), min(count, users))
    return [
        (
            n,
            jwt.encode(
                {
                    "sub": user_id(n),
                    "iss": JWT_ISSUER,
                    "aud": JWT_AUDIENCE,
                    "iat": now,
                    "exp": now + 4 * 3600,
                },
                secret,
                algorithm="HS256",
            ),
        )
        for n in numbers
    ]


def make_body(n: int, rng: random.Random) -> dict[str, Any]:
    """One request body for user ``n``: the flow mix of the benchmark.

    30 % portal home, 20 % payment_method_update, 25 % subscription_cancel (half
    with a retention offer), 25 % subscription_update_confirm with a plan and/or
    a quantity (a third with a discount). Some carry a locale, a return URL or an
    after_completion redirect.
    """
    body: dict[str, Any] = {"user_id": user_id(n)}
    if rng.random() < 0.3:
        body["locale"] = rng.choice(LOCALES)
    if rng.random() < 0.3:
        body["return_url"] = f"{RETURN_ORIGIN}/billing?from=bench"
    roll = rng.random()
    if roll < 0.30:
        return body
    if roll < 0.50:
        flow: dict[str, Any] = {"type": "payment_method_update"}
        if rng.random() < 0.5:
            flow["after_completion"] = {
                "type": "redirect",
                "return_url": f"{RETURN_ORIGIN}/billing/done",
            }
    elif roll < 0.75:
        flow = {"type": "subscription_cancel"}
        if rng.random() < 0.5:
            flow["retention_offer"] = "stay-20"
    else:
        flow = {"type": "subscription_update_confirm"}
        what = rng.random()
        if what < 0.7:
            flow["plan"] = rng.choice(ACTIVE_PLANS)
        if what >= 0.4:
            flow["quantity"] = rng.randint(1, 50)
        if rng.random() < 0.33:
            flow["discount"] = rng.choice(tuple(OFFERS))
    body["flow"] = flow
    return body


def write_requests(
    path: Path,
    *,
    users: int,
    client_token: str,
    jwts: list[tuple[int, str]],
    count: int,
    rng: random.Random,
) -> dict[str, int]:
    """Write ``count`` requests, half service principal (any user), half end-user
    JWT (the pool's users). Returns how many of each principal and flow."""
    mix: dict[str, int] = {}
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            if rng.random() < 0.5:
                n, token, principal = rng.randrange(users), client_token, "client"
            else:
                n, token = rng.choice(jwts)
                principal = "user"
            body = make_body(n, rng)
            flow = body.get("flow", {}).get("type", "home")
            mix[principal] = mix.get(principal, 0) + 1
            mix[flow] = mix.get(flow, 0) + 1
            out.write(f"{token}\t{orjson.dumps(body).decode()}\n")
    return mix


def read_requests(path: Path) -> list[tuple[str, bytes]]:
    """The pool as (bearer token, JSON body) pairs."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        token, _, body = line.partition("\t")
        pairs.append((token, body.encode()))
    return pairs
