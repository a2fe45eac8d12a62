"""The request path's lookup: everything one portal request needs, in one round trip.

``RESOLVE`` fetches the customer, portal profile, plan, offer and subscriptions
of one user, with the items' ``self_serve`` flags (SPEC §5: the use case hides
what an end user may not name), and the facts of the profile's Stripe snapshot
the use case checks before calling Stripe (SPEC §12: active, the deep links'
features, the offered prices, the profile's Connect account); with a caller's
``Idempotency-Key`` it also claims the key in the same statement. Every lookup
goes through a primary key or unique index.

Without a key to claim, RESOLVE is a grouped statement (``grouping.py``): the
lookups of concurrent requests are answered by one statement, ``RESOLVE_BATCH``,
the same SELECT over a JSON array of their parameters (``jsonb_to_recordset``,
not ``unnest``: its row estimate does not depend on the array, so Postgres keeps
one generic plan instead of planning every batch anew, ~1 ms each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.db.clients import ClientRow
from service.db.grouping import GroupedStatement
from service.db.pool import Database

_RESOLVE_SELECT = """
SELECT
    c.user_id IS NOT NULL AS customer_found,
    c.stripe_customer_id, c.stripe_account_id, c.connected_account, c.locale AS customer_locale,
    c.stale_at IS NOT NULL AS customer_stale, c.portal AS customer_portal,
    prof.name AS profile_name, prof.configuration_id, prof.on_behalf_of,
    prof.default_return_url, prof.self_serve AS profile_self_serve,
    prof.is_default AS profile_is_default,
    prof.connected_account AS profile_connected_account,
    prof.snapshot IS NOT NULL AS profile_has_snapshot,
    prof.snapshot->>'active' = 'true' AS snapshot_active,
    prof.snapshot->'features'->'payment_method_update'->>'enabled' = 'true'
        AS snapshot_payment_method_update,
    prof.snapshot->'features'->'subscription_cancel'->>'enabled' = 'true'
        AS snapshot_subscription_cancel,
    prof.snapshot->'features'->'subscription_update'->>'enabled' = 'true'
        AS snapshot_subscription_update,
    jsonb_path_query_array(prof.snapshot, '$.features.subscription_update.products[*].prices[*]')
        AS snapshot_prices,
    pl.stripe_price_id AS plan_price_id, pl.active AS plan_active,
    pl.self_serve AS plan_self_serve,
    o.kind AS offer_kind, o.stripe_id AS offer_stripe_id, o.self_serve AS offer_self_serve,
    client.id AS client_id, client.name AS client_name, client.scopes AS client_scopes,
    client.rate_limit_per_minute AS client_rate_limit,
    CASE WHEN {with_subscriptions} THEN (
        SELECT json_agg(json_build_object(
            'id', s.stripe_subscription_id, 'ref', s.external_ref, 'status', s.status,
            'item_id', s.item_id, 'stale', s.stale_at IS NOT NULL)
            ORDER BY s.stripe_subscription_id)
        FROM subscriptions s WHERE s.user_id = {user_id}
    ) END AS subscriptions
    {idempotency_columns}
FROM {source}
LEFT JOIN customers c ON c.user_id = {user_id}
LEFT JOIN LATERAL (
    SELECT p.name FROM portal_profiles p WHERE p.name = coalesce({portal}, c.portal)
    UNION ALL
    SELECT p.name FROM portal_profiles p
    WHERE p.is_default AND {portal} IS NULL AND c.portal IS NULL
    LIMIT 1
) picked ON true
LEFT JOIN portal_profiles prof ON prof.name = picked.name
LEFT JOIN plans pl ON pl.plan = {plan}
LEFT JOIN offers o ON o.name = {offer}
LEFT JOIN api_clients client ON client.token_hash = {token_hash} AND client.revoked_at IS NULL
{order}"""

# One request's parameters: $1 user_id, $2 portal, $3 plan, $4 offer,
# $5 with_subscriptions, $6 token_hash.
_ONE = {
    "source": "(SELECT 1) AS one",
    "user_id": "$1::text",
    "portal": "$2::text",
    "plan": "$3::text",
    "offer": "$4::text",
    "with_subscriptions": "$5::boolean",
    "token_hash": "$6::bytea",
    "order": "",
}
# Many requests' parameters: $1 a JSON array of objects, one per request (see
# _batch_args), answered one row each in their order.
_MANY = {
    "source": (
        "jsonb_to_recordset($1::jsonb) AS r(caller int, user_id text, portal text,"
        " plan text, offer text, with_subscriptions boolean, token_hash text)"
    ),
    "user_id": "r.user_id",
    "portal": "r.portal",
    "plan": "r.plan",
    "offer": "r.offer",
    "with_subscriptions": "r.with_subscriptions",
    "token_hash": "decode(r.token_hash, 'hex')",
    "order": "ORDER BY r.caller",
}

# Formatted once at import from constants: no caller input reaches the SQL text.
RESOLVE = _RESOLVE_SELECT.format(idempotency_columns="", **_ONE)
RESOLVE_BATCH = _RESOLVE_SELECT.format(idempotency_columns="", **_MANY)


def _batch_args(callers: Sequence[Sequence[Any]]) -> list[Any]:
    """RESOLVE_BATCH's one parameter from the RESOLVE parameters of each caller."""
    return [
        [
            {
                "caller": n,
                "user_id": user_id,
                "portal": portal,
                "plan": plan,
                "offer": offer,
                "with_subscriptions": with_subscriptions,
                "token_hash": None if token_hash is None else token_hash.hex(),
            }
            for n, (user_id, portal, plan, offer, with_subscriptions, token_hash) in enumerate(
                callers
            )
        ]
    ]


RESOLVE_GROUPED = GroupedStatement(
    "resolve", RESOLVE, RESOLVE_BATCH, batch_args=_batch_args, returns_rows=True
)

# The caller's Idempotency-Key is claimed in the same round trip. An expired
# key is taken over with a fresh upstream key, so an old replay starts a new
# session instead of handing back an expired URL.
RESOLVE_WITH_IDEMPOTENCY = """
WITH claim AS (
    INSERT INTO idempotency_keys AS k (principal, key, request_hash, upstream_key, expires_at)
    SELECT $7::text, $8::text, $9::bytea, $10::text, now() + make_interval(secs => $11::float8)
    -- A client token confirmed here must still be active: a revoked one claims nothing.
    WHERE $6::bytea IS NULL
        OR EXISTS (SELECT 1 FROM api_clients WHERE token_hash = $6 AND revoked_at IS NULL)
    ON CONFLICT (principal, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, upstream_key = EXCLUDED.upstream_key,
            created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE k.expires_at <= now()
    RETURNING request_hash, upstream_key
), existing AS (
    SELECT request_hash, upstream_key FROM idempotency_keys WHERE principal = $7 AND key = $8
)
""" + _RESOLVE_SELECT.format(
    **_ONE,
    idempotency_columns=""",
    coalesce((SELECT request_hash FROM claim), (SELECT request_hash FROM existing))
        AS idem_request_hash,
    coalesce((SELECT upstream_key FROM claim), (SELECT upstream_key FROM existing))
        AS idem_upstream_key""",
)


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    principal: str
    key: str
    request_hash: bytes
    upstream_key: str
    ttl_seconds: int


async def resolve(
    db: Database,
    *,
    user_id: str,
    portal: str | None,
    plan: str | None,
    offer: str | None,
    with_subscriptions: bool,
    claim: IdempotencyClaim | None,
    token_hash: bytes | None = None,
) -> dict[str, Any]:
    """Everything needed to build the Stripe call for one user, as one row.

    With ``token_hash`` (a client token served from the authenticator's cache),
    the row also has that token's client if it is still active (``client_id``,
    ``client_name``, ``client_scopes``, ``client_rate_limit``; NULL once revoked):
    revocation is seen by the very next request, in the same round trip.
    """
    args: list[Any] = [user_id, portal, plan, offer, with_subscriptions, token_hash]
    if claim is None:
        # Shared with the lookups of concurrent requests: one statement for them all.
        row = await db.run_grouped(RESOLVE_GROUPED, args)
    else:
        args += [
            claim.principal,
            claim.key,
            claim.request_hash,
            claim.upstream_key,
            float(claim.ttl_seconds),
        ]
        row = await db.fetchrow("resolve_idempotent", RESOLVE_WITH_IDEMPOTENCY, *args)
        revoked = token_hash is not None and row is not None and row["client_id"] is None
        if row is not None and row["idem_request_hash"] is None and not revoked:
            # A concurrent request claimed the key after our snapshot was taken;
            # a second statement sees its row.
            row = await db.fetchrow("resolve_idempotent", RESOLVE_WITH_IDEMPOTENCY, *args)
    assert row is not None  # the query always yields exactly one row
    return dict(row)


def client_of(row: dict[str, Any]) -> ClientRow | None:
    """The client RESOLVE read for its ``token_hash``; None if the token is revoked."""
    if row["client_id"] is None:
        return None
    return ClientRow(
        row["client_id"], row["client_name"], tuple(row["client_scopes"]), row["client_rate_limit"]
    )


PURGE_IDEMPOTENCY = "DELETE FROM idempotency_keys WHERE expires_at < now() - interval '1 hour'"


async def purge_expired_idempotency_keys(db: Database) -> int:
    """Drop keys long past their TTL; returns how many."""
    status = await db.execute("purge_idempotency", PURGE_IDEMPOTENCY)
    return int(status.split()[-1])
