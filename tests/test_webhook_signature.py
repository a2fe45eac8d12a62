"""``Stripe-Signature`` and the event parser of ``service/webhooks.py``, with no database.

``tests/test_webhooks.py`` delivers events through the service; these pin the
two pure steps in front of it — which headers verify, which payloads are events —
with an injected clock, so each refusal's reason and each boundary is checked.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from service.config import Secret
from service.errors import BadRequest
from service.webhooks import (
    SIGNATURE_TOLERANCE_SECONDS,
    Event,
    SignatureInvalid,
    parse_event,
    verify_signature,
)

SECRET = "whsec_unit_current_0123456789"
OLD_SECRET = "whsec_unit_previous_9876543210"
SECRETS = [Secret(SECRET)]
T = 1_700_000_000
PAYLOAD = b'{"id": "evt_1", "object": "event"}'


def v1(payload: bytes = PAYLOAD, secret: str = SECRET, t: int | str = T) -> str:
    """The hex HMAC Stripe puts in ``v1=``."""
    return hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()


def verify(header: str | None, secrets: list[Secret] = SECRETS, **kwargs: Any) -> int:
    kwargs.setdefault("now", T)
    return verify_signature(PAYLOAD, header, secrets, **kwargs)


def refused(header: str | None, secrets: list[Secret] = SECRETS, **kwargs: Any) -> str:
    """The reason ``header`` is refused with; the detail must never show a secret."""
    with pytest.raises(SignatureInvalid) as info:
        verify(header, secrets, **kwargs)
    error = info.value
    assert (error.status, error.code) == (400, "invalid_signature")
    assert "whsec" not in str(error)
    return error.reason


# --- what verifies -----------------------------------------------------------------


def test_a_stripe_signature_verifies_and_returns_its_timestamp() -> None:
    assert verify(f"t={T},v1={v1()}") == T
    # Whitespace around parts, other schemes and parts without "=" are ignored.
    assert verify(f" t={T} , v0=abc, garbage ,v1={v1()} ,x=12345") == T
    assert verify(f"garbage,t={T},v1={v1()}") == T
    assert verify(f"v1={v1()},t={T}") == T


def test_any_v1_under_any_secret_matches() -> None:
    both = [Secret(SECRET), Secret(OLD_SECRET)]
    good, other = v1(), v1(secret="whsec_someone_else")
    assert verify(f"t={T},v1={good},v1={other}") == T
    assert verify(f"t={T},v1={other},v1={good}") == T
    assert verify(f"t={T},v1={v1(secret=OLD_SECRET)}", both) == T
    assert verify(f"t={T},v1={good}", [Secret(OLD_SECRET), Secret(SECRET)]) == T
    assert verify(f"t={T},v1={good}", [Secret(SECRET), Secret(OLD_SECRET)]) == T


def test_the_clock_defaults_to_now() -> None:
    t = int(time.time())
    header = f"t={t},v1={v1(t=t)}"
    assert verify_signature(PAYLOAD, header, SECRETS) == t
    assert verify_signature(PAYLOAD, header, SECRETS, now=None) == t


def test_the_tolerance_is_inclusive_both_ways() -> None:
    header = f"t={T},v1={v1()}"
    tolerance = SIGNATURE_TOLERANCE_SECONDS
    assert tolerance == 300
    assert verify(header, now=T + tolerance) == T
    assert verify(header, now=T - tolerance) == T
    assert refused(header, now=T + tolerance + 1) == "timestamp_outside_tolerance"
    assert refused(header, now=T - tolerance - 1) == "timestamp_outside_tolerance"
    assert verify(header, now=T + 10, tolerance=10) == T
    assert refused(header, now=T + 11, tolerance=10) == "timestamp_outside_tolerance"


# --- what does not -----------------------------------------------------------------


def test_each_refusal_has_its_reason_and_detail() -> None:
    cases = [
        (f"t={T},v1={v1()}", [], "not_configured", "No webhook signing secret is configured."),
        (None, SECRETS, "missing_header", "The Stripe-Signature header is missing."),
        ("", SECRETS, "missing_header", "The Stripe-Signature header is missing."),
        (
            f"v1={v1()}",
            SECRETS,
            "malformed_header",
            "The Stripe-Signature header needs t= and at least one v1=.",
        ),
        (
            f"t={T},v0={v1()}",
            SECRETS,
            "malformed_header",
            "The Stripe-Signature header needs t= and at least one v1=.",
        ),
        (f"t={T},v1=00", SECRETS, "no_match", "No signature matches the payload."),
        (
            f"t={T - 1000},v1={v1(t=T - 1000)}",
            SECRETS,
            "timestamp_outside_tolerance",
            "The signature timestamp is outside the tolerance.",
        ),
    ]
    for header, secrets, reason, detail in cases:
        with pytest.raises(SignatureInvalid) as info:
            verify(header, secrets)
        assert (info.value.reason, info.value.detail) == (reason, detail), header


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (f"t={T}", "malformed_header"),
        (f"t={T},v1=", "no_match"),
        (f"t={T},v1=a=b", "no_match"),  # a v1, just a wrong one: split at the first "="
        (f"T={T},v1={v1()}", "malformed_header"),
        (f"t={T},V1={v1()}", "malformed_header"),
        (f"t=abc,v1={v1()}", "malformed_header"),
        (f"t=-{T},v1={v1()}", "malformed_header"),
        (f"t={T}.0,v1={v1()}", "malformed_header"),
        # Non-ASCII digits are digits to int(), not to Stripe.
        (
            f"t={str(T).translate(str.maketrans('0123456789', '٠١٢٣٤٥٦٧٨٩'))},v1={v1()}",
            "malformed_header",
        ),
        (f"t={T}v1={v1()}", "malformed_header"),
        (f"t={T};v1={v1()}", "malformed_header"),
        (f"t={T},v1={v1().upper()}", "no_match"),
        (f"t={T},v1={v1()[:-1]}", "no_match"),
        (f"t={T + 1},v1={v1()}", "no_match"),
        (f"t={T},v1={v1(payload=PAYLOAD + b' ')}", "no_match"),
        (f"t={T},v1={v1(secret=OLD_SECRET)}", "no_match"),
        # A signature over the payload alone, or with another separator.
        (f"t={T},v1={hmac.new(SECRET.encode(), PAYLOAD, hashlib.sha256).hexdigest()}", "no_match"),
        (f"t={T},v1={v1(t=f'{T}-')}", "no_match"),
        # Bytes that are not UTF-8 reach us as surrogates: compared, never a crash.
        (f"t={T},v1=\udcff{v1()[1:]}", "no_match"),
    ],
)
def test_headers_that_do_not_verify(header: str, reason: str) -> None:
    assert refused(header) == reason


def test_a_later_number_is_not_the_timestamp() -> None:
    # Only t= is the timestamp: x=, v0= and friends with digits change nothing.
    assert verify(f"t={T},v1={v1()},x={T + 1},v0=12345") == T
    assert refused(f"t={T + 1},v1={v1()},x={T}") == "no_match"


def test_the_signature_is_checked_before_the_clock() -> None:
    # An old replay with a bad MAC says "no_match", not that it is old.
    assert refused(f"t={T},v1=00", now=T + 10_000) == "no_match"


# --- the event parser ----------------------------------------------------------------


def event(**fields: Any) -> dict[str, Any]:
    """A Stripe event with ``fields`` replaced; a field given as None is left out."""
    body: dict[str, Any] = {
        "id": "evt_1",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": T,
        "livemode": False,
        "data": {"object": {"id": "sub_1", "customer": "cus_1"}},
        "request": {"id": "req_1", "idempotency_key": "k"},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def parsed(**fields: Any) -> Event:
    return parse_event(orjson.dumps(event(**fields)))


def test_an_event_is_parsed_into_what_we_use() -> None:
    assert parsed() == Event(
        id="evt_1",
        type="customer.subscription.updated",
        created=datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        livemode=False,
        object={"id": "sub_1", "customer": "cus_1"},
        request_id="req_1",
    )
    assert parsed(livemode=True).livemode is True
    assert parsed(created=0).created == datetime(1970, 1, 1, tzinfo=UTC)
    assert parsed(request={"id": None}).request_id is None
    assert parsed(request={"id": 5}).request_id is None
    assert parsed(request="req_1").request_id is None
    assert parsed(request=None).request_id is None
    assert parsed(data={"object": {}}).object == {}
    # The longest ids and types there may be.
    assert parsed(id="evt_" + "a" * 251).id == "evt_" + "a" * 251
    assert parsed(type="t" * 255).type == "t" * 255
    assert parsed(type="x").type == "x"


def test_connect_account_and_previous_attributes_are_parsed() -> None:
    # A platform event has no account; a Connect event names its account.
    assert parsed().account is None
    assert parsed(account="acct_1").account == "acct_1"
    longest = "acct_" + "a" * 250
    assert parsed(account=longest).account == longest
    # What an `updated` event says changed, when it says it as an object.
    assert parsed().previous_attributes is None
    before = {"metadata": {"user_id": "u_1"}}
    changed = {"object": {"id": "cus_1"}, "previous_attributes": before}
    assert parsed(data=changed).previous_attributes == before
    assert parsed(data={**changed, "previous_attributes": {}}).previous_attributes == {}
    assert parsed(data={**changed, "previous_attributes": "x"}).previous_attributes is None
    assert parsed(data={**changed, "previous_attributes": ["x"]}).previous_attributes is None


@pytest.mark.parametrize(
    "account",
    ["", "acct_", "acc_1", "ACCT_1", 1, True, ["acct_1"], {"id": "acct_1"}, "acct_" + "a" * 251],
)
def test_an_account_that_is_not_an_acct_id_is_refused(account: object) -> None:
    assert _refusal(orjson.dumps(event(account=account))) == (
        "invalid_event",
        "Not a Stripe event: account must be an acct_ id.",
    )


def _refusal(payload: bytes) -> tuple[str, str]:
    with pytest.raises(BadRequest) as info:
        parse_event(payload)
    return info.value.code, info.value.detail


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"id": None}, "id must be an evt_ id"),
        ({"id": 1}, "id must be an evt_ id"),
        ({"id": "ev_1"}, "id must be an evt_ id"),
        ({"id": "EVT_1"}, "id must be an evt_ id"),
        ({"id": "evt_" + "a" * 252}, "id must be an evt_ id"),
        ({"type": None}, "type must be a string"),
        ({"type": ""}, "type must be a string"),
        ({"type": 7}, "type must be a string"),
        ({"type": "t" * 256}, "type must be a string"),
        ({"created": None}, "created must be a unix time"),
        ({"created": -1}, "created must be a unix time"),
        ({"created": True}, "created must be a unix time"),
        ({"created": 1.5}, "created must be a unix time"),
        ({"created": str(T)}, "created must be a unix time"),
        ({"livemode": None}, "livemode must be a boolean"),
        ({"livemode": "false"}, "livemode must be a boolean"),
        ({"livemode": 0}, "livemode must be a boolean"),
        ({"data": None}, "data.object must be an object"),
        ({"data": {}}, "data.object must be an object"),
        ({"data": "x"}, "data.object must be an object"),
        ({"data": [{"object": {}}]}, "data.object must be an object"),
        ({"data": {"object": None}}, "data.object must be an object"),
        ({"data": {"object": ["sub_1"]}}, "data.object must be an object"),
    ],
)
def test_what_is_not_an_event(fields: dict[str, Any], why: str) -> None:
    assert _refusal(orjson.dumps(event(**fields))) == (
        "invalid_event",
        f"Not a Stripe event: {why}.",
    )


def test_a_body_that_is_not_a_json_object() -> None:
    assert _refusal(b"{not json") == ("malformed_json", "The body is not valid JSON.")
    assert _refusal(b"") == ("malformed_json", "The body is not valid JSON.")
    for body in (b"[]", b'"evt_1"', b"null", b"1"):
        assert _refusal(body) == (
            "invalid_event",
            "Not a Stripe event: the body is not a JSON object.",
        )
