"""The log chain's own processors (service/logs.py) write what stock structlog's would.

The context merge, the clear and the timestamp are cheaper stand-ins for
``merge_contextvars``, ``clear_contextvars`` and ``TimeStamper(fmt="iso",
utc=True)``: the same values, the same line.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from hypothesis import example, given
from hypothesis import strategies as st

from service import logs

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The last µs of year 9999.
LAST = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


@given(st.lists(st.integers(min_value=0, max_value=LAST), min_size=1, max_size=4))
@example([0, 1, 999_999, 1_000_000, 1_000_001])
@example([1_700_000_000_000_000, 1_700_000_000_000_001, 1_700_000_000_999_999])
def test_timestamp_is_isoformat(instants: list[int]) -> None:
    """Any instant, in any order (the cached second changes or not): isoformat's text."""
    for micros in instants:
        expected = (EPOCH + timedelta(microseconds=micros)).isoformat().replace("+00:00", "Z")
        assert logs.iso_utc(micros) == expected


def test_timestamp_processor_is_now() -> None:
    before = datetime.now(UTC)
    stamped = logs._timestamp(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert ISO_Z.fullmatch(stamped)
    assert before <= datetime.fromisoformat(stamped) <= after


def _in_fresh_context(run: Callable[[], Any]) -> Any:
    return contextvars.Context().run(run)


def test_merge_and_clear_match_structlog() -> None:
    def scenario() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        seen = []

        def both(event: dict[str, Any]) -> None:
            stock = structlog.contextvars.merge_contextvars(None, "info", dict(event))
            ours = logs._merge_contextvars(None, "info", dict(event))
            seen.append((stock, ours))

        both({"event": "nothing bound"})
        structlog.contextvars.bind_contextvars(request_id="r-1", principal_id="p")
        both({"event": "bound"})
        both({"event": "the line's own value wins", "request_id": "mine"})
        structlog.contextvars.bind_contextvars(attempts=2, upstream_request_id=None)
        both({"event": "None is a value"})
        logs.clear_contextvars()
        assert structlog.contextvars.get_contextvars() == {}
        both({"event": "cleared"})
        structlog.contextvars.bind_contextvars(request_id="r-2")
        both({"event": "bound again"})
        return seen

    seen = _in_fresh_context(scenario)
    for stock, ours in seen:
        assert ours == stock
    assert seen[1][1] == {"event": "bound", "request_id": "r-1", "principal_id": "p"}
    assert seen[2][1]["request_id"] == "mine"
    assert seen[4][1] == {"event": "cleared"}


def _line(processors: list[Any], logger: str, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event_dict: Any = dict(event)
    wrapped = logs._LineLogger(logger)
    for processor in processors:
        event_dict = processor(wrapped, method, event_dict)
    assert isinstance(event_dict, str)
    parsed: dict[str, Any] = orjson.loads(event_dict)
    assert ISO_Z.fullmatch(parsed.pop("timestamp"))
    return parsed


def test_the_chain_writes_what_stock_structlog_would() -> None:
    stock = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        logs._add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        logs._render,
    ]

    def lines() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        structlog.contextvars.bind_contextvars(request_id="r-9", principal_type="client")
        events: list[tuple[str, str, dict[str, Any]]] = [
            ("access", "info", {"event": "request", "status": 201, "duration_ms": 1.5}),
            ("audit", "warning", {"event": "audit", "authorization": "Bearer abc.def"}),
            ("audit", "info", {"event": "audit", "user_agent": "curl \udce9", "big": 2**70}),
        ]
        try:
            raise ValueError("boom")
        except ValueError:
            events.append(("app", "error", {"event": "unhandled_exception", "exc_info": True}))
            return [(_line(stock, *e), _line(logs.PROCESSORS, *e)) for e in events]

    pairs = _in_fresh_context(lines)
    for expected, got in pairs:
        assert got == expected
    assert pairs[0][1]["request_id"] == "r-9"
    assert "abc.def" not in pairs[1][1]["authorization"]  # masked
    assert pairs[3][1]["exception"][0]["exc_value"] == "boom"
