"""The OpenAPI document and Swagger UI the service serves (SPEC §2, §5, §7).

Other teams generate clients and the fuzz test drives the endpoint from this
document, so it has to be valid OpenAPI 3, describe the request and every
documented outcome truthfully, and leak nothing.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import re
import uuid
from pathlib import Path
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

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
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
    400: {"malformed_json", "invalid_header", "header_too_large"},
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
    408: {"request_timeout"},
    413: {"payload_too_large"},
    415: {"unsupported_media_type"},
    422: {"validation_failed"},
    429: {"rate_limited"},
    502: {"upstream_rejected", "upstream_auth_failed", "upstream_bad_response"},
    503: {"upstream_unavailable", "database_unavailable", "overloaded", "draining"},
    504: {"upstream_timeout"},
}
WEBHOOK_PATH = "/v1/stripe/webhooks"
WEBHOOK_ERROR_CODES = {
    400: {"invalid_signature", "malformed_json", "invalid_event", "header_too_large"},
    408: {"request_timeout"},
    413: {"payload_too_large"},
    503: {"database_unavailable", "overloaded", "draining"},
}
# The mapping API of SPEC §11 (its own tests: tests/test_mapping_api.py).
MAPPING_OPERATIONS = [
    ("PUT", "/v1/users/{user_id}/customer"),
    ("DELETE", "/v1/users/{user_id}/customer"),
    ("GET", "/v1/users/{user_id}"),
]
# Codes no operation documents: answers for a path or method that has no
# operation (404, 405), aiohttp's other HTTP errors, and the 499 of a caller
# that hung up (no body: nobody reads it).
NOT_OPERATION_CODES = {"not_found", "method_not_allowed", "http_error", "client_closed_request"}


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


def _problem_and_codes(doc: dict[str, Any], response: dict[str, Any]) -> tuple[Any, Any]:
    """An error response's schema: the Problem component, and the `code` schema
    that narrows it (``allOf: [{$ref: Problem}, {properties: {code: {enum}}}]``)."""
    schema = response["content"][PROBLEM_JSON]["schema"]
    problem, narrowing = schema["allOf"]
    return _resolve(doc, problem), narrowing["properties"]["code"]


@pytest.mark.parametrize(
    ("path", "oracle"), [(PATH, ERROR_CODES), (WEBHOOK_PATH, WEBHOOK_ERROR_CODES)]
)
def test_every_error_status_is_documented_as_a_problem(
    document: dict[str, Any], path: str, oracle: dict[int, set[str]]
) -> None:
    responses = document["paths"][path]["post"]["responses"]
    wrong: list[str] = []
    for status, codes in sorted(oracle.items()):
        response = responses.get(str(status))
        if response is None:
            wrong.append(f"{status}: not documented")
            continue
        # The media type the service actually sends for errors.
        if set(response.get("content", {})) != {PROBLEM_JSON}:
            wrong.append(f"{status}: media types {sorted(response.get('content', {}))}")
            continue
        problem, code = _problem_and_codes(document, response)
        required = {"type", "title", "status", "code", "detail", "request_id"}
        if not required <= set(problem.get("required", ())) or "errors" not in problem.get(
            "properties", {}
        ):
            wrong.append(f"{status}: not the problem schema: {problem}")
        missing_codes = codes - set(code.get("enum", ()))
        if missing_codes:
            wrong.append(f"{status}: codes not in the enum: {sorted(missing_codes)}")
        missing_codes = codes - set(re.findall(r"`([a-z_]+)`", response["description"]))
        if missing_codes:
            wrong.append(f"{status}: codes not listed: {sorted(missing_codes)}")
        if status in (429, 503) and "Retry-After" not in response.get("headers", {}):
            wrong.append(f"{status}: Retry-After not documented")
    assert wrong == []


def _error_responses(doc: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    return [
        (f"{method.upper()} {path}", int(status), response)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        for status, response in operation["responses"].items()
        if PROBLEM_JSON in response.get("content", {})
    ]


def test_problem_codes_are_a_typed_enum_per_status(document: dict[str, Any]) -> None:
    """What a generated client gets: per status, `code` is a union of string literals."""
    found = _error_responses(document)
    assert {where for where, _, _ in found} == {
        f"POST {PATH}",
        f"POST {WEBHOOK_PATH}",
        *(f"{method} {path}" for method, path in MAPPING_OPERATIONS),
        "POST /v1/portal-links",
        "GET /v1/portal-links/{token}",
        "POST /v1/portal-links/{token}",
    }
    for where, status, response in found:
        problem, code = _problem_and_codes(document, response)
        assert problem["properties"]["code"]["type"] == "string", where
        assert code["type"] == "string", (where, status)
        enum = code["enum"]
        assert enum, (where, status)
        assert all(re.fullmatch(r"[a-z][a-z_]*", c) for c in enum), (where, status)
        assert len(set(enum)) == len(enum), (where, status)
        # The description lists the same codes, for people.
        listed = re.findall(r"`([a-z_]+)`", response["description"])
        assert set(listed) == set(enum), (where, status)
        # The enum holds: a code of another status is not valid for this one.
        validator = _schema_validator(document, response["content"][PROBLEM_JSON]["schema"])
        body = {
            "type": "about:blank",
            "title": "x",
            "status": status,
            "detail": "x",
            "request_id": "r",
        }
        assert validator.is_valid({**body, "code": enum[0]}), (where, status)
        assert not validator.is_valid({**body, "code": "no_such_code"}), (where, status)


def _service_error_codes() -> dict[tuple[int, str], list[str]]:
    """Every (status, code) the service's source can raise, read from the source:
    each construction of a ServiceError subclass, with a literal code or its default.

    A code chosen at run time (not a literal) is reported as such, so it can't
    slip past this check.
    """
    trees = {path: ast.parse(path.read_text()) for path in sorted(SERVICE.rglob("*.py"))}
    classes: dict[str, Path] = {"ServiceError": SERVICE / "errors.py"}
    grown = True
    while grown:  # subclasses of subclasses, wherever they are defined
        grown = False
        for path, tree in trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in classes:
                    bases = {b.id if isinstance(b, ast.Name) else "" for b in node.bases}
                    if bases & set(classes):
                        classes[node.name] = path
                        grown = True
    runtime: dict[str, Any] = {}
    fixed: dict[str, str] = {}  # classes whose __init__ passes a literal code up
    for name, path in classes.items():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        runtime[name] = getattr(importlib.import_module(module), name)
        (class_def,) = [
            n for n in ast.walk(trees[path]) if isinstance(n, ast.ClassDef) and n.name == name
        ]
        for call in ast.walk(class_def):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "__init__"
                and call.args
                and isinstance(call.args[0], ast.Constant)
                and isinstance(call.args[0].value, str)
            ):
                fixed[name] = call.args[0].value
    found: dict[tuple[int, str], list[str]] = {}
    for path, tree in trees.items():
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            func = call.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in runtime:
                continue
            cls = runtime[name]
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            params = list(inspect.signature(cls.__init__).parameters)
            code: Any = fixed.get(name, cls.default_code)
            if params[1:2] == ["code"]:
                given = call.args[0] if call.args else None
                given = given or next((k.value for k in call.keywords if k.arg == "code"), None)
                if given is not None:
                    literal = isinstance(given, ast.Constant) and isinstance(given.value, str)
                    code = given.value if literal else f"<not a literal at {where}>"
            found.setdefault((cls.status, code), []).append(where)
    return found


def test_every_code_the_service_raises_is_in_its_status_enum(document: dict[str, Any]) -> None:
    documented: dict[int, set[str]] = {}
    for _, status, response in _error_responses(document):
        _, code = _problem_and_codes(document, response)
        documented.setdefault(status, set()).update(code["enum"])
    raised = _service_error_codes()
    # The scan sees what it must: every code of SPEC §2's table is raised somewhere.
    spec = {(status, code) for status, codes in ERROR_CODES.items() for code in codes}
    assert spec <= set(raised), sorted(spec - set(raised))
    undocumented = {
        f"{status} {code}: {where}"
        for (status, code), where in raised.items()
        if code not in NOT_OPERATION_CODES and code not in documented.get(status, set())
    }
    assert undocumented == set()


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
