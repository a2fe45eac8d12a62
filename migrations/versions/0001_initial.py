"""Initial schema: id mappings, API clients, idempotency keys, audit, webhook events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Constraint names follow one convention so errors and migrations can name them:
pk__<table>, fk__<table>__<column>__<ref>, uq__<table>__<cols>, ix__<table>__<cols>,
ck__<table>__<what>.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row: whether this database maps Stripe test-mode or live-mode ids.
    op.execute(
        """
        CREATE TABLE deployment (
            singleton boolean NOT NULL DEFAULT true,
            livemode boolean NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk__deployment PRIMARY KEY (singleton),
            CONSTRAINT ck__deployment__singleton CHECK (singleton)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE portal_profiles (
            name text NOT NULL,
            configuration_id text,
            on_behalf_of text,
            default_return_url text,
            is_default boolean NOT NULL DEFAULT false,
            CONSTRAINT pk__portal_profiles PRIMARY KEY (name),
            CONSTRAINT ck__portal_profiles__configuration_id
                CHECK (configuration_id IS NULL OR configuration_id LIKE 'bpc\\_%'),
            CONSTRAINT ck__portal_profiles__on_behalf_of
                CHECK (on_behalf_of IS NULL OR on_behalf_of LIKE 'acct\\_%')
        )
        """
    )
    # At most one default profile.
    op.execute(
        "CREATE UNIQUE INDEX uq__portal_profiles__is_default ON portal_profiles (is_default)"
        " WHERE is_default"
    )
    op.execute(
        """
        CREATE TABLE customers (
            user_id text NOT NULL,
            stripe_customer_id text,
            stripe_account_id text,
            portal text,
            locale text,
            stale_at timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk__customers PRIMARY KEY (user_id),
            CONSTRAINT fk__customers__portal__portal_profiles FOREIGN KEY (portal)
                REFERENCES portal_profiles (name) ON UPDATE CASCADE ON DELETE SET NULL,
            CONSTRAINT ck__customers__one_stripe_id
                CHECK ((stripe_customer_id IS NULL) <> (stripe_account_id IS NULL)),
            CONSTRAINT ck__customers__stripe_customer_id
                CHECK (stripe_customer_id IS NULL OR stripe_customer_id LIKE 'cus\\_%'),
            CONSTRAINT ck__customers__stripe_account_id
                CHECK (stripe_account_id IS NULL OR stripe_account_id LIKE 'acct\\_%')
        )
        """
    )
    op.execute(
        "CREATE UNIQUE INDEX uq__customers__stripe_customer_id ON customers (stripe_customer_id)"
    )
    op.execute(
        "CREATE UNIQUE INDEX uq__customers__stripe_account_id ON customers (stripe_account_id)"
    )
    op.execute(
        """
        CREATE TABLE subscriptions (
            stripe_subscription_id text NOT NULL,
            user_id text NOT NULL,
            external_ref text,
            status text NOT NULL,
            item_id text,
            price_id text,
            quantity integer,
            last_event_at timestamptz,
            stale_at timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk__subscriptions PRIMARY KEY (stripe_subscription_id),
            CONSTRAINT fk__subscriptions__user_id__customers FOREIGN KEY (user_id)
                REFERENCES customers (user_id) ON DELETE CASCADE,
            CONSTRAINT uq__subscriptions__user_id__external_ref UNIQUE (user_id, external_ref),
            CONSTRAINT ck__subscriptions__stripe_subscription_id
                CHECK (stripe_subscription_id LIKE 'sub\\_%'),
            CONSTRAINT ck__subscriptions__item_id CHECK (item_id IS NULL OR item_id LIKE 'si\\_%'),
            CONSTRAINT ck__subscriptions__price_id
                CHECK (price_id IS NULL OR price_id LIKE 'price\\_%'),
            CONSTRAINT ck__subscriptions__quantity CHECK (quantity IS NULL OR quantity >= 0),
            CONSTRAINT ck__subscriptions__status CHECK (status IN (
                'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due',
                'canceled', 'unpaid', 'paused'))
        )
        """
    )
    op.execute("CREATE INDEX ix__subscriptions__user_id ON subscriptions (user_id)")
    op.execute(
        """
        CREATE TABLE plans (
            plan text NOT NULL,
            stripe_price_id text NOT NULL,
            active boolean NOT NULL DEFAULT true,
            CONSTRAINT pk__plans PRIMARY KEY (plan),
            CONSTRAINT ck__plans__stripe_price_id CHECK (stripe_price_id LIKE 'price\\_%')
        )
        """
    )
    op.execute(
        """
        CREATE TABLE offers (
            name text NOT NULL,
            kind text NOT NULL,
            stripe_id text NOT NULL,
            CONSTRAINT pk__offers PRIMARY KEY (name),
            CONSTRAINT ck__offers__kind CHECK (kind IN ('coupon', 'promotion_code')),
            CONSTRAINT ck__offers__promotion_code
                CHECK (kind <> 'promotion_code' OR stripe_id LIKE 'promo\\_%')
        )
        """
    )
    op.execute(
        """
        CREATE TABLE api_clients (
            id bigint GENERATED ALWAYS AS IDENTITY,
            name text NOT NULL,
            token_hash bytea NOT NULL,
            scopes text[] NOT NULL,
            rate_limit_per_minute integer NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz,
            CONSTRAINT pk__api_clients PRIMARY KEY (id),
            CONSTRAINT uq__api_clients__name UNIQUE (name),
            CONSTRAINT uq__api_clients__token_hash UNIQUE (token_hash),
            CONSTRAINT ck__api_clients__rate_limit CHECK (rate_limit_per_minute > 0)
        )
        """
    )
    # The upstream key is stored, not the response: a replay asks Stripe again
    # with the same key, so no portal URL (a bearer credential) rests here.
    op.execute(
        """
        CREATE TABLE idempotency_keys (
            principal text NOT NULL,
            key text NOT NULL,
            request_hash bytea NOT NULL,
            upstream_key text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL,
            CONSTRAINT pk__idempotency_keys PRIMARY KEY (principal, key)
        )
        """
    )
    op.execute("CREATE INDEX ix__idempotency_keys__expires_at ON idempotency_keys (expires_at)")
    op.execute(
        """
        CREATE TABLE audit_events (
            id bigint GENERATED ALWAYS AS IDENTITY,
            occurred_at timestamptz NOT NULL DEFAULT now(),
            request_id text NOT NULL,
            principal_type text NOT NULL,
            principal_id text NOT NULL,
            user_id text,
            action text NOT NULL,
            flow text,
            outcome text NOT NULL,
            http_status smallint NOT NULL,
            error_code text,
            stripe_customer_id text,
            stripe_session_id text,
            stripe_request_id text,
            client_ip inet,
            user_agent text,
            duration_ms double precision NOT NULL,
            detail jsonb,
            CONSTRAINT pk__audit_events PRIMARY KEY (id)
        )
        """
    )
    op.execute("CREATE INDEX ix__audit_events__occurred_at ON audit_events (occurred_at)")
    op.execute("CREATE INDEX ix__audit_events__user_id ON audit_events (user_id)")
    # Append-only, enforced by the database rather than by our good intentions.
    op.execute(
        """
        CREATE FUNCTION audit_events_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER tr__audit_events__append_only BEFORE UPDATE OR DELETE ON audit_events"
        " FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
    )
    op.execute(
        "CREATE TRIGGER tr__audit_events__no_truncate BEFORE TRUNCATE ON audit_events"
        " FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"
    )
    op.execute(
        """
        CREATE TABLE stripe_events (
            id text NOT NULL,
            type text NOT NULL,
            created timestamptz NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            result text NOT NULL,
            CONSTRAINT pk__stripe_events PRIMARY KEY (id),
            CONSTRAINT ck__stripe_events__id CHECK (id LIKE 'evt\\_%')
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE stripe_events")
    op.execute("DROP TABLE audit_events")
    op.execute("DROP FUNCTION audit_events_append_only()")
    op.execute("DROP TABLE idempotency_keys")
    op.execute("DROP TABLE api_clients")
    op.execute("DROP TABLE offers")
    op.execute("DROP TABLE plans")
    op.execute("DROP TABLE subscriptions")
    op.execute("DROP TABLE customers")
    op.execute("DROP TABLE portal_profiles")
    op.execute("DROP TABLE deployment")
