"""Scripted faults: what one API request suffers instead of a normal answer.

:class:`Fault` is a fault as queued through ``POST /_standin/faults`` (5xx, 429,
latency, hangs, connection resets, truncated or non-JSON bodies, the wrong
``object``), parsed and checked from its JSON form. What each fault does on the
wire is in :mod:`.fault_responses`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from .control_input import MAX_LATENCY_MS, ControlError, is_int, is_number

__all__ = ["Fault", "FaultKind"]

_MAX_FAULT_REPEAT = 10_000

FaultKind = Literal["latency", "status", "hang", "reset", "truncated", "non_json", "wrong_object"]
_ACTION_FLAGS: Final = ("hang", "reset", "truncated", "non_json", "wrong_object")
_FAULT_FIELDS: Final = frozenset(
    {"status", "headers", "body", "code", "latency_ms", "repeat", *_ACTION_FLAGS}
)


@dataclass(frozen=True)
class Fault:
    """What to do to one API request instead of (or before) answering it normally."""

    kind: FaultKind
    latency_ms: float = 0.0
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: object = None
    code: str | None = None
    truncated: Literal["length", "json"] = "length"
    wrong_object: str = "billing_portal.configuration"

    @classmethod
    def parse(cls, spec: object) -> tuple[Fault, int]:
        """Read one fault of the control API's JSON form; returns it and its repeat count."""
        if not isinstance(spec, dict):
            raise ControlError("each fault must be a JSON object")
        unknown = sorted(set(spec) - _FAULT_FIELDS)
        if unknown:
            raise ControlError(f"unknown fault field(s): {', '.join(unknown)}")
        repeat = spec.get("repeat", 1)
        if not is_int(repeat) or not 1 <= repeat <= _MAX_FAULT_REPEAT:
            raise ControlError(f"repeat must be an integer from 1 to {_MAX_FAULT_REPEAT}")
        latency = spec.get("latency_ms", 0)
        if not is_number(latency) or not 0 <= latency <= MAX_LATENCY_MS:
            raise ControlError(f"latency_ms must be a number from 0 to {MAX_LATENCY_MS:.0f}")
        status = spec.get("status")
        if status is not None and (not is_int(status) or not 100 <= status <= 599):
            raise ControlError("status must be an HTTP status code (100-599)")
        headers = _parse_headers(spec.get("headers", {}))
        code = spec.get("code")
        if code is not None and not isinstance(code, str):
            raise ControlError("code must be a string")
        body = spec.get("body")

        actions = [flag for flag in _ACTION_FLAGS if spec.get(flag) not in (None, False)]
        if len(actions) > 1:
            raise ControlError(f"a fault takes one action, got {', '.join(actions)}")
        if actions:
            kind = cast(FaultKind, actions[0])
            if kind in ("hang", "reset") and (status, body, code, spec.get("headers")) != (
                None,
                None,
                None,
                None,
            ):
                raise ControlError(
                    f"{kind} sends no response: status/headers/body/code not allowed"
                )
            if body is not None or code is not None:
                raise ControlError("body and code go with a plain status fault")
            truncated: Literal["length", "json"] = "length"
            wrong_object = "billing_portal.configuration"
            if kind == "truncated":
                truncated = _parse_truncated(spec["truncated"])
            elif kind == "wrong_object":
                wrong_object = _parse_wrong_object(spec["wrong_object"])
            elif spec[kind] is not True:
                raise ControlError(f"{kind} must be true")
            fault = cls(
                kind=kind,
                latency_ms=float(latency),
                status=status,
                headers=headers,
                truncated=truncated,
                wrong_object=wrong_object,
            )
        elif status is not None:
            if status < 400 and body is None:
                raise ControlError("a status fault below 400 needs a body")
            fault = cls(
                kind="status",
                latency_ms=float(latency),
                status=status,
                headers=headers,
                body=body,
                code=code,
            )
        else:
            if body is not None or code is not None:
                raise ControlError("body and code go with a status")
            fault = cls(kind="latency", latency_ms=float(latency), headers=headers)
        return fault, repeat

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "latency_ms": self.latency_ms}
        if self.status is not None:
            out["status"] = self.status
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.body is not None:
            out["body"] = self.body
        if self.code is not None:
            out["code"] = self.code
        if self.kind == "truncated":
            out["truncated"] = self.truncated
        if self.kind == "wrong_object":
            out["wrong_object"] = self.wrong_object
        return out


def _parse_headers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ControlError("headers must be an object of name to value")
    headers: dict[str, str] = {}
    for name, header_value in value.items():
        if isinstance(header_value, bool) or not isinstance(header_value, str | int | float):
            raise ControlError(f"header {name!r} must be a string or number")
        text = str(header_value)
        if any(ch in text or ch in name for ch in "\r\n"):
            raise ControlError(f"header {name!r} must be on one line")
        headers[name] = text
    return headers


def _parse_truncated(value: object) -> Literal["length", "json"]:
    if value is True or value == "length":
        return "length"
    if value == "json":
        return "json"
    raise ControlError('truncated must be true, "length" or "json"')


def _parse_wrong_object(value: object) -> str:
    if value is True:
        return "billing_portal.configuration"
    if isinstance(value, str) and value:
        return value
    raise ControlError("wrong_object must be true or the object name to send")
