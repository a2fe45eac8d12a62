"""structlog, configured once: JSON lines to stdout (or a console renderer).

Our own loggers run structlog's native pipeline (no stdlib ``logging`` hop per
line: it cost ~250 µs a request). Standard-library loggers (aiohttp, asyncpg,
alembic) go through the same final step via ``ProcessorFormatter``, so with
``LOG_FORMAT=json`` every line the process writes is one JSON object. The last
step masks anything that looks like a Stripe key, a bearer token, a JWT, a
webhook secret or a portal URL, in one regex pass over the rendered line. A
value the encoder refuses (a lone surrogate: a header byte that was not UTF-8)
is escaped, never raised: writing a line cannot fail the request that logs it.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from service.safe_text import printable

# No pattern crosses a backslash or a quote, so masking a rendered JSON line
# keeps it valid JSON.
_SECRET_PATTERNS = re.compile(
    r"(?:sk|rk)_(?:test|live)_[A-Za-z0-9_]+"
    r"|whsec_[A-Za-z0-9_+/=]+"
    r"|pgw_[A-Za-z0-9_\-]+"
    r"|eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"
    r"|https://billing\.stripe\.com/[^\s\"'\\]*"
    # A portal session URL on any host (a custom portal domain keeps Stripe's path);
    # without a scheme, from the path on.
    r"|https?://[^\s\"'\\/]+/p/session/[^\s\"'\\]*"
    r"|/p/session/[^\s\"'\\]*"
    # A portal link's token (SPEC §13): the path from the token on.
    r"|/portal-links/[A-Za-z0-9_\-]+"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/\-]+=*"
)
REDACTED = "[REDACTED]"


# Every pattern above contains one of these; plain substring tests are ~20x
# cheaper than the regex scan, which then runs only on lines that might match.
_MARKERS = (
    "sk_",
    "rk_",
    "whsec_",
    "pgw_",
    "eyJ",
    "billing.stripe.com",
    "/p/session/",
    "/portal-links/",
    "earer",
    "EARER",
)


def redact(value: str) -> str:
    """Mask secrets and portal URLs inside a string."""
    for marker in _MARKERS:
        if marker in value:
            return _SECRET_PATTERNS.sub(REDACTED, value)
    return value


class _Output:
    """Where lines go and how they look; configure() changes it in place, so
    loggers cached on first use follow."""

    def __init__(self) -> None:
        self.streams: list[IO[str]] = [sys.stdout]
        self.json = True

    def write(self, line: str) -> None:
        for stream in self.streams:
            stream.write(line + "\n")
            stream.flush()


_OUTPUT = _Output()
_CONSOLE = structlog.dev.ConsoleRenderer(colors=False)
# Exceptions as structured fields (type, value, frames), without the frames'
# local variables: those can hold tokens, keys or portal URLs.
_EXCEPTIONS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """``TimeStamper(fmt="iso", utc=True)``'s value (``2025-01-02T03:04:05.678901Z``)
    at a third of its cost: two per request."""
    event_dict["timestamp"] = iso_utc(time.time_ns() // 1000)
    return event_dict


# (second, its "YYYY-MM-DDTHH:MM:SS"): one tuple, so a stdlib record logged
# from another thread never pairs one second with another's text.
_SECOND: tuple[int, str] = (-1, "")


def iso_utc(micros: int) -> str:
    """``datetime.isoformat()`` of this many µs since the epoch, UTC, with a ``Z``;
    the part up to the second is formatted once per second."""
    global _SECOND
    second, micro = divmod(micros, 1_000_000)
    cached, prefix = _SECOND
    if second != cached:
        prefix = datetime.fromtimestamp(second, UTC).isoformat()[:19]
        _SECOND = (second, prefix)
    # isoformat() leaves a zero fraction out.
    return f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"


# The ContextVars structlog's bind_contextvars() made, by "structlog_<key>" (a
# private registry). structlog's merge_contextvars copies the whole context and
# scans every variable in it (asyncio's and aiohttp's too), twice a request;
# these walk structlog's own only. Without the registry (another structlog),
# structlog's functions serve.
_BOUND: dict[str, contextvars.ContextVar[Any]] | None = getattr(
    structlog.contextvars, "_CONTEXT_VARS", None
)
_PREFIX_LEN = len(structlog.contextvars.STRUCTLOG_KEY_PREFIX)


def _merge_contextvars(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """What ``structlog.contextvars.merge_contextvars`` adds: the values bound in
    this context, under the line's own keys."""
    if _BOUND is None:
        return structlog.contextvars.merge_contextvars(logger, method, event_dict)
    for name, var in _BOUND.items():
        value = var.get()  # Ellipsis: never bound here, or cleared
        if value is not Ellipsis:
            event_dict.setdefault(name[_PREFIX_LEN:], value)
    return event_dict


def clear_contextvars() -> None:
    """``structlog.contextvars.clear_contextvars()``, without scanning the whole context."""
    if _BOUND is None:
        structlog.contextvars.clear_contextvars()
        return
    for var in _BOUND.values():
        var.set(Ellipsis)


class _LineLogger:
    """The wrapped logger: takes a rendered line and writes it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, line: str) -> None:
        _OUTPUT.write(line)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _line_logger(*args: Any) -> _LineLogger:
    return _LineLogger(str(args[0]) if args else "app")


def _add_logger_name(logger: WrappedLogger, _: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("logger", getattr(logger, "name", "app"))
    return event_dict


def _render(logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    if _OUTPUT.json:
        if "exc_info" in event_dict:  # nothing for the renderer to do otherwise
            event_dict = _EXCEPTIONS(logger, method, event_dict)
        try:
            line = orjson.dumps(event_dict, default=str).decode()
        except TypeError:  # orjson.JSONEncodeError is one
            line = orjson.dumps(_encodable(event_dict)).decode()
    else:
        line = _CONSOLE(logger, method, event_dict)
        if not line.isascii():
            # A lone surrogate (a header byte that was not UTF-8) can't be written out.
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    return redact(line)


_MAX_DEPTH = 32


def _encodable(value: Any, depth: int = 0) -> Any:
    """``value`` with whatever orjson refuses made into printable text: a str
    with lone surrogates, a key that is not a str, an int over 64 bits, an object
    whose ``str()`` fails, nesting too deep (or a cycle). The slow path, taken
    only when the fast one raised: a log line never raises for its values."""
    if isinstance(value, str):
        return printable(value, None)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if depth >= _MAX_DEPTH:
        return "[nested too deep]"
    if isinstance(value, dict):
        return {printable(_text(k), None): _encodable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_encodable(v, depth + 1) for v in value]
    return printable(_text(value), None)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


# Our own loggers' chain (tests/test_log_processors.py compares it with stock structlog's).
PROCESSORS: list[structlog.typing.Processor] = [
    _merge_contextvars,
    structlog.processors.add_log_level,
    _add_logger_name,
    _timestamp,
    _render,
]


def configure(level: str = "INFO", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Set up structlog and the standard-library root logger (once per process)."""
    _OUTPUT.streams = [stream or sys.stdout]
    _OUTPUT.json = fmt != "console"
    numeric_level = logging.getLevelName(level)
    structlog.configure(
        processors=PROCESSORS,
        logger_factory=_line_logger,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            _merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            _timestamp,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _render],
    )
    handler = _OutputHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Our access line replaces aiohttp's; asyncpg is chatty at DEBUG only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name in _ALEMBIC_CHATTER_LOGGERS:
        logging.getLogger(name).addFilter(_ALEMBIC_CHATTER)  # once: addFilter ignores repeats


class _AlembicChatter(logging.Filter):
    """alembic's set-up lines at DEBUG instead of INFO.

    On every start (``migrate``, ``make run``) alembic says which plugins it set
    up, its dialect and that DDL is transactional: noise at INFO. "Running
    upgrade …" and every warning or error pass unchanged.
    """

    _PREFIXES = ("setup plugin", "setting up autogenerate plugin", "Context impl", "Will assume")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not str(record.msg).startswith(self._PREFIXES):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


_ALEMBIC_CHATTER = _AlembicChatter()
# A logger's filters see only the records logged on it: these are the two that say them.
_ALEMBIC_CHATTER_LOGGERS = ("alembic.runtime.plugins", "alembic.runtime.migration")


class _OutputHandler(logging.Handler):
    """Standard-library records, rendered by structlog, to the same output."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _OUTPUT.write(self.format(record))
        except Exception:  # logging must never take the service down
            self.handleError(record)


@contextmanager
def tee(stream: IO[str]) -> Iterator[IO[str]]:
    """Also write every line to ``stream`` while the block runs (tests read logs this way)."""
    _OUTPUT.streams.append(stream)
    try:
        yield stream
    finally:
        _OUTPUT.streams.remove(stream)


def set_format(fmt: str) -> str:
    """Switch between ``json`` and ``console`` rendering; return the previous format."""
    previous = "json" if _OUTPUT.json else "console"
    _OUTPUT.json = fmt != "console"
    return previous
