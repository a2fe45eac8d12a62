"""Stripe's list pagination, shared by every ``GET`` list endpoint of the stand-in.

A list endpoint (a :class:`ListOf`) hands over its objects newest first and
says which of them the caller may see and which match the filters;
:meth:`ListOf.page` applies
``limit`` (default 10), ``starting_after`` / ``ending_before`` and answers with
Stripe's list object. A page costs the length of the page, not of the whole
list, so paging through 10,000 seeded customers stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .validation import IdRef, Params

__all__ = ["DEFAULT_LIMIT", "ListOf"]

DEFAULT_LIMIT = 10

Predicate = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class ListOf:
    """One kind of Stripe list: its URL, and the noun and id prefix of its objects."""

    url: str
    noun: str
    prefix: str

    def empty(self) -> dict[str, Any]:
        """An empty list object (the body a wrong_object or truncated fault distorts)."""
        return {"object": "list", "data": [], "has_more": False, "url": self.url}

    def page(
        self,
        ordered: Sequence[dict[str, Any]],
        params: Params,
        *,
        visible: Predicate,
        matches: Predicate,
        positions: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """One page of ``ordered`` (newest first) as Stripe's ``{"object": "list", ...}``.

        ``visible``: the caller may see the object at all (its account); only such
        an object can be a cursor, else the cursor is ``resource_missing``.
        ``matches``: the object is listed (filters, not deleted). ``positions`` maps
        id to index in ``ordered``; pass it when it is cached, else it is built.
        The params must already be validated (``limit`` an integer from 1 to 100,
        at most one cursor).
        """
        if positions is None:
            positions = {obj["id"]: index for index, obj in enumerate(ordered)}
        limit_param = params.get("limit")
        limit = int(limit_param) if isinstance(limit_param, str) else DEFAULT_LIMIT
        after = self._cursor_index(params, "starting_after", positions, ordered, visible)
        before = self._cursor_index(params, "ending_before", positions, ordered, visible)
        # One more than a page tells whether there is more beyond it.
        picked: list[dict[str, Any]] = []
        if before is not None:
            # The objects just before the cursor, nearest first, then back in list order.
            steps = range(before - 1, -1, -1)
        else:
            steps = range(0 if after is None else after + 1, len(ordered))
        for index in steps:
            obj = ordered[index]
            if visible(obj) and matches(obj):
                picked.append(obj)
                if len(picked) > limit:
                    break
        page = picked[:limit]
        if before is not None:
            page.reverse()
        return {"object": "list", "data": page, "has_more": len(picked) > limit, "url": self.url}

    def _cursor_index(
        self,
        params: Params,
        name: str,
        positions: Mapping[str, int],
        ordered: Sequence[dict[str, Any]],
        visible: Predicate,
    ) -> int | None:
        cursor = params.get(name)
        if not isinstance(cursor, str):
            return None
        index = positions.get(cursor)
        if index is None or not visible(ordered[index]):
            raise IdRef(name, cursor, self.noun, self.prefix).error()
        return index
