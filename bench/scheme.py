"""The id scheme shared by the loader and the floor: no database, no heavy imports.

User ``u_<n>`` has customer ``cus_bench<n>`` and one active subscription
``sub_bench<n>`` with the single item ``si_bench<n>``; plans, offers and the
default portal profile are fixed. ``dataset.py`` loads exactly this into
Postgres; ``floor.py`` computes it.
"""

from __future__ import annotations

RETURN_ORIGIN = "https://app.example.com"
DEFAULT_RETURN_URL = f"{RETURN_ORIGIN}/account"
PROFILE = ("default", "bpc_benchdefault", DEFAULT_RETURN_URL)  # name, configuration, return
# plan -> (price, active); the inactive one is never requested.
PLANS: dict[str, tuple[str, bool]] = {
    "basic-monthly": ("price_benchbasicmonthly", True),
    "pro-monthly": ("price_benchpromonthly", True),
    "pro-yearly": ("price_benchproyearly", True),
    "legacy": ("price_benchlegacy", False),
}
ACTIVE_PLANS = tuple(name for name, (_, active) in PLANS.items() if active)
# offer -> (kind, Stripe id)
OFFERS: dict[str, tuple[str, str]] = {
    "stay-20": ("coupon", "bench_stay20"),
    "spring-promo": ("promotion_code", "promo_benchspring"),
}
LOCALES = ("fr", "de", "en-GB", "es", "ja")
CLIENT_NAME = "bench"
# High enough never to trigger: the token bucket holds a minute's allowance.
CLIENT_RATE_LIMIT = 1_000_000_000
JWT_ISSUER = "https://id.bench.example"
JWT_AUDIENCE = "portal-gateway"
SUBSCRIPTION_REF = "main"


def user_id(n: int) -> str:
    return f"u_{n}"


def user_number(uid: str) -> int:
    return int(uid[2:])


def customer_id(n: int) -> str:
    return f"cus_bench{n}"


def subscription_id(n: int) -> str:
    return f"sub_bench{n}"


def item_id(n: int) -> str:
    return f"si_bench{n}"


def current_price(n: int) -> str:
    return PLANS[ACTIVE_PLANS[n % len(ACTIVE_PLANS)]][0]
