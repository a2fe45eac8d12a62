"""Small statistics helpers shared by the load generator and the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Sequence[float]) -> float:
    """The median, or NaN when there is nothing to take it of."""
    return statistics.median(values) if values else math.nan


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or either is missing."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b
