"""Snapshots from Stripe's webhooks (SPEC §12): what a configuration is now, kept on its profiles.

A ``billing_portal.configuration.created|updated`` event carries the whole
configuration (``data.object``). :func:`apply_configuration` stores it, in the
webhook's transaction, as the ``snapshot`` of every profile whose
``configuration_id`` is the object's id and whose ``connected_account`` is the
event's top-level ``account`` (None: the platform's own, so a connected
account's event never touches a platform profile, nor the other way round),
and only when it is newer than the snapshot there (Stripe's ``updated``; a
tie keeps what is there). The result is ``applied``, ``superseded`` (every
such profile already holds a report at least as new) or
``unknown_configuration`` (no profile of ours uses it on that account).

Whether the stored snapshot drifted from what the file applied is
:func:`service.profile_drift.drifted_fields`'s to say; it is in the audit
detail, and the gauge reads the rows at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.db import profiles
from service.db.pool import Connection
from service.domain import stripe_id
from service.profile_drift import drifted_fields

CONFIGURATION_EVENTS = (
    "billing_portal.configuration.created",
    "billing_portal.configuration.updated",
)

APPLIED = "applied"
SUPERSEDED = "superseded"
UNKNOWN_CONFIGURATION = "unknown_configuration"
INVALID_OBJECT = "invalid_object"


@dataclass(frozen=True, slots=True)
class Reported:
    """A configuration object as an event reports it."""

    configuration_id: str
    updated: datetime
    object: dict[str, Any]


@dataclass(slots=True)
class Stored:
    """What :func:`apply_configuration` did with one report."""

    result: str
    configuration_id: str | None = None
    # Profiles that took the snapshot → the fields drifted from what the file applied
    # (None: the profile has no applied body, so nothing to drift from).
    profiles: dict[str, list[str] | None] = field(default_factory=dict)


def reported(obj: dict[str, Any]) -> Reported | None:
    """The configuration in a ``data.object``; None if it is not one we can use."""
    configuration_id = stripe_id(obj.get("id"), "bpc_")
    updated = obj.get("updated")
    if (
        configuration_id is None
        or len(configuration_id) > 255
        or obj.get("object", "billing_portal.configuration") != "billing_portal.configuration"
        or not isinstance(updated, int)
        or isinstance(updated, bool)
        or updated < 0
    ):
        return None
    return Reported(configuration_id, datetime.fromtimestamp(updated, UTC), obj)


async def apply_configuration(
    conn: Connection, obj: dict[str, Any], *, connected_account: str | None
) -> Stored:
    """Store the reported configuration on its profiles (the caller's transaction)."""
    report = reported(obj)
    if report is None:
        return Stored(INVALID_OBJECT)
    targets = await profiles.store_reported_snapshot(
        conn, report.configuration_id, connected_account, report.object, report.updated
    )
    if not targets:
        return Stored(UNKNOWN_CONFIGURATION, report.configuration_id)
    stored = {
        t.name: (drifted_fields(t.applied, report.object) if t.applied is not None else None)
        for t in targets
        if t.stored
    }
    return Stored(APPLIED if stored else SUPERSEDED, report.configuration_id, stored)
