"""Linking by Stripe metadata (SPEC §11): what one customer's metadata says, applied.

A Stripe customer whose ``metadata[STRIPE_USER_METADATA_KEY]`` holds one of our
user ids is that user's customer. A :class:`MetadataFact` — "at time *t*,
customer *C* on Connect account *A* (None: the platform) names user *U*, or
nobody" — comes from a ``customer.created`` / ``customer.updated`` webhook (or
from a sync that read the customer). :func:`apply_fact` decides it in the
caller's transaction, one at a time per customer and per user across replicas:

1. **Order.** A fact older than the newest one already decided about *C* (a
   webhook event in ``stripe_events``, whatever it did) is ``superseded``, even
   when the mapping that event made or removed is gone; once *C* was deleted,
   every fact about it is.
2. **Scope.** Only mappings on the fact's own account are touched (Connect
   events touch only that account's mappings); one on another account that
   the fact would have to change is a conflict.
3. **The customer's holder** *V* ≠ *U*: a metadata mapping is unlinked (row
   and subscriptions deleted) unless it is newer than the fact (then the
   whole fact is ``superseded``); an explicit mapping (``import``, ``api``)
   stays, and is a conflict when the metadata names someone else or was
   emptied or removed (a key that was never there says nothing).
4. **The named user** *U*: no mapping → ``linked``; a metadata mapping of
   another customer → ``relinked`` (its old subscriptions deleted) unless it
   is newer than the fact; an explicit mapping of another customer → a
   conflict; already *C* → ``unchanged`` (a metadata row notes the later time,
   an explicit one keeps its source).

Nothing is re-pointed silently: every change and conflict is an audit entry
for the caller's transaction (:func:`audit_entries`) and, after commit, a count
(:func:`count`); linked and re-linked users need a backfill after commit
(:attr:`Decided.linked_users`).

Webhooks call it with the event's id (``service/webhooks.py``). A bulk reader
such as ``sync --from-stripe`` states each customer it lists as
``MetadataFact(customer, user_or_None, False, read_at, connected_account)``
(:func:`fact_from_customer` builds it from the object) and passes
``ties_relink=False``; ``Decided.changes`` / ``conflicts`` / ``superseded``
say what happened, and :func:`audit_entries` and :func:`count` record it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from service.audit import ACTION_MAPPING_CONFLICT, ACTION_MAPPING_LINK, ACTION_MAPPING_UNLINK
from service.db import events, mappings
from service.db.mappings import SOURCE_METADATA, LinkedMapping
from service.db.pool import Connection
from service.domain import stripe_id, user_id
from service.metrics import Metrics

log = structlog.get_logger("app")

# The webhook events that carry a customer's metadata, and the one that ends it.
FACT_EVENTS = ("customer.created", "customer.updated")
CUSTOMER_DELETED = "customer.deleted"
# Webhook results of events that decided something about a customer: they
# order later facts. (Not: unhandled, livemode_mismatch, invalid_object.)
DECIDED_RESULTS = ("applied", "unchanged", "conflict", "superseded", "unknown_customer")

# Changes (the `change` label of portal_gateway_mapping_changes_total).
LINKED = "linked"
RELINKED = "relinked"
UNLINKED = "unlinked"
UNCHANGED = "unchanged"

# Why a fact was not applied to a mapping.
CONFLICT_EXPLICIT = "explicit_mapping"
CONFLICT_OTHER_ACCOUNT = "other_account"
# Two customers name the user at one time (only with ties_relink=False).
CONFLICT_SAME_TIME = "another_customer_same_time"


@dataclass(frozen=True, slots=True)
class MetadataFact:
    """What a customer's metadata said about our users at one time."""

    customer: str
    # The user metadata[KEY] names; None: nobody.
    user_id: str | None
    # Nobody, said out loud: the key emptied, removed, or not one of our user ids.
    # (A customer whose metadata never had the key says nothing about explicit mappings.)
    disowned: bool
    at: datetime
    connected_account: str | None


def fact_from_customer(
    obj: dict[str, Any],
    key: str,
    *,
    at: datetime,
    connected_account: str | None,
    previous_attributes: dict[str, Any] | None = None,
) -> MetadataFact | None:
    """The fact a Stripe customer object states; None if it is not a ``cus_`` customer.

    ``previous_attributes`` (a ``customer.updated`` event's) tells a key just
    removed from one that was never there.
    """
    customer = stripe_id(obj.get("id"), "cus_")
    if customer is None or len(customer) > 255:
        return None
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    if obj.get("deleted") is True:
        return MetadataFact(customer, None, False, at, connected_account)
    if key not in metadata:
        previous = (previous_attributes or {}).get("metadata")
        removed = isinstance(previous, dict) and bool(previous.get(key))
        return MetadataFact(customer, None, removed, at, connected_account)
    raw = metadata[key]
    named = user_id(raw)
    if named is None and raw != "":
        # Not one of our user ids: it links nobody. Said, because someone typed it.
        log.warning("metadata_user_invalid", customer=customer, key=key)
    return MetadataFact(customer, named, named is None, at, connected_account)


@dataclass(frozen=True, slots=True)
class Change:
    """A mapping linked, re-linked, unlinked or confirmed by a fact."""

    change: str
    user_id: str
    customer: str
    # relinked: the customer (or account) the user had before.
    previous_customer: str | None = None
    # Subscription rows deleted with the old customer.
    subscriptions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LinkConflict:
    """A fact that a mapping's precedence (or its account) overruled."""

    reason: str
    mapping: LinkedMapping


@dataclass(slots=True)
class Decided:
    """What :func:`apply_fact` did with one fact."""

    fact: MetadataFact
    changes: list[Change] = field(default_factory=list)
    conflicts: list[LinkConflict] = field(default_factory=list)
    superseded: bool = False

    @property
    def result(self) -> str:
        """The webhook result: applied, conflict, superseded or unchanged, in that precedence."""
        if any(c.change != UNCHANGED for c in self.changes):
            return "applied"
        if self.conflicts:
            return "conflict"
        return "superseded" if self.superseded else "unchanged"

    @property
    def linked_users(self) -> list[str]:
        """Users who got a customer: their subscriptions are to be backfilled after commit."""
        return [c.user_id for c in self.changes if c.change in (LINKED, RELINKED)]


async def apply_fact(
    conn: Connection,
    fact: MetadataFact,
    *,
    event_id: str | None = None,
    ties_relink: bool = True,
) -> Decided:
    """Apply one fact in the caller's transaction (see the module docstring).

    ``event_id``: the webhook event stating it, already claimed in this
    transaction (it is not its own newer fact). ``ties_relink``: a user's
    metadata mapping as old as the fact is re-pointed (webhooks: on Stripe's
    one-second ties the later delivery wins); False for a reader whose facts
    all carry one time (``sync``): two customers naming one user is a conflict.
    """
    decided = Decided(fact)
    await mappings.lock_links(conn, fact.customer, fact.user_id)
    newest = await events.newest_customer_fact(
        conn,
        fact.customer,
        types=(*FACT_EVENTS, CUSTOMER_DELETED),
        results=DECIDED_RESULTS,
        deletion_type=CUSTOMER_DELETED,
        excluding=event_id,
    )
    # On a tie (Stripe's `created` has one-second resolution) the later delivery wins.
    if newest is not None and (newest.deleted or newest.created > fact.at):
        decided.superseded = True
        return decided
    rows = await mappings.link_candidates(conn, fact.customer, fact.user_id)
    holder = next((r for r in rows if r.stripe_customer_id == fact.customer), None)
    own = next((r for r in rows if r.user_id == fact.user_id), None)

    # The customer's holder, when the metadata no longer names them.
    if holder is not None and holder.user_id != fact.user_id:
        if holder.connected_account != fact.connected_account:
            if fact.user_id is not None:
                decided.conflicts.append(LinkConflict(CONFLICT_OTHER_ACCOUNT, holder))
        elif holder.source != SOURCE_METADATA:
            if fact.user_id is not None or fact.disowned:
                decided.conflicts.append(LinkConflict(CONFLICT_EXPLICIT, holder))
        elif holder.source_at > fact.at:
            decided.superseded = True
            return decided
        else:
            removed = await mappings.unlink_metadata(conn, holder.user_id, fact.customer)
            assert removed is not None  # locked FOR UPDATE above
            decided.changes.append(
                Change(UNLINKED, holder.user_id, fact.customer, subscriptions=tuple(removed))
            )
            holder = None

    # The user the metadata names.
    if fact.user_id is None or (holder is not None and holder.user_id != fact.user_id):
        return decided  # nobody named, or the customer stays another user's (a conflict above)
    if own is None:
        await mappings.insert_metadata_link(
            conn,
            fact.user_id,
            fact.customer,
            source_at=fact.at,
            connected_account=fact.connected_account,
        )
        decided.changes.append(Change(LINKED, fact.user_id, fact.customer))
    elif own.connected_account != fact.connected_account:
        decided.conflicts.append(LinkConflict(CONFLICT_OTHER_ACCOUNT, own))
    elif own.stripe_customer_id == fact.customer:
        if own.source == SOURCE_METADATA:
            await mappings.confirm_metadata_link(conn, own.user_id, fact.at)
        decided.changes.append(Change(UNCHANGED, own.user_id, fact.customer))
    elif own.source != SOURCE_METADATA:
        decided.conflicts.append(LinkConflict(CONFLICT_EXPLICIT, own))
    elif own.source_at > fact.at:
        decided.superseded = True
    elif own.source_at == fact.at and not ties_relink:
        decided.conflicts.append(LinkConflict(CONFLICT_SAME_TIME, own))
    else:
        previous = own.stripe_customer_id or own.stripe_account_id
        removed = await mappings.relink_metadata(
            conn,
            own.user_id,
            fact.customer,
            source_at=fact.at,
            connected_account=fact.connected_account,
        )
        assert removed is not None  # locked FOR UPDATE above
        decided.changes.append(
            Change(RELINKED, own.user_id, fact.customer, previous, tuple(removed))
        )
    return decided


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit row a decision needs; the caller adds who decided (principal, request)."""

    action: str
    user_id: str
    customer: str
    outcome: str
    detail: dict[str, Any]


def audit_entries(decided: Decided) -> list[AuditEntry]:
    """An entry per change (``mapping.link`` / ``mapping.unlink``) and per conflict."""
    fact = decided.fact
    base: dict[str, Any] = {
        "source": SOURCE_METADATA,
        "source_at": int(fact.at.timestamp()),
        "connected_account": fact.connected_account,
    }
    entries: list[AuditEntry] = []
    for c in decided.changes:
        if c.change == UNCHANGED:
            continue
        action = ACTION_MAPPING_UNLINK if c.change == UNLINKED else ACTION_MAPPING_LINK
        detail = base | {"change": c.change, "subscriptions_removed": list(c.subscriptions)}
        if c.change == RELINKED:
            detail["previous_customer"] = c.previous_customer
        entries.append(AuditEntry(action, c.user_id, c.customer, "applied", detail))
    for conflict in decided.conflicts:
        kept = conflict.mapping
        detail = base | {
            "reason": conflict.reason,
            "metadata_user": fact.user_id,
            "mapped_user": kept.user_id,
            "mapped_customer": kept.stripe_customer_id or kept.stripe_account_id,
            "mapped_source": kept.source,
            "mapped_account": kept.connected_account,
        }
        # Named for the user the metadata points elsewhere; for a removal, the holder.
        entries.append(
            AuditEntry(
                ACTION_MAPPING_CONFLICT,
                fact.user_id or kept.user_id,
                fact.customer,
                "conflict",
                detail,
            )
        )
    return entries


def count(metrics: Metrics | None, decided: Decided) -> None:
    """The decision in ``portal_gateway_mapping_changes_total`` and ``…_conflicts_total``."""
    if metrics is None:
        return
    for c in decided.changes:
        metrics.mapping_changes.labels(source=SOURCE_METADATA, change=c.change).inc()
    if decided.conflicts:
        metrics.mapping_conflicts.labels(source=SOURCE_METADATA).inc(len(decided.conflicts))
