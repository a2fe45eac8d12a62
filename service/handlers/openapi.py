"""OpenAPI 3 helpers for the handlers' ``@docs`` annotations.

aiohttp-apigami's ``docs`` always adds Swagger 2's ``produces`` to an
operation, which makes an OpenAPI 3 document invalid; and a response given as
``{"schema": ...}`` is documented as ``application/json``, while our errors are
``application/problem+json``. These helpers keep the document truthful.

Error responses refer to the ``Problem`` component by ``$ref`` (registered by
:func:`register_components`): apispec rewrites response content in place, and
the annotations are built once per process while each app builds its own
document, so a schema class here would be registered in the first app only.
Each one narrows ``code`` to the values that status can carry on that
operation, from the operation's one table of codes (:func:`problem_responses`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp_apigami
from aiohttp_apigami.constants import API_SPEC_ATTR
from apispec import APISpec

from service.schemas import ProblemSchema

F = TypeVar("F", bound=Callable[..., Any])

PROBLEM_JSON = "application/problem+json"
PROBLEM = "Problem"
RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    }
}

# Printable ASCII; HTTP drops a header value's outer spaces, so the key starts
# and ends with a visible character.
IDEMPOTENCY_KEY_PARAMETER: dict[str, Any] = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": r"^[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?$",
    },
}

# Any value is taken: a tracing header never fails a request (SPEC §2).
REQUEST_ID_PARAMETER: dict[str, Any] = {
    "in": "header",
    "name": "X-Request-ID",
    "required": False,
    "description": "Echoed if 1-128 of `[A-Za-z0-9._:-]`, else replaced by a "
    "generated id. Every response carries it.",
    "schema": {"type": "string"},
}


def docs(**kwargs: Any) -> Callable[[F], F]:
    """aiohttp-apigami's ``docs`` without the Swagger-2-only ``produces`` key."""
    annotate = aiohttp_apigami.docs(**kwargs)

    def wrapper(func: F) -> F:
        func = annotate(func)
        getattr(func, API_SPEC_ATTR).pop("produces", None)
        return func

    return wrapper


def problem_response(
    codes: Sequence[str], note: str = "", *, retry_after: bool = False
) -> dict[str, Any]:
    """An error response whose ``code`` is one of ``codes``, with ``Retry-After`` where sent.

    The schema is the ``Problem`` component narrowed to these codes (an
    ``enum``), so a generated client gets a union type it can switch on
    (openapi-typescript: ``Problem & {code: "unknown_user" | ...}``). The
    description lists them too, for people.
    """
    listed = ", ".join(f"`{code}`" for code in codes)
    response: dict[str, Any] = {
        "description": f"{listed}{note}",
        "content": {
            PROBLEM_JSON: {
                "schema": {
                    "allOf": [
                        {"$ref": f"#/components/schemas/{PROBLEM}"},
                        {
                            "type": "object",
                            "required": ["code"],
                            "properties": {"code": {"type": "string", "enum": list(codes)}},
                        },
                    ]
                }
            }
        },
    }
    if retry_after:
        response["headers"] = RETRY_AFTER
    return response


def problem_responses(
    table: Mapping[int, Sequence[str]], notes: Mapping[int, str] | None = None
) -> dict[int, dict[str, Any]]:
    """An operation's error responses from its table of codes per status (429 and
    503 carry ``Retry-After``)."""
    notes = notes or {}
    return {
        status: problem_response(codes, notes.get(status, ""), retry_after=status in (429, 503))
        for status, codes in table.items()
    }


def register_components(spec: APISpec) -> None:
    """Add the schemas that responses refer to by ``$ref`` to this app's document."""
    spec.components.schema(PROBLEM, schema=ProblemSchema)
