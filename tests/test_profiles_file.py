"""The profiles file (SPEC §12): every problem is named by its line, a good file resolves.

Each bad file below marks the line its error must name with ``# <-``; the file
is read against a real database whose plans table holds ``pro-monthly`` and
``pro-yearly`` (active) and ``legacy`` (inactive).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service.config import Settings
from service.db.demo import seed_demo
from service.db.pool import Database
from service.demo import DEMO_ORIGIN, DEMO_RETURN_URL
from service.profiles_file import (
    ProfilesFileError,
    ProfileSpec,
    content_hash,
    load_profiles,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "profiles.example.yaml"
FILE = "profiles.yaml"

PLANS = [
    ("pro-monthly", "price_pro_monthly", True),
    ("pro-yearly", "price_pro_yearly", True),
    ("legacy", "price_legacy", False),
]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": database_url, "RETURN_URL_ALLOWLIST": "https://app.example.com"},
        serving=False,
    )


@pytest.fixture
async def db(database_url: str, conn: asyncpg.Connection) -> AsyncIterator[Database]:
    await conn.executemany(
        "INSERT INTO plans (plan, stripe_price_id, active) VALUES ($1, $2, $3)", PLANS
    )
    database = await Database.connect(database_url)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def load(db: Database, settings: Settings, tmp_path: Path) -> Any:
    """Write ``text`` to profiles.yaml and load it."""

    async def load_text(text: str, **changes: object) -> list[ProfileSpec]:
        path = tmp_path / FILE
        path.write_text(text, encoding="utf-8")
        return await load_profiles(path, db, settings.replace(**changes) if changes else settings)

    return load_text


VALID = """\
# Two profiles; the second one resolves plan names.
profiles:
  - name: default
    default: true
    on_behalf_of: null
    default_return_url: https://app.example.com/account
    configuration:
      business_profile:
        headline: Manage your plan
        privacy_policy_url: https://example.com/privacy
        terms_of_service_url: null
      features:
        invoice_history: {enabled: true}
        payment_method_update: {enabled: true}
        customer_update: {enabled: true, allowed_updates: [email, address]}
        subscription_cancel:
          enabled: true
          mode: at_period_end
          proration_behavior: none
          cancellation_reason: {enabled: true, options: [too_expensive, other]}
      login_page: {enabled: false}
  - name: pro
    self_serve: true
    connected_account: acct_1Connected
    configuration:
      name: Pro portal
      features:
        subscription_update:
          enabled: true
          default_allowed_updates: [price, quantity]
          proration_behavior: create_prorations
          products:
            - product: prod_Pro
              prices: [pro-monthly, pro-yearly, price_1Direct]
              adjustable_quantity: {enabled: true, minimum: 1, maximum: 10}
          schedule_at_period_end: {conditions: [{type: decreasing_item_amount}]}
          trial_update_behavior: end_trial
"""


async def test_a_valid_file_resolves_plan_names_through_the_plans_table(load: Any) -> None:
    default, pro = await load(VALID)
    assert default == ProfileSpec(
        name="default",
        default=True,
        self_serve=False,
        on_behalf_of=None,
        connected_account=None,
        default_return_url="https://app.example.com/account",
        configuration={
            "business_profile": {
                "headline": "Manage your plan",
                "privacy_policy_url": "https://example.com/privacy",
            },
            "features": {
                "invoice_history": {"enabled": True},
                "payment_method_update": {"enabled": True},
                "customer_update": {"enabled": True, "allowed_updates": ["email", "address"]},
                "subscription_cancel": {
                    "enabled": True,
                    "mode": "at_period_end",
                    "proration_behavior": "none",
                    "cancellation_reason": {
                        "enabled": True,
                        "options": ["too_expensive", "other"],
                    },
                },
            },
            "login_page": {"enabled": False},
            # The profile's return URL is the configuration's too.
            "default_return_url": "https://app.example.com/account",
        },
        line=3,
    )
    assert (pro.name, pro.default, pro.self_serve) == ("pro", False, True)
    assert (pro.connected_account, pro.default_return_url, pro.line) == (
        "acct_1Connected",
        None,
        22,
    )
    assert pro.configuration == {
        "name": "Pro portal",
        "features": {
            "subscription_update": {
                "enabled": True,
                "default_allowed_updates": ["price", "quantity"],
                "proration_behavior": "create_prorations",
                "products": [
                    {
                        "product": "prod_Pro",
                        # Plan names became their price ids; a price_ id is taken as is.
                        "prices": ["price_pro_monthly", "price_pro_yearly", "price_1Direct"],
                        "adjustable_quantity": {"enabled": True, "minimum": 1, "maximum": 10},
                    }
                ],
                "schedule_at_period_end": {"conditions": [{"type": "decreasing_item_amount"}]},
                "trial_update_behavior": "end_trial",
            }
        },
    }


async def test_a_plan_price_change_in_the_database_changes_the_resolved_configuration(
    load: Any, conn: asyncpg.Connection
) -> None:
    before = (await load(VALID))[1]
    await conn.execute(
        "UPDATE plans SET stripe_price_id = 'price_pro_v2' WHERE plan = 'pro-yearly'"
    )
    after = (await load(VALID))[1]
    prices = after.configuration["features"]["subscription_update"]["products"][0]["prices"]
    assert prices == ["price_pro_monthly", "price_pro_v2", "price_1Direct"]
    assert content_hash(after) != content_hash(before)


async def test_an_empty_profiles_list_is_valid(load: Any) -> None:
    assert await load("profiles: []\n") == []


# --- the content hash ---------------------------------------------------------

# VALID's first profile again: keys in another order, flow style, other comments.
REORDERED = """\
profiles:
- configuration:   # what Stripe gets
    login_page: {enabled: false}
    features:
      subscription_cancel: {cancellation_reason: {options: [too_expensive, other], enabled: true},
                            proration_behavior: none, mode: at_period_end, enabled: true}
      customer_update: {allowed_updates: [email, address], enabled: true}
      payment_method_update: {enabled: true}
      invoice_history: {enabled: true}
    business_profile: {privacy_policy_url: "https://example.com/privacy",
                       headline: 'Manage your plan'}
  default_return_url: "https://app.example.com/account"
  default: true
  name: default
"""


async def test_the_content_hash_ignores_key_order_style_and_comments(load: Any) -> None:
    (first,) = await load(REORDERED)
    original = (await load(VALID))[0]
    assert first.configuration == original.configuration
    assert content_hash(first) == content_hash(original)
    # sha256 of the canonical JSON (sorted keys, no spaces), computed independently.
    canonical = json.dumps(original.configuration, sort_keys=True, separators=(",", ":"))
    assert content_hash(original) == hashlib.sha256(canonical.encode()).hexdigest()
    assert len(content_hash(original)) == 64


async def test_the_content_hash_changes_with_the_content(load: Any) -> None:
    original = (await load(VALID))[0]
    changed = (await load(VALID.replace("Manage your plan", "Manage your plans")))[0]
    assert content_hash(changed) != content_hash(original)
    # Only the configuration counts: self_serve is ours, not Stripe's.
    serve = (await load(VALID.replace("default: true", "default: true\n    self_serve: true")))[0]
    assert serve.self_serve
    assert content_hash(serve) == content_hash(original)


# --- the example ----------------------------------------------------------------


async def test_the_example_file_validates_against_the_demo_data(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": database_url, "RETURN_URL_ALLOWLIST": DEMO_ORIGIN}, serving=False
    )
    db = await Database.connect(database_url)
    try:
        await seed_demo(db, DEMO_RETURN_URL)
        specs = await load_profiles(EXAMPLE, db, settings)
    finally:
        await db.close()
    assert [(s.name, s.default, s.self_serve) for s in specs] == [
        ("default", True, False),
        ("pro", False, True),
    ]
    pro = specs[1].configuration["features"]["subscription_update"]
    assert [p["prices"] for p in pro["products"]] == [["price_basic_monthly"], ["price_pro_yearly"]]
    assert all(s.default_return_url == DEMO_RETURN_URL for s in specs)
    assert all("metadata" not in s.configuration for s in specs)


# --- every problem, with its line ------------------------------------------------


def profile(configuration: str, *, head: str = "") -> str:
    """A one-profile file; ``configuration`` is indented under ``configuration:``."""
    body = "".join(f"      {line}\n" for line in configuration.strip("\n").splitlines())
    return (
        f"profiles:\n  - name: p\n{head}    configuration:\n      features:\n"
        f"        invoice_history: {{enabled: true}}\n{body}"
    )


def features(text: str) -> str:
    """A one-profile file with ``text`` added under ``features:``."""
    return profile("".join(f"  {line}\n" for line in text.strip("\n").splitlines()))


def products(count: int) -> str:
    entries = ", ".join(f"{{product: prod_{i}, prices: [price_{i}]}}" for i in range(count))
    return features(f"subscription_update: {{enabled: true, products: [{entries}]}}  # <-")


# A minimal valid configuration, as the one line under a profile.
CONF = "    configuration: {features: {invoice_history: {enabled: true}}}\n"
TWO = "profiles:\n  - name: a\n" + CONF

BAD_FILES = {
    "unknown profile key": (
        "profiles:\n  - name: p\n    colour: red  # <-\n" + CONF,
        "colour: unknown key",
    ),
    "unknown top-level key": (
        "profiles: []\nprofile: []  # <-\n",
        "profile: unknown key",
    ),
    "unknown key deep down": (
        features("payment_method_update: {enabled: true, show_cards: true}  # <-"),
        "configuration.features.payment_method_update.show_cards: unknown key",
    ),
    "unknown feature": (
        features("subscription_resume: {enabled: true}  # <-"),
        "configuration.features.subscription_resume: unknown key",
    ),
    "later version: subscription_pause": (
        features("subscription_pause: {enabled: true}  # <-"),
        "subscription_pause: not a parameter of Stripe API version 2025-09-30.clover",
    ),
    "later version: payment_method_configuration": (
        features(
            "payment_method_update:\n  enabled: true\n  payment_method_configuration: pmc_1  # <-"
        ),
        "(payment_method_configuration came in a later version)",
    ),
    "later version: feedback_options": (
        features(
            "subscription_cancel:\n  enabled: true\n  cancellation_reason:\n    enabled: true\n"
            "    options: [other]\n    feedback_options: [other]  # <-"
        ),
        "(feedback_options came in a later version)",
    ),
    "later version: billing_cycle_anchor": (
        features("subscription_update:\n  enabled: true\n  billing_cycle_anchor: now  # <-"),
        "(billing_cycle_anchor came in a later version)",
    ),
    "metadata is ours": (
        profile("metadata: {team: billing}  # <-"),
        "configuration.metadata: not allowed here: apply writes",
    ),
    "active is apply's": (
        profile("active: false  # <-"),
        "configuration.active: not set in the file",
    ),
    "default_return_url belongs on the profile": (
        profile("default_return_url: https://app.example.com/x  # <-"),
        "set default_return_url on the profile",
    ),
    "a quoted boolean": (
        features('customer_update: {enabled: "true"}  # <-'),
        "customer_update.enabled: must be true or false (got a string)",
    ),
    "a string where a mapping goes": (
        profile("login_page: enabled  # <-"),
        "configuration.login_page: must be a mapping (got a string)",
    ),
    "a mapping where a list goes": (
        features("customer_update: {enabled: true, allowed_updates: {email: true}}  # <-"),
        "allowed_updates: must be a list (got a mapping)",
    ),
    "an integer name": (
        "profiles:\n  - name: 42  # <-\n" + CONF,
        "name: must be a string (got an integer)",
    ),
    "enum: cancel mode": (
        features("subscription_cancel: {enabled: true, mode: someday}  # <-"),
        "mode: must be one of at_period_end, immediately (got 'someday')",
    ),
    "enum: allowed update": (
        features("customer_update: {enabled: true, allowed_updates: [email, birthday]}  # <-"),
        "allowed_updates[1]: must be one of address, email, name, phone, shipping, tax_id",
    ),
    "enum: cancellation reason": (
        features(
            "subscription_cancel:\n  enabled: true\n  cancellation_reason:\n    enabled: true\n"
            "    options:\n      - other\n      - too_pricey  # <-"
        ),
        "options[1]: must be one of customer_service",
    ),
    "enum: update proration": (
        features("subscription_update: {enabled: true, proration_behavior: sometimes}  # <-"),
        "subscription_update.proration_behavior: must be one of always_invoice",
    ),
    "enum: schedule condition": (
        features(
            "subscription_update:\n  enabled: true\n  schedule_at_period_end:\n"
            "    conditions: [{type: always}]  # <-"
        ),
        "conditions[0].type: must be one of decreasing_item_amount, shortening_interval",
    ),
    "enum: trial update behavior": (
        features("subscription_update: {enabled: true, trial_update_behavior: pause}  # <-"),
        "trial_update_behavior: must be one of continue_trial, end_trial",
    ),
    "a value listed twice": (
        features("customer_update: {enabled: true, allowed_updates: [email, email]}  # <-"),
        "allowed_updates: email is listed twice",
    ),
    "more than 10 products": (
        products(11),
        "products: at most 10 entries allowed (got 11)",
    ),
    "headline over 60 characters": (
        profile(f"business_profile: {{headline: {'x' * 61}}}  # <-"),
        "business_profile.headline: must be at most 60 characters (got 61)",
    ),
    "empty headline": (
        profile('business_profile: {headline: ""}  # <-'),
        "headline: must not be empty",
    ),
    "create_prorations when cancelling at period end": (
        features(
            "subscription_cancel:\n  enabled: true\n  proration_behavior: create_prorations  # <-"
        ),
        "create_prorations needs mode: immediately",
    ),
    "always_invoice when cancelling": (
        features(
            "subscription_cancel:\n  enabled: true\n  mode: immediately\n"
            "  proration_behavior: always_invoice  # <-"
        ),
        "always_invoice is not allowed for cancellation",
    ),
    "unknown plan": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n    - product: prod_Pro\n"
            "      prices:\n        - pro-yearly\n        - platinum  # <-"
        ),
        "unknown plan 'platinum' (not in the plans table)",
    ),
    "inactive plan": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n"
            "    - {product: prod_Old, prices: [legacy]}  # <-"
        ),
        "plan 'legacy' is not active",
    ),
    "the same price twice once resolved": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n    - product: prod_Pro\n"
            "      prices:\n        - price_pro_yearly\n        - pro-yearly  # <-"
        ),
        "prices: price_pro_yearly is listed twice (first on line",
    ),
    "the same price id twice": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n"
            "    - {product: prod_Pro, prices: [price_a, price_b, price_a]}  # <-"
        ),
        "prices: price_a is listed twice (first on line",
    ),
    "no prices": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n"
            "    - {product: prod_Pro, prices: []}  # <-"
        ),
        "prices: must name at least one plan or price",
    ),
    "the same product twice": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n"
            "    - {product: prod_Pro, prices: [pro-yearly]}\n"
            "    - {product: prod_Pro, prices: [pro-monthly]}  # <-"
        ),
        "products: prod_Pro is listed twice",
    ),
    "a product id without prod_": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n"
            "    - {product: price_Pro, prices: [pro-yearly]}  # <-"
        ),
        "products[0].product: must be an id starting with prod_ (got 'price_Pro')",
    ),
    "a malformed price id": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n"
            "    - {product: prod_Pro, prices: [price_pro-yearly]}  # <-"
        ),
        "prices[0]: must be price_ followed by",
    ),
    "on_behalf_of without acct_": (
        profile("", head="    on_behalf_of: cus_123  # <-\n"),
        "on_behalf_of: must be an id starting with acct_ (got 'cus_123')",
    ),
    "connected_account with a bad tail": (
        profile("", head="    connected_account: acct_1 2  # <-\n"),
        "connected_account: must be acct_ followed by",
    ),
    "adjustable quantity upside down": (
        features(
            "subscription_update:\n  enabled: true\n  products:\n"
            "    - product: prod_Pro\n      prices: [pro-yearly]\n"
            "      adjustable_quantity: {enabled: true, minimum: 5, maximum: 2}  # <-"
        ),
        "adjustable_quantity: minimum (5) must not be above maximum (2)",
    ),
    "return URL outside the allowlist": (
        profile("", head="    default_return_url: https://evil.example.net/x  # <-\n"),
        "default_return_url: its origin is not in the allowlist",
    ),
    "return URL over http": (
        profile("", head="    default_return_url: http://app.example.com/x  # <-\n"),
        "default_return_url: only https URLs are allowed",
    ),
    "return URL with userinfo": (
        profile("", head="    default_return_url: https://app.example.com@evil.net/  # <-\n"),
        "default_return_url: must not contain user information",
    ),
    "privacy policy over http": (
        profile("business_profile: {privacy_policy_url: 'http://example.com/privacy'}  # <-"),
        "privacy_policy_url: must be an absolute https URL",
    ),
    "terms of service not absolute": (
        profile("business_profile: {terms_of_service_url: /terms}  # <-"),
        "terms_of_service_url: must be an absolute https URL",
    ),
    "features missing": (
        "profiles:\n  - name: p\n    configuration:  # <-\n      login_page: {enabled: true}\n",
        "configuration: features is required",
    ),
    "enabled missing": (
        features("payment_method_update: {}  # <-"),
        "payment_method_update: enabled is required",
    ),
    "enabled null": (
        features("payment_method_update: {enabled: null}  # <-"),
        "payment_method_update.enabled: is required and must not be null",
    ),
    "cancellation reason without options": (
        features(
            "subscription_cancel:\n  enabled: true\n  cancellation_reason: {enabled: true}  # <-"
        ),
        "cancellation_reason: options is required",
    ),
    "configuration missing": (
        "profiles:\n  - name: p  # <-\n    default: true\n",
        "configuration is required",
    ),
    "a key given twice": (
        "profiles:\n  - name: p\n" + CONF + "    name: q  # <-\n",
        "name: given twice (first on line 2)",
    ),
    "a profile name given twice": (
        TWO + "  - name: a  # <-\n" + CONF,
        "name: profile 'a' is declared twice (first on line 2)",
    ),
    "two defaults": (
        "profiles:\n  - name: a\n    default: true\n"
        + CONF
        + "  - name: b\n    default: true  # <-\n"
        + CONF,
        "default: only one profile may be the default (line 3 is)",
    ),
    "a name too long": (
        f"profiles:\n  - name: {'n' * 129}  # <-\n" + CONF,
        "name: must be at most 128 characters (got 129)",
    ),
    "a name with trailing whitespace": (
        "profiles:\n  - name: 'pro '  # <-\n" + CONF,
        "name: has leading or trailing whitespace",
    ),
    "no feature at all": (
        "profiles:\n  - name: p\n    configuration:\n      features: {}  # <-\n",
        "configuration.features: name at least one feature",
    ),
    "profiles not a list": (
        "profiles: {name: p}  # <-\n",
        "profiles: must be a list (got a mapping)",
    ),
    "profiles null": (
        "profiles:  # <-\n",
        "profiles: is required and must not be null",
    ),
    "not a mapping at the top": (
        "- name: p  # <-\n",
        "the file must be a mapping with a `profiles:` list (got a list)",
    ),
    "invalid YAML": (
        "profiles:\n  - name: p\n    configuration: {features: {}\n  - name: q  # <-\n",
        "not valid YAML",
    ),
    "a python tag": (
        "profiles:\n  - name: !!python/name:os.system  # <-\n" + CONF,
        "name: must be a string (got a value tagged tag:yaml.org,2002:python/name:os.system)",
    ),
}


@pytest.mark.parametrize(("text", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
async def test_each_problem_is_reported_with_its_line(load: Any, text: str, message: str) -> None:
    lines = text.splitlines()
    marked = [number for number, line in enumerate(lines, 1) if "# <-" in line]
    assert len(marked) == 1, "mark the expected line with # <-"
    with pytest.raises(ProfilesFileError) as raised:
        await load(text)
    problems = raised.value.problems
    assert [(p.line, message in p.problem) for p in problems] == [(marked[0], True)], str(
        raised.value
    )
    (line,) = str(raised.value).splitlines()
    assert line.startswith(f"{FILE} line {marked[0]}: ")


async def test_an_empty_file_is_refused(load: Any) -> None:
    with pytest.raises(ProfilesFileError, match=rf"^{FILE} line 1: the file is empty"):
        await load("# nothing yet\n")


async def test_a_missing_file_is_refused_without_a_line(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    with pytest.raises(ProfilesFileError, match=r"^nope\.yaml: cannot read the file"):
        await load_profiles(tmp_path / "nope.yaml", db, settings)


async def test_every_problem_is_reported_one_line_each_in_line_order(load: Any) -> None:
    text = (
        "profiles:\n"
        "  - name: a\n"
        "    default_return_url: https://evil.example.net/\n"  # 3
        "    configuration:\n"
        "      business_profile: {headline: " + "h" * 61 + "}\n"  # 5
        "      features:\n"
        "        subscription_update:\n"
        "          enabled: true\n"
        "          products:\n"
        "            - {product: prod_A, prices: [nosuchplan]}\n"  # 10
        "        subscription_pause: {enabled: true}\n"  # 11
        "  - name: a\n"  # 12
        "    configuration: {features: {invoice_history: {enabled: 1}}, metadata: {x: y}}\n"  # 13
    )
    with pytest.raises(ProfilesFileError) as raised:
        await load(text)
    lines = str(raised.value).splitlines()
    # Line 13 twice: enabled is no boolean, and metadata is ours.
    assert [p.line for p in raised.value.problems] == [3, 5, 10, 11, 12, 13, 13]
    assert lines == raised.value.lines
    assert all(line.startswith(f"{FILE} line ") for line in lines)
    assert "unknown plan 'nosuchplan'" in lines[2]


async def test_aliases_cannot_blow_the_walk_up(load: Any) -> None:
    # A few kilobytes that name 500 x 500 conditions through aliases.
    conditions = ", ".join(["*c"] * 500)
    text = (
        "condition: &c {type: shortening_interval}\n"
        "profile: &p\n"
        "  name: p\n"
        "  configuration:\n"
        "    features:\n"
        "      subscription_update:\n"
        "        enabled: true\n"
        f"        schedule_at_period_end: {{conditions: [{conditions}]}}\n"
        f"profiles: [{', '.join(['*p'] * 500)}]\n"
    )
    assert len(text) < 10_000
    with pytest.raises(ProfilesFileError) as raised:
        await load(text)
    assert str(raised.value) == f"{FILE}: too large: more than 100000 values to check"


async def test_http_localhost_return_urls_follow_the_setting(load: Any) -> None:
    text = profile("", head="    default_return_url: http://localhost:3000/account\n")
    allowlist = ("https://app.example.com", "http://localhost:3000")
    with pytest.raises(ProfilesFileError, match="only https URLs are allowed"):
        await load(text, return_url_allowlist=allowlist)
    (spec,) = await load(text, return_url_allowlist=allowlist, allow_http_localhost=True)
    assert spec.configuration["default_return_url"] == "http://localhost:3000/account"


async def test_without_an_allowlist_a_return_url_is_refused_saying_why(load: Any) -> None:
    text = profile("", head="    default_return_url: https://app.example.com/account  # <-\n")
    with pytest.raises(ProfilesFileError, match="RETURN_URL_ALLOWLIST is not set"):
        await load(text, return_url_allowlist=())
