"""The OpenAPI document and Swagger UI the service serves (SPEC §2, §5, §7).

Other teams generate clients and the fuzz test drives the endpoint from this
document, so it has to be valid OpenAPI 3, describe the request and every
documented outcome truthfully, and leak nothing.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from service.app import create_app
from tests.conftest import (
    STRIPE_TEST_KEY,
    _admin_execute,
    _admin_url,
    _with_database,
    make_settings,
)
from tests.helpers import PATH, post_session

DOC_PATH = "/api/docs/swagger.json"
PROBLEM_JSON = "application/problem+json"
UNUSED_STRIPE_BASE = "http://127.0.0.1:9"  # the document needs no upstream

# SPEC §2, copied here rather than imported so the test is an independent oracle.
REQUEST_FIELDS = {"user_id", "return_url", "locale", "portal", "flow"}
FLOW_FIELDS = {
    "type",
    "subscription",
    "plan",
    "quantity",
    "discount",
    "retention_offer",
    "after_completion",
}
FLOW_TYPES = {
    "payment_method_update",
    "subscription_cancel",
    "subscription_update",
    "subscription_update_confirm",
}
AFTER_COMPLETION_TYPES = {"portal_homepage", "hosted_confirmation", "redirect"}
# fmt: off
LOCALES = {
    "auto", "bg", "cs", "da", "de", "el", "en", "en-AU", "en-CA", "en-GB", "en-IE", "en-IN",
    "en-NZ", "en-SG", "es", "es-419", "et", "fi", "fil", "fr", "fr-CA", "hr", "hu", "id", "it",
    "ja", "ko", "lt", "lv", "ms", "mt", "nb", "nl", "pl", "pt", "pt-BR", "ro", "ru", "sk", "sl",
    "sv", "th", "tr", "vi", "zh", "zh-HK", "zh-TW",
}
# fmt: on
SESSION_FIELDS = {
    "id",
    "url",
    "created",
    "user_id",
    "flow",
    "locale",
    "return_url",
    "livemode",
}
ERROR_CODES = {
    400: {"malformed_json", "invalid_header"},
    401: {"unauthenticated"},
    403: {"forbidden_user", "insufficient_scope", "return_url_not_allowed"},
    404: {
        "unknown_user",
        "unknown_subscription",
        "no_open_subscription",
        "unknown_plan",
        "unknown_offer",
        "unknown_portal",
    },
    409: {
        "subscription_ambiguous",
        "subscription_not_open",
        "subscription_not_updatable",
        "idempotency_conflict",
    },
    413: {"payload_too_large"},
    415: {"unsupported_media_type"},
    422: {"validation_failed"},
    429: {"rate_limited"},
    502: {"upstream_rejected", "upstream_auth_failed", "upstream_bad_response"},
    503: {"upstream_unavailable", "database_unavailable", "overloaded", "draining"},
    504: {"upstream_timeout"},
}


async def _fetch_document(template_database: str) -> str:
    name = f"pgw_test_{uuid.uuid4().hex[:12]}"
    await _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        settings = make_settings(_with_database(_admin_url(), name), UNUSED_STRIPE_BASE)
        async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
            resp = await client.get(DOC_PATH)
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("application/json")
            return await resp.text()
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def document_text(template_database: str) -> str:
    """The served document, fetched once: it depends on the code, not on data."""
    return asyncio.run(_fetch_document(template_database))


@pytest.fixture(scope="module")
def document(document_text: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(document_text)
    return doc


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``$ref``s (and a single-element ``allOf``) to the schema itself."""
    while True:
        if "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/"), ref
            target: Any = doc
            for part in ref[2:].split("/"):
                target = target[part]
            node = target
        elif len(node.get("allOf", ())) == 1:
            node = node["allOf"][0]
        else:
            return node


def _operation(doc: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = doc["paths"][PATH]["post"]
    return op


def _schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> OAS30Validator:
    """A validator for one documented schema, with the document's components to resolve."""
    return OAS30Validator({**schema, "components": doc.get("components", {})})


def test_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.")
    validate(document)  # raises on any violation of the OpenAPI 3 schema
    assert document["info"]["title"]
    assert document["info"]["version"]


def test_request_body_documents_every_field_and_rejects_unknown_ones(
    document: dict[str, Any],
) -> None:
    op = _operation(document)
    body = op["requestBody"]
    assert body["required"] is True  # an empty body is a 400, not a valid request
    request = _resolve(document, body["content"]["application/json"]["schema"])
    assert set(request["properties"]) == REQUEST_FIELDS
    assert request.get("additionalProperties") is False
    props = request["properties"]
    assert props["user_id"]["type"] == "string"
    assert (props["user_id"]["minLength"], props["user_id"]["maxLength"]) == (1, 128)
    assert set(props["locale"]["enum"]) == LOCALES

    flow = _resolve(document, props["flow"])
    assert set(flow["properties"]) == FLOW_FIELDS
    assert flow.get("additionalProperties") is False
    assert "type" in flow["required"]
    assert set(flow["properties"]["type"]["enum"]) == FLOW_TYPES
    quantity = flow["properties"]["quantity"]
    assert (quantity["type"], quantity["minimum"], quantity["maximum"]) == ("integer", 1, 10000)

    after = _resolve(document, flow["properties"]["after_completion"])
    assert set(after["properties"]) == {"type", "message", "return_url"}
    assert after.get("additionalProperties") is False
    assert set(after["properties"]["type"]["enum"]) == AFTER_COMPLETION_TYPES
    assert after["properties"]["message"]["maxLength"] == 500

    # The documented schema refuses what the service refuses, and takes the SPEC example.
    validator = _schema_validator(document, body["content"]["application/json"]["schema"])
    example = {
        "user_id": "u_42",
        "return_url": "https://app.example.com/account",
        "locale": "fr",
        "portal": "default",
        "flow": {
            "type": "subscription_update_confirm",
            "subscription": "team-plan",
            "plan": "pro-yearly",
            "quantity": 5,
            "discount": "spring-promo",
            "after_completion": {
                "type": "redirect",
                "return_url": "https://app.example.com/done",
            },
        },
    }
    assert list(validator.iter_errors(example)) == []
    assert not validator.is_valid({"user_id": "u_42", "unknown": 1})
    assert not validator.is_valid({"user_id": "u_42", "flow": {"type": "x"}})
    assert not validator.is_valid(
        {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "quantity": "5"}}
    )


def test_operation_requires_bearer_auth_and_documents_its_headers(
    document: dict[str, Any],
) -> None:
    op = _operation(document)
    schemes = document["components"]["securitySchemes"]
    (requirement,) = op["security"]
    (name,) = requirement
    assert schemes[name]["type"] == "http"
    assert schemes[name]["scheme"].lower() == "bearer"
    headers = {p["name"]: p for p in op["parameters"] if p["in"] == "header"}
    assert headers["Idempotency-Key"]["schema"]["maxLength"] == 255
    assert "X-Request-ID" in headers


def test_201_response_is_the_portal_session(document: dict[str, Any]) -> None:
    created = _operation(document)["responses"]["201"]
    session = _resolve(document, created["content"]["application/json"]["schema"])
    assert set(session["properties"]) == SESSION_FIELDS
    assert set(session["required"]) == SESSION_FIELDS
    assert session["properties"]["flow"].get("nullable") is True  # null = portal home page
    assert session["properties"]["livemode"]["type"] == "boolean"
    assert session["properties"]["created"]["type"] == "integer"


def test_every_error_status_is_documented_as_a_problem(document: dict[str, Any]) -> None:
    responses = _operation(document)["responses"]
    wrong: list[str] = []
    for status, codes in sorted(ERROR_CODES.items()):
        response = responses.get(str(status))
        if response is None:
            wrong.append(f"{status}: not documented")
            continue
        # The media type the service actually sends for errors.
        if set(response.get("content", {})) != {PROBLEM_JSON}:
            wrong.append(f"{status}: media types {sorted(response.get('content', {}))}")
            continue
        problem = _resolve(document, response["content"][PROBLEM_JSON]["schema"])
        required = {"type", "title", "status", "code", "detail", "request_id"}
        if not required <= set(problem.get("required", ())) or "errors" not in problem.get(
            "properties", {}
        ):
            wrong.append(f"{status}: not the problem schema: {problem}")
        missing_codes = codes - set(re.findall(r"`([a-z_]+)`", response["description"]))
        if missing_codes:
            wrong.append(f"{status}: codes not listed: {sorted(missing_codes)}")
        if status in (429, 503) and "Retry-After" not in response.get("headers", {}):
            wrong.append(f"{status}: Retry-After not documented")
    assert wrong == []


def test_health_endpoints_are_documented(document: dict[str, Any]) -> None:
    healthz = document["paths"]["/healthz"]["get"]["responses"]
    assert "200" in healthz
    readyz = document["paths"]["/readyz"]["get"]["responses"]
    assert {"200", "503"} <= set(readyz)
    for response in (healthz["200"], readyz["200"], readyz["503"]):
        schema = _resolve(document, response["content"]["application/json"]["schema"])
        assert "status" in schema["properties"]


def test_document_contains_no_secret(document_text: str) -> None:
    # The document was served by an app configured with STRIPE_TEST_KEY.
    assert STRIPE_TEST_KEY not in document_text
    for marker in ("sk_test_", "sk_live_", "rk_test_", "rk_live_", "whsec_", "postgresql://"):
        assert marker not in document_text, marker


@pytest.mark.usefixtures("world")
async def test_real_responses_match_the_document(
    service: Any, document: dict[str, Any], token: str
) -> None:
    """What the service answers is what the document promises (status, media type, body)."""
    responses = _operation(document)["responses"]
    calls = [
        ({"user_id": "u_42"}, token, 201),
        ({"user_id": "u_42", "flow": {"type": "subscription_cancel", "plan": "x"}}, token, 422),
        ({"user_id": "u_nobody"}, token, 404),
        ({"user_id": "u_42"}, "pgw_" + "x" * 43, 401),
        (b"{not json", token, 400),
    ]
    for body, bearer, status in calls:
        resp = await post_session(service, body, bearer)
        assert resp.status == status, await resp.text()
        documented = responses[str(status)]["content"]
        media_type = resp.headers["Content-Type"].split(";")[0]
        assert media_type in documented, (status, media_type, list(documented))
        payload = orjson.loads(await resp.read())
        errors = list(
            _schema_validator(document, documented[media_type]["schema"]).iter_errors(payload)
        )
        assert errors == [], (status, payload, errors)


async def test_swagger_ui_is_served(service: Any) -> None:
    resp = await service.get("/api/docs")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    html = await resp.text()
    assert "swagger" in html.lower()
    # The page's scripts load too, or the UI is a blank page.
    scripts = re.findall(r'src="([^"]+\.js)"', html)
    assert scripts, html
    for src in scripts:
        asset = await service.get(src)
        assert asset.status == 200, src
