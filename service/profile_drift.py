"""Drift (SPEC §12): where Stripe's configuration no longer says what the file applied.

:func:`drifted_fields` compares a profile's ``applied`` params (the body the
file last sent to Stripe) with its ``snapshot`` (the configuration object as
Stripe last reported it) and names, as dotted paths, every field the file
controls whose value Stripe reports differently. It is pure, and the one
definition of drift: the ``portal_gateway_profile_drift`` gauge
(``service/drift_gauge.py``), the ``profile_snapshot`` audit rows and
``profiles plan``'s ``drifted`` verdict all use it, so they always agree.

The comparison itself is ``profile_diff.file_changes``, the one ``plan``
prints field by field: each field the applied params declare (a list sent
whole covers every element: ``products[0].prices``), with Stripe's defaults
filled in for the object's shape, against the snapshot; lists of values as
sets (Stripe's order of prices or allowed updates means nothing),
``null``/``""``/``[]`` all "none". A field the file does not declare is
nobody's: editing it in the Dashboard is not drift (``apply`` would not put
it back either). On top of it:

* ``metadata`` and ``expand`` are ours, not the file's: never compared.
* ``active``: the file declares the profile to be used, so a snapshot with
  ``active: false`` (deactivated in the Dashboard) is drift (``apply``
  reactivates it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.profile_diff import file_changes

# Sent with the configuration, but not declared by the file.
NOT_DECLARED = frozenset({"metadata", "expand"})


def drifted_fields(applied: Mapping[str, Any], snapshot: Mapping[str, Any]) -> list[str]:
    """The dotted paths of the fields the file controls that ``snapshot`` reports
    differently from ``applied``; ``[]`` when they agree. Sorted."""
    params = {k: v for k, v in applied.items() if k not in NOT_DECLARED}
    return sorted({change.path for change in file_changes(snapshot, params)})
