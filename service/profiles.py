"""``portal-gateway profiles plan|apply|sync``: portal configurations as code (SPEC §12).

The profiles file (:mod:`service.profiles_file`) declares each profile and the
configuration Stripe should hold for it. Three use cases:

* :func:`plan` compares the file with the database alone (no Stripe call): for
  Stripe, the stored ``snapshot`` (Stripe's configuration as last reported by
  ``apply``, ``profiles sync`` or a webhook) stands for Stripe's current
  object; for the database, the row. Per profile and side: ``create``,
  ``update`` (field by field), ``unchanged`` or, when the file did not change
  but the snapshot no longer says what the file applied, ``drifted``
  (:mod:`service.profile_drift`'s rule, the drift gauge's). Managed profiles
  the file no longer declares are prune candidates.
* :func:`apply` makes Stripe, then the rows, match the file. Per profile it
  retrieves the configuration the row names (or, without one, finds ours by
  ``metadata[portal_gateway_profile]``: an apply interrupted between Stripe
  and the database left it there), creates one when there is none, updates it
  when it differs from the file or carries another content hash, and sends
  nothing when it matches. Then, in ONE transaction, the rows (snapshot =
  Stripe's answer), the removal of pruned profiles and one ``profiles_apply``
  audit row. ``--prune`` first deactivates (``active=false``) the
  configurations of managed profiles the file dropped; nothing is deleted at
  Stripe.
* :func:`sync` retrieves each managed profile's configuration, keeps it as the
  snapshot when it is newer than the stored one, and says what drifted.

Idempotency keys: ``profile-<name>-<hash16>-create`` (a rerun of an interrupted
create gets Stripe's first answer), and ``profile-<name>-<hash16>-update-<updated>``
where ``<updated>`` is the configuration's ``updated`` as just retrieved: a
retry of the same update reuses the key, while a later update of the same file
(to repair a Dashboard edit) is a new request, not a replay of the old answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg

from service import audit, upstream_budget
from service.audit import ACTION_PROFILES_APPLY, AuditEvent, AuditRowRefused
from service.config import ConfigError, Settings
from service.db import deployment
from service.db import profiles as profiles_db
from service.db.pool import Database
from service.db.profiles import AppliedProfile, StoredProfile
from service.errors import DatabaseUnavailable, ServiceError
from service.profile_diff import Change, expected_object, file_changes, render, update_params
from service.profile_drift import drifted_fields
from service.profiles_file import ProfileSpec, content_hash, load_profiles
from service.stripe import StripeClient, upstream_error_code

PRINCIPAL_TYPE = "cli"
PRINCIPAL_ID = "profiles"
# The configuration's metadata: which profile it is, and the file content it holds.
METADATA_PROFILE = "portal_gateway_profile"
METADATA_HASH = "content_hash"
HASH_SHOWN = 16

StripeStatus = Literal["create", "update", "unchanged", "drifted"]
DatabaseStatus = Literal["create", "update", "unchanged"]
Report = Callable[[str], None]


class ProfilesFailed(Exception):
    """A plan, apply or sync could not be done; ``str()`` is one line."""


# --- plan ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """What would happen on one side (Stripe or the database) to one profile."""

    status: str
    changes: list[Change] = field(default_factory=list)
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ProfilePlan:
    name: str
    stripe: Side
    database: Side


@dataclass(frozen=True, slots=True)
class Plan:
    """The verdict for every profile of the file, default moves and prune candidates."""

    profiles: list[ProfilePlan]
    # Profiles outside the file that would lose the default flag to one in it.
    demoted: list[str]
    prune: list[StoredProfile]

    def would_change(self, *, prune: bool) -> bool:
        """Whether ``apply`` (with ``--prune`` if ``prune``) would write anything."""
        sides = [s for p in self.profiles for s in (p.stripe, p.database)]
        return (
            any(s.status != "unchanged" for s in sides)
            or bool(self.demoted)
            or (prune and bool(self.prune))
        )

    def lines(self) -> list[str]:
        """The readable plan ``profiles plan`` prints."""
        out: list[str] = []
        for p in self.profiles:
            for label, side in (("stripe", p.stripe), ("database", p.database)):
                note = f" ({side.note})" if side.note else ""
                out.append(f"profile {p.name}: {label}: {side.status}{note}")
                out += [f"  {c.line()}" for c in side.changes]
        for name in self.demoted:
            out.append(f"profile {name}: database: update (not in the file)")
            out.append("  is_default: true → false")
        if self.prune:
            out.append("prune candidates (managed, no longer in the file; apply --prune):")
            for row in self.prune:
                where = f" on {row.connected_account}" if row.connected_account else ""
                out.append(
                    f"  {row.name}: {row.configuration_id}{where} → active: false, row removed"
                )
        count = {s: 0 for s in ("create", "update", "drifted", "unchanged")}
        for p in self.profiles:
            count[p.stripe.status] += 1
        out.append(
            f"plan: stripe {count['create']} to create, {count['update']} to update,"
            f" {count['drifted']} drifted, {count['unchanged']} unchanged;"
            f" {len(self.prune)} prune candidates"
        )
        return out


def plan_profiles(specs: Sequence[ProfileSpec], rows: dict[str, StoredProfile]) -> Plan:
    """Compare the file with the stored rows (pure); see the module docstring."""
    profiles = []
    for spec in specs:
        digest = content_hash(spec)
        row = rows.get(spec.name)
        stripe = _stripe_side(spec, digest, row)
        configuration_id = None if stripe.status == "create" else _owned(spec, row)
        profiles.append(
            ProfilePlan(spec.name, stripe, _database_side(spec, digest, row, configuration_id))
        )
    names = {s.name for s in specs}
    demoted = []
    if any(s.default for s in specs):
        demoted = [r.name for r in rows.values() if r.is_default and r.name not in names]
    prune = [r for r in rows.values() if r.managed and r.name not in names]
    return Plan(profiles, demoted, prune)


def _owned(spec: ProfileSpec, row: StoredProfile | None) -> str | None:
    """The configuration of ours the row names on the file's account, if any."""
    if row is None or not row.managed or row.connected_account != spec.connected_account:
        return None
    return row.configuration_id


def _stripe_side(spec: ProfileSpec, digest: str, row: StoredProfile | None) -> Side:
    configuration_id = _owned(spec, row)
    if row is None or configuration_id is None:
        if row is not None and row.configuration_id is not None:
            return Side("create", note=f"the profile's {row.configuration_id} is not managed here")
        return Side("create")
    # Without a snapshot (none stored yet), what was applied stands for Stripe's object.
    current = row.snapshot or (expected_object(row.applied) if row.applied else None)
    if row.applied_hash != digest:
        found = file_changes(current, spec.configuration, row.applied)
        found.append(Change(("metadata", METADATA_HASH), _short(row.applied_hash), digest[:16]))
        return Side("update", found, configuration_id)
    if row.snapshot is None:
        return Side("unchanged", note=configuration_id)
    found = file_changes(row.snapshot, spec.configuration, row.applied)
    if found or drifted_fields(row.applied or spec.configuration, row.snapshot):
        return Side("drifted", found, f"{configuration_id}; apply puts the file's values back")
    return Side("unchanged", note=configuration_id)


def _database_side(
    spec: ProfileSpec, digest: str, row: StoredProfile | None, configuration_id: str | None
) -> Side:
    if row is None:
        return Side("create")
    wanted: dict[str, Any] = {
        "configuration_id": configuration_id or "(new)",
        "managed": True,
        "is_default": spec.default,
        "self_serve": spec.self_serve,
        "on_behalf_of": spec.on_behalf_of,
        "connected_account": spec.connected_account,
        "default_return_url": spec.default_return_url,
        "applied_hash": digest[:HASH_SHOWN],
    }
    stored = {
        "configuration_id": row.configuration_id,
        "managed": row.managed,
        "is_default": row.is_default,
        "self_serve": row.self_serve,
        "on_behalf_of": row.on_behalf_of,
        "connected_account": row.connected_account,
        "default_return_url": row.default_return_url,
        "applied_hash": _short(row.applied_hash),
    }
    found = [Change((k,), stored[k], v) for k, v in wanted.items() if stored[k] != v]
    return Side("update", found) if found else Side("unchanged")


def _short(digest: str | None) -> str | None:
    return None if digest is None else digest[:HASH_SHOWN]


# --- apply --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What apply did at Stripe for one profile, and the configuration Stripe answered."""

    spec: ProfileSpec
    digest: str
    configuration: dict[str, Any]
    # created | updated | unchanged | adopted (found by metadata, already right)
    did: str
    changes: list[Change]

    @property
    def configuration_id(self) -> str:
        return str(self.configuration["id"])


@dataclass(frozen=True, slots=True)
class Pruned:
    name: str
    configuration_id: str | None
    # deactivated | already_inactive | missing (Stripe does not know it)
    did: str


@dataclass(slots=True)
class Applied:
    """What an apply did; also the ``profiles_apply`` audit row's detail."""

    outcomes: list[Outcome] = field(default_factory=list)
    database: dict[str, str] = field(default_factory=dict)
    pruned: list[Pruned] = field(default_factory=list)
    customers_unassigned: int = 0
    failure: str | None = None

    def lines(self) -> list[str]:
        out = []
        for o in self.outcomes:
            count = len(o.changes)
            fields = f" ({count} field{'s' if count > 1 else ''})" if count else ""
            out.append(
                f"profile {o.spec.name}: stripe: {o.did} {o.configuration_id}{fields};"
                f" database: {self.database.get(o.spec.name, 'not written')}"
            )
            out += [f"  {c.line()}" for c in o.changes]
        for p in self.pruned:
            out.append(f"profile {p.name}: pruned: {p.configuration_id} {p.did}, row removed")
        if self.pruned:
            out.append(f"  {self.customers_unassigned} customers now use the default profile")
        return out

    def detail(self) -> dict[str, Any]:
        def names(did: str) -> list[str]:
            return [o.spec.name for o in self.outcomes if o.did == did]

        detail: dict[str, Any] = {
            "created": {
                o.spec.name: o.configuration_id for o in self.outcomes if o.did == "created"
            },
            "updated": {
                o.spec.name: [c.path for c in o.changes]
                for o in self.outcomes
                if o.did == "updated"
            },
            "adopted": names("adopted"),
            "unchanged": names("unchanged"),
            "database": self.database,
            "pruned": {p.name: p.configuration_id for p in self.pruned},
            "customers_unassigned": self.customers_unassigned,
        }
        if self.failure is not None:
            detail["failed"] = self.failure
        return detail


async def apply(
    db: Database, stripe: StripeClient, specs: Sequence[ProfileSpec], *, prune: bool
) -> Applied:
    """Stripe first, then the rows and the audit row in one transaction; see the module docstring.

    A Stripe failure stops the run: what Stripe accepted before it is still
    written (with the audit row saying where it stopped), then ProfilesFailed.
    """
    rows = await profiles_db.load_profiles(db)
    done = Applied()
    current_name = ""
    try:
        for spec in specs:
            current_name = spec.name
            done.outcomes.append(await _apply_one(stripe, spec, rows.get(spec.name)))
        if prune:
            names = {s.name for s in specs}
            for row in rows.values():
                if row.managed and row.name not in names:
                    current_name = row.name
                    done.pruned.append(await _deactivate(stripe, row))
    except ServiceError as exc:
        done.failure = f"profile {current_name}: {stripe_failure(exc)}"
    try:
        await _write(db, rows, done)
    except (DatabaseUnavailable, AuditRowRefused, asyncpg.PostgresError) as exc:
        # Stripe has what it accepted; its metadata lets the rerun find it.
        before = f"{done.failure}; " if done.failure else ""
        raise ProfilesFailed(
            f"{before}the profile rows could not be written ({type(exc).__name__}):"
            " what Stripe accepted is kept there; run apply again"
        ) from exc
    if done.failure is not None:
        raise ProfilesFailed(done.failure + "; what Stripe accepted before it is stored")
    return done


async def _apply_one(stripe: StripeClient, spec: ProfileSpec, row: StoredProfile | None) -> Outcome:
    digest = content_hash(spec)
    account = spec.connected_account
    current: dict[str, Any] | None = None
    configuration_id = _owned(spec, row)
    if configuration_id is not None:
        try:
            current = await stripe.retrieve_configuration(configuration_id, stripe_account=account)
        except ServiceError as exc:
            if upstream_error_code(exc) != "resource_missing":
                raise
    found_by_metadata = current is None
    if current is None:
        current = await _find_ours(stripe, spec.name, digest, account)
    if current is None:
        created = await stripe.create_configuration(
            {**spec.configuration, "metadata": _metadata(spec.name, digest)},
            idempotency_key=f"{_key(spec.name, digest)}-create",
            stripe_account=account,
        )
        return Outcome(spec, digest, created, "created", [])
    previous = row.applied if row is not None and row.configuration_id == current["id"] else None
    differing = file_changes(current, spec.configuration, previous)
    metadata = current.get("metadata") or {}
    if (
        not differing
        and metadata.get(METADATA_HASH) == digest
        and metadata.get(METADATA_PROFILE) == spec.name
    ):
        return Outcome(spec, digest, current, "adopted" if found_by_metadata else "unchanged", [])
    body = update_params(spec.configuration, differing)
    body["metadata"] = _metadata(spec.name, digest)
    updated = await stripe.update_configuration(
        str(current["id"]),
        body,
        idempotency_key=f"{_key(spec.name, digest)}-update-{current.get('updated', 0)}",
        stripe_account=account,
    )
    if metadata.get(METADATA_HASH) != digest:
        differing.append(
            Change(("metadata", METADATA_HASH), _short(metadata.get(METADATA_HASH)), digest[:16])
        )
    return Outcome(spec, digest, updated, "updated", differing)


async def _find_ours(
    stripe: StripeClient, name: str, digest: str, account: str | None
) -> dict[str, Any] | None:
    """Our configuration for profile ``name`` (by its metadata), preferring an active one
    holding this content; None when Stripe has none."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = await stripe.list_configurations_page(starting_after=after, stripe_account=account)
        found += [c for c in page.data if (c.get("metadata") or {}).get(METADATA_PROFILE) == name]
        if not page.has_more or not page.data:
            break
        after = str(page.data[-1]["id"])
    if not found:
        return None
    # Newest first as listed; the stable sort keeps that order among equals.
    found.sort(
        key=lambda c: (
            c.get("active") is not True,
            (c.get("metadata") or {}).get(METADATA_HASH) != digest,
        )
    )
    return found[0]


async def _deactivate(stripe: StripeClient, row: StoredProfile) -> Pruned:
    if row.configuration_id is None:
        return Pruned(row.name, None, "missing")
    account = row.connected_account
    try:
        current = await stripe.retrieve_configuration(row.configuration_id, stripe_account=account)
    except ServiceError as exc:
        if upstream_error_code(exc) == "resource_missing":
            return Pruned(row.name, row.configuration_id, "missing")
        raise
    if current.get("active") is False:
        return Pruned(row.name, row.configuration_id, "already_inactive")
    await stripe.update_configuration(
        row.configuration_id,
        {"active": False},
        idempotency_key=(
            f"{_key(row.name, row.applied_hash or '')}-deactivate-{current.get('updated', 0)}"
        ),
        stripe_account=account,
    )
    return Pruned(row.name, row.configuration_id, "deactivated")


async def _write(db: Database, rows: dict[str, StoredProfile], done: Applied) -> None:
    """The rows of what Stripe accepted, the removals and the audit row: one transaction."""
    applied = [_applied_row(o) for o in done.outcomes]
    for o, a in zip(done.outcomes, applied, strict=True):
        done.database[o.spec.name] = _database_side(
            o.spec, o.digest, rows.get(o.spec.name), a.configuration_id
        ).status
    async with db.connection() as conn, conn.transaction():
        await profiles_db.write_applied(conn, applied)
        done.customers_unassigned = await profiles_db.delete_managed(
            conn, [p.name for p in done.pruned]
        )
        await audit.emit(
            conn,
            None,
            AuditEvent(
                request_id=uuid.uuid4().hex,
                principal_type=PRINCIPAL_TYPE,
                principal_id=PRINCIPAL_ID,
                action=ACTION_PROFILES_APPLY,
                outcome="failed" if done.failure else "applied",
                http_status=502 if done.failure else 200,
                detail=done.detail(),
            ),
        )


def _applied_row(o: Outcome) -> AppliedProfile:
    spec = o.spec
    return AppliedProfile(
        name=spec.name,
        configuration_id=o.configuration_id,
        on_behalf_of=spec.on_behalf_of,
        default_return_url=spec.default_return_url,
        is_default=spec.default,
        self_serve=spec.self_serve,
        connected_account=spec.connected_account,
        applied=spec.configuration,
        applied_hash=o.digest,
        snapshot=o.configuration,
        snapshot_at=reported_at(o.configuration),
    )


def stripe_failure(exc: ServiceError) -> str:
    """``Stripe: upstream_rejected (resource_missing, param features[...])``: one line."""
    upstream = exc.extra.get("upstream")
    info = upstream if isinstance(upstream, dict) else {}
    said = [str(info["code"])] if info.get("code") else []
    if info.get("param"):
        said.append(f"param {info['param']}")
    return f"Stripe: {exc.code} ({', '.join(said)})" if said else f"Stripe: {exc.code}"


def reported_at(configuration: dict[str, Any]) -> datetime:
    """When Stripe last changed the configuration (its ``updated``; ``created`` without one)."""
    stamp = configuration.get("updated") or configuration.get("created") or 0
    return datetime.fromtimestamp(int(stamp), UTC)


def _metadata(name: str, digest: str) -> dict[str, str]:
    return {METADATA_PROFILE: name, METADATA_HASH: digest}


def _key(name: str, digest: str) -> str:
    return f"profile-{name}-{digest[:16]}"


# --- sync ---------------------------------------------------------------------


@dataclass(slots=True)
class Synced:
    stored: int = 0
    drifted: int = 0
    failed: int = 0


async def sync(db: Database, stripe: StripeClient, report: Report) -> Synced:
    """Retrieve each managed profile's configuration, keep it if newer, say what drifted."""
    rows = await profiles_db.load_profiles(db)
    done = Synced()
    for row in rows.values():
        if not row.managed or row.configuration_id is None:
            continue
        try:
            current = await stripe.retrieve_configuration(
                row.configuration_id, stripe_account=row.connected_account
            )
        except ServiceError as exc:
            done.failed += 1
            report(f"profile {row.name}: {row.configuration_id}: {stripe_failure(exc)}")
            continue
        kept = await profiles_db.store_snapshot(
            db, row.name, row.configuration_id, current, reported_at(current)
        )
        done.stored += kept
        state = "snapshot stored" if kept else "snapshot already current"
        applied = row.applied or {}
        differing = file_changes(current, applied, applied)
        if differing or drifted_fields(applied, current):
            done.drifted += 1
            report(f"profile {row.name}: {row.configuration_id}: drifted ({state})")
            for change in differing:
                applied_value, stripe_value = render(change.new), render(change.old)
                report(f"  {change.path}: applied {applied_value}, Stripe has {stripe_value}")
        else:
            report(f"profile {row.name}: {row.configuration_id}: as applied ({state})")
    return done


# --- the commands -------------------------------------------------------------


async def run_plan(settings: Settings, path: Path) -> Plan:
    """Read the file and the rows (nothing else, nothing written); the plan."""
    db = await Database.connect(settings.database_url.reveal(), query_timeout=10, max_size=2)
    try:
        specs = await load_profiles(path, db, settings)
        return plan_profiles(specs, await profiles_db.load_profiles(db))
    finally:
        await db.close()


async def run_apply(settings: Settings, path: Path, *, prune: bool) -> Applied:
    """Open the pool and the Stripe session, check the mode, read the file, apply it."""
    db = await Database.connect(settings.database_url.reveal(), query_timeout=10, max_size=2)
    session = StripeClient.new_session(settings)
    try:
        specs = await load_profiles(path, db, settings)
        await _check_mode(db, settings)
        async with upstream_budget.for_tool(settings) as budget:
            pace = budget.wait if budget is not None else None
            stripe = StripeClient(session, settings, None, pace=pace, background=True)
            return await apply(db, stripe, specs, prune=prune)
    finally:
        await session.close()
        await db.close()


async def run_sync(settings: Settings, report: Report) -> Synced:
    """Open the pool and the Stripe session, check the mode, sync every managed profile."""
    db = await Database.connect(settings.database_url.reveal(), query_timeout=10, max_size=2)
    session = StripeClient.new_session(settings)
    try:
        await _check_mode(db, settings)
        async with upstream_budget.for_tool(settings) as budget:
            pace = budget.wait if budget is not None else None
            stripe = StripeClient(session, settings, None, pace=pace, background=True)
            return await sync(db, stripe, report)
    finally:
        await session.close()
        await db.close()


async def _check_mode(db: Database, settings: Settings) -> None:
    if await deployment.record_mode(db, settings.livemode) != settings.livemode:
        mode = "test" if settings.livemode else "live"
        raise ConfigError("STRIPE_API_KEY", f"the database maps {mode}-mode Stripe ids")
