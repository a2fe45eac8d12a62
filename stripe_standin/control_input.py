"""Checks on what tests send to the control API (``/_standin/...``).

The control API and the matching :class:`~stripe_standin.state.StandinState`
methods take JSON; whatever is wrong with it becomes a :class:`ControlError`,
which the control API answers with ``400 {"error": ...}``. The limits and
number checks shared by faults, latency and seeded subscriptions live here.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_LATENCY_MS", "ControlError", "is_int", "is_number"]

# The longest delay that can be scripted (standing latency or a latency fault).
MAX_LATENCY_MS: Final = 600_000.0


class ControlError(ValueError):
    """Bad input to the control API or to the matching :class:`StandinState` methods."""


def is_int(value: object) -> bool:
    # JSON true/false are ints in Python; a fault spec must not accept them as numbers.
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return is_int(value) or isinstance(value, float)
