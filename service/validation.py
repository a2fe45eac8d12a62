"""The webargs parser behind aiohttp-apigami's ``validation_middleware``.

It validates the body the JSON guard already read and parsed (so the body is
read once, within its size limit) and turns marshmallow errors into our
``ValidationFailed`` with a field map keyed by dotted path.
"""

from __future__ import annotations

from typing import Any, NoReturn

from aiohttp import web
from marshmallow import Schema, ValidationError
from webargs import core
from webargs.aiohttpparser import AIOHTTPParser

from service import keys
from service.errors import ValidationFailed
from service.schemas import flatten_errors


class BodyParser(AIOHTTPParser):
    """Reads the pre-parsed JSON body; raises ValidationFailed on errors."""

    async def load_json(self, req: web.Request, schema: Schema) -> Any:
        return req.get(keys.JSON_BODY, core.missing)

    def handle_error(
        self,
        error: ValidationError,
        req: web.Request,
        schema: Schema,
        *,
        error_status_code: int | None,
        error_headers: Any,
    ) -> NoReturn:
        messages: Any = error.messages
        if isinstance(messages, dict) and set(messages) == {"json"}:
            messages = messages["json"]
        raise ValidationFailed(flatten_errors(messages))
