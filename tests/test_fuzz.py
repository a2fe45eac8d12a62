"""SPEC §10: a schema-driven fuzz of the service's own OpenAPI document.

schemathesis reads ``/api/docs/swagger.json`` from the real HTTP server and
generates requests for every documented operation, valid and invalid, sent
with a service-client token. Every response must be documented and match the
document (status, content type, headers, body), and none may be a 5xx.

schemathesis and Hypothesis are synchronous; they run in a worker thread while
the service and the Stripe stand-in keep serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from service.auth import KNOWN_SCOPES
from tests.conftest import ALLOWED_ORIGIN, create_client_token
from tests.helpers import post_session, problem

pytestmark = pytest.mark.usefixtures("world")

# Every built-in check runs, two of them configured:
# * positive_data_acceptance is off: it wants every schema-valid body accepted,
#   and some rules depend on who calls and on the mapping data, which a request
#   schema cannot say (a service client must name `user_id`; `flow.plan` only
#   goes with one flow type; a URL must be on the allowlist). Those answers are
#   documented 4xx problems, checked like any other response.
# * negative_data_rejection also counts 413 as a rejection: an invalid body
#   over 16 KiB is refused for its size before anything else (SPEC §5).
CHECKS: dict[str, Any] = {
    "positive_data_acceptance": {"enabled": False},
    "negative_data_rejection": {
        "expected-statuses": [
            *(str(s) for s in (400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429)),
            "5xx",  # still a failure: not_a_server_error reports it
        ]
    },
}

# Examples per operation and mode: enough to walk every field and flow type of
# the request schema, few enough to keep the run well under a minute.
MAX_EXAMPLES = {"POST /v1/portal-sessions": 200}
DEFAULT_EXAMPLES = 40

# The users of tests.conftest.seed_world, and None to keep the generated id.
SEEDED_USERS = [None, "u_42", "u_7", "u_acct", "u_none", "u_two", "u_multi"]


def _steer(drawn: tuple[Any, str | None, bool]) -> Any:
    """Point a generated body (or path) at a seeded user (and an allowed return
    URL), so valid cases get past the lookups to the subscription rules and the
    Stripe call instead of stopping at 404 unknown_user. The case stays schema-valid."""
    case, user_id, allowed_url = drawn
    path = case.path_parameters
    if user_id is not None and isinstance(path, dict) and "user_id" in path:
        path["user_id"] = user_id
    body = case.body
    if isinstance(body, dict):
        if user_id is not None:
            body["user_id"] = user_id
        if allowed_url and isinstance(body.get("return_url"), str):
            body["return_url"] = f"{ALLOWED_ORIGIN}/account"
    return case


def fuzz(base_url: str, token: str) -> tuple[list[str], Counter[int]]:
    """Run every operation in both modes: the failures (one report per operation
    and mode) and how many answers of each status the service gave."""
    config = schemathesis.Config.from_dict({"checks": CHECKS})
    schema = schemathesis.openapi.from_url(f"{base_url}/api/docs/swagger.json", config=config)
    auth = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    statuses: Counter[int] = Counter()

    def run(strategy: Any, examples: int, http: requests.Session) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every run: no flaky fuzz
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call_and_validate(base_url=base_url, session=http, headers=auth)
            statuses[response.status_code] += 1

        check()

    with requests.Session() as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            modes = [GenerationMode.POSITIVE]
            if operation.body or any(True for _ in operation.iter_parameters()):
                modes.append(GenerationMode.NEGATIVE)  # nothing to negate otherwise
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode)
                if mode is GenerationMode.POSITIVE:
                    strategy = st.tuples(
                        strategy, st.sampled_from(SEEDED_USERS), st.booleans()
                    ).map(_steer)
                try:
                    run(strategy, MAX_EXAMPLES.get(label, DEFAULT_EXAMPLES), http)
                except Exception as exc:
                    failures.append(f"{label} [{mode.value}]: {exc}")
    return failures, statuses


@pytest.mark.timeout(120)
async def test_the_openapi_document_holds_under_fuzzing(
    make_service: Any, conn: asyncpg.Connection
) -> None:
    # Links on (else their creation is a 501) and not limited per IP: the fuzz
    # comes from one address.
    service = await make_service(
        PUBLIC_BASE_URL="http://127.0.0.1:8080", PORTAL_LINK_OPENS_PER_MINUTE="1000000"
    )
    # Its own client: the fuzz must not stop at the default rate limit, nor at a
    # scope (every operation's own rules get fuzzed, not just its 403).
    token = await create_client_token(conn, "fuzz", KNOWN_SCOPES, rate_limit=1_000_000)
    base_url = str(service.make_url("")).rstrip("/")
    failures, statuses = await asyncio.to_thread(fuzz, base_url, token)
    assert failures == [], "\n\n".join(failures)
    # The fuzz reached the use case, not just validation: sessions were created.
    assert statuses[201] > 0, statuses
    assert not [status for status in statuses if status >= 500], statuses


# --------------------------------------------------------------------------- what it found


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u_42", "portal": "\u0000\u00a0L6"}, "portal"),
        ({"user_id": "u\u000042"}, "user_id"),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_cancel", "subscription": "a\u0000"}},
            "flow.subscription",
        ),
    ],
)
async def test_a_nul_character_is_a_422_not_a_500(
    service: Any, token: str, body: dict[str, Any], field: str
) -> None:
    # Found by the fuzz: Postgres refuses NUL in text, so it reached the lookup as a 500.
    answer = await problem(await post_session(service, body, token), 422, "validation_failed")
    assert answer["errors"][field] == ["Must not contain NUL characters."]
