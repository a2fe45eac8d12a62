"""structlog, configured once: JSON lines to stdout (or a console renderer).

Standard-library loggers (aiohttp, asyncpg, alembic) go through the same
processors, so with ``LOG_FORMAT=json`` every line the process writes is one
JSON object. A last-line-of-defence processor masks anything that looks like
a Stripe key, a bearer token, a JWT, a webhook secret or a portal URL.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import IO, Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_SECRET_PATTERNS = re.compile(
    r"(?:sk|rk)_(?:test|live)_[A-Za-z0-9_]+"
    r"|whsec_[A-Za-z0-9_+/=]+"
    r"|pgw_[A-Za-z0-9_\-]+"
    r"|eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"
    r"|https://billing\.stripe\.com/[^\s\"']*"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/\-]+=*"
)
REDACTED = "[REDACTED]"


def redact(value: str) -> str:
    """Mask secrets and portal URLs inside a string."""
    return _SECRET_PATTERNS.sub(REDACTED, value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _redact_processor(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    return {k: _redact_value(v) for k, v in event_dict.items()}


def _json_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(level: str = "INFO", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Set up structlog and the standard-library root logger."""
    stream = stream or sys.stdout
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        exc: list[Processor] = []
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
        # Exceptions as structured fields (type, value, frames), without the
        # frames' local variables: those can hold tokens, keys or portal URLs.
        exc = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exc,
            _redact_processor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Our access line replaces aiohttp's; asyncpg is chatty at DEBUG only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
