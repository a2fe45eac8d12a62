"""OpenAPI 3 helpers for the handlers' ``@docs`` annotations.

aiohttp-apigami's ``docs`` always adds Swagger 2's ``produces`` to an
operation, which makes an OpenAPI 3 document invalid; and a response given as
``{"schema": ...}`` is documented as ``application/json``, while our errors are
``application/problem+json``. These helpers keep the document truthful.

Error responses refer to the ``Problem`` component by ``$ref`` (registered by
:func:`register_components`): apispec rewrites response content in place, and
the annotations are built once per process while each app builds its own
document, so a schema class here would be registered in the first app only.
"""

from __future__ import annotations

from collections.abc import Callable
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


def docs(**kwargs: Any) -> Callable[[F], F]:
    """aiohttp-apigami's ``docs`` without the Swagger-2-only ``produces`` key."""
    annotate = aiohttp_apigami.docs(**kwargs)

    def wrapper(func: F) -> F:
        func = annotate(func)
        getattr(func, API_SPEC_ATTR).pop("produces", None)
        return func

    return wrapper


def problem_response(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    """An error response: the problem document, with ``Retry-After`` where sent."""
    response: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": f"#/components/schemas/{PROBLEM}"}}},
    }
    if retry_after:
        response["headers"] = RETRY_AFTER
    return response


def register_components(spec: APISpec) -> None:
    """Add the schemas that responses refer to by ``$ref`` to this app's document."""
    spec.components.schema(PROBLEM, schema=ProblemSchema)
