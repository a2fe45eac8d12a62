"""``portal-gateway import KIND FILE.csv``: read, validate, then upsert all or nothing.

The file is read line by line (a 100,000-row file is never held as text), and
every row is validated — cell rules, then duplicates within the file — before
the database is touched. Only then, in one transaction, the cross-table rules
are checked (a customer's portal exists, a subscription's user is mapped, an
external_ref is free) and the rows are upserted in batches (``service.db.imports``).
Any error aborts the whole file and is reported as one line naming the file,
the line (the header is line 1) and the column.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, NamedTuple, TypeVar

from service.config import Settings
from service.db import imports
from service.db.imports import (
    CustomerRow,
    OfferRow,
    PlanRow,
    ProfileRow,
    Refused,
    SubscriptionRow,
)
from service.db.pool import Connection, Database
from service.domain import LOCALES, SUBSCRIPTION_STATUSES
from service.return_urls import ReturnUrlMalformed, ReturnUrlNotAllowed, check_return_url

R = TypeVar("R")

MAX_NAME_LENGTH = 128  # user ids and names, as the API accepts them
MAX_ID_LENGTH = 255  # Stripe ids and external refs
MAX_QUANTITY = 2**31 - 1  # the column is a Postgres integer
OFFER_KINDS = ("coupon", "promotion_code")
BOOLEANS = {"true": True, "false": False}
# Stripe ids are a prefix and an alphanumeric tail; we also accept "_" in the
# tail, which hand-made test ids use.
_ID_TAIL = re.compile(r"[A-Za-z0-9_]+")
_DIGITS = re.compile(r"[0-9]+")


class ImportFailed(Exception):
    """The file was not imported; ``str()`` is the one line the CLI prints."""

    def __init__(
        self,
        file: str,
        problem: str,
        *,
        line: int | None = None,
        column: str | None = None,
        more: int = 0,
    ) -> None:
        super().__init__(file, problem, line, column, more)
        self.file = file
        self.problem = problem
        self.line = line
        self.column = column
        self.more = more

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f" line {self.line}"
        if self.column is not None:
            where += f", column {self.column}"
        text = f"{where}: {self.problem}"
        if self.more:
            text += f" (and {self.more} more error{'s' if self.more > 1 else ''})"
        # One line, whatever a database message or a file name contains.
        return " ".join(text.splitlines())


# --- cell rules ------------------------------------------------------------


class _Invalid(Exception):
    """One bad cell; the reader adds file and line."""

    def __init__(self, column: str, problem: str) -> None:
        super().__init__(column, problem)
        self.column = column
        self.problem = problem


def _shown(value: str) -> str:
    """A cell quoted for an error message: escaped, so the message stays one line."""
    return repr(value if len(value) <= 60 else value[:60] + "…")


def _text(value: str, column: str, max_length: int) -> str:
    if not value:
        raise _Invalid(column, "is required")
    if len(value) > max_length:
        raise _Invalid(column, f"must be at most {max_length} characters")
    if not value.isprintable():
        raise _Invalid(column, f"contains a control or invisible character: {_shown(value)}")
    if value != value.strip():
        # An invisible difference from the name the API will be called with.
        raise _Invalid(column, f"has leading or trailing whitespace: {_shown(value)}")
    return value


def _name(value: str, column: str) -> str:
    return _text(value, column, MAX_NAME_LENGTH)


def _stripe_id(value: str, column: str, prefix: str) -> str:
    if not value:
        raise _Invalid(column, "is required")
    if not value.startswith(prefix):
        raise _Invalid(column, f"must start with {prefix} (got {_shown(value)})")
    if len(value) > MAX_ID_LENGTH:
        raise _Invalid(column, f"must be at most {MAX_ID_LENGTH} characters")
    if not _ID_TAIL.fullmatch(value, len(prefix)):
        raise _Invalid(
            column, f"must be {prefix} followed by letters, digits or _ (got {_shown(value)})"
        )
    return value


def _coupon_id(value: str, column: str) -> str:
    # Coupon ids are chosen freely in Stripe; only the shape is ours to check.
    _text(value, column, MAX_ID_LENGTH)
    if any(ch.isspace() for ch in value):
        raise _Invalid(column, f"must not contain whitespace (got {_shown(value)})")
    return value


def _choice(value: str, column: str, choices: Sequence[str], described: str | None = None) -> str:
    if not value:
        raise _Invalid(column, "is required")
    if value not in choices:
        expected = described or f"one of {', '.join(choices)}"
        raise _Invalid(column, f"must be {expected} (got {_shown(value)})")
    return value


def _boolean(value: str, column: str) -> bool:
    if value not in BOOLEANS:
        got = _shown(value) if value else "an empty cell"
        raise _Invalid(column, f"must be true or false (got {got})")
    return BOOLEANS[value]


def _quantity(value: str, column: str) -> int:
    if not _DIGITS.fullmatch(value):
        raise _Invalid(column, f"must be a non-negative integer (got {_shown(value)})")
    quantity = int(value)
    if quantity > MAX_QUANTITY:
        raise _Invalid(column, f"must be at most {MAX_QUANTITY}")
    return quantity


# --- rows, one parser per kind ----------------------------------------------


def _customer(v: list[str], settings: Settings) -> CustomerRow:
    user_id = _name(v[0], "user_id")
    customer = _stripe_id(v[1], "stripe_customer_id", "cus_") if v[1] else None
    account = _stripe_id(v[2], "stripe_account_id", "acct_") if v[2] else None
    if customer is None and account is None:
        raise _Invalid(
            "stripe_customer_id", "one of stripe_customer_id or stripe_account_id is required"
        )
    if customer is not None and account is not None:
        raise _Invalid(
            "stripe_account_id",
            "must be empty when stripe_customer_id is set (a user maps to exactly one)",
        )
    portal = _name(v[3], "portal") if v[3] else None
    locale = (
        _choice(v[4], "locale", LOCALES, "a Stripe locale such as auto, en, fr-CA or pt-BR")
        if v[4]
        else None
    )
    connected = _stripe_id(v[5], "connected_account", "acct_") if v[5] else None
    return CustomerRow(user_id, customer, account, portal, locale, connected)


def _subscription(v: list[str], settings: Settings) -> SubscriptionRow:
    user_id = _name(v[0], "user_id")
    subscription = _stripe_id(v[1], "stripe_subscription_id", "sub_")
    ref = _text(v[2], "external_ref", MAX_ID_LENGTH) if v[2] else None
    if ref is not None and ref.startswith("sub_"):
        # The API finds a subscription by ref or by sub_ id: they must not collide.
        raise _Invalid("external_ref", f"must not start with sub_ (got {_shown(ref)})")
    status = _choice(v[3], "status", SUBSCRIPTION_STATUSES)
    item = _stripe_id(v[4], "item_id", "si_") if v[4] else None
    price = _stripe_id(v[5], "price_id", "price_") if v[5] else None
    quantity = _quantity(v[6], "quantity") if v[6] else None
    # An empty item_id means several items; a single price or quantity then
    # is a shifted column rather than data.
    if item is None and price is not None:
        raise _Invalid("price_id", "must be empty when item_id is empty (several items)")
    if item is None and quantity is not None:
        raise _Invalid("quantity", "must be empty when item_id is empty (several items)")
    return SubscriptionRow(user_id, subscription, ref, status, item, price, quantity)


def _self_serve(value: str) -> bool:
    """The optional ``self_serve`` column (SPEC §5): empty or absent is false."""
    return _boolean(value, "self_serve") if value else False


def _plan(v: list[str], settings: Settings) -> PlanRow:
    return PlanRow(
        _name(v[0], "plan"),
        _stripe_id(v[1], "stripe_price_id", "price_"),
        _boolean(v[2], "active"),
        _self_serve(v[3]),
    )


def _profile(v: list[str], settings: Settings) -> ProfileRow:
    name = _name(v[0], "name")
    configuration = _stripe_id(v[1], "configuration_id", "bpc_") if v[1] else None
    on_behalf_of = _stripe_id(v[2], "on_behalf_of", "acct_") if v[2] else None
    return_url = None
    if v[3]:
        try:
            return_url = check_return_url(
                v[3],
                settings.return_url_allowlist,
                allow_http_localhost=settings.allow_http_localhost,
            )
        except (ReturnUrlMalformed, ReturnUrlNotAllowed) as exc:
            raise _Invalid("default_return_url", f"{exc} (got {_shown(v[3])})") from None
    return ProfileRow(
        name,
        configuration,
        on_behalf_of,
        return_url,
        _boolean(v[4], "is_default"),
        _self_serve(v[5]),
    )


def _offer(v: list[str], settings: Settings) -> OfferRow:
    name = _name(v[0], "name")
    kind = _choice(v[1], "kind", OFFER_KINDS)
    if kind == "promotion_code":
        stripe_id = _stripe_id(v[2], "stripe_id", "promo_")
    else:
        stripe_id = _coupon_id(v[2], "stripe_id")
    return OfferRow(name, kind, stripe_id, _self_serve(v[3]))


# --- what each kind is ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    """Columns whose values are indexed by first occurrence (unique: duplicates refused)."""

    columns: tuple[str, ...]
    value: Callable[[Any], tuple[str, ...] | None]
    unique: bool = True
    duplicate: str = "duplicate of line {line}"


class _Problem(NamedTuple):
    """One error, located."""

    line: int
    column: str | None
    message: str


@dataclass(slots=True)
class _Parsed(Generic[R]):
    """The validated rows of a file, with their line numbers and key indexes."""

    rows: list[R] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    # key columns → key value → position (in rows/lines) of its first occurrence
    index: dict[tuple[str, ...], dict[tuple[str, ...], int]] = field(default_factory=dict)

    def line_of(self, columns: tuple[str, ...], key: tuple[str, ...]) -> int:
        return self.lines[self.index[columns][key]]


Check = Callable[[Connection, _Parsed[Any]], Awaitable[list[_Problem]]]


@dataclass(frozen=True, slots=True)
class _Kind(Generic[R]):
    """One importable file type: its header, row parser, keys, checks and upsert.

    ``optional`` columns may follow ``columns`` in the header, in that order;
    the parser always gets a cell for each, empty when the header lacks it.
    """

    columns: tuple[str, ...]
    parse: Callable[[list[str], Settings], R]
    keys: tuple[_Key, ...]
    write: Callable[[Connection, Sequence[R]], Awaitable[int]]
    check: Check | None = None
    optional: tuple[str, ...] = ()

    def headers(self) -> list[tuple[str, ...]]:
        """Every header a file of this kind may have, shortest first."""
        return [self.columns + self.optional[:n] for n in range(len(self.optional) + 1)]


async def _check_customers(conn: Connection, parsed: _Parsed[Any]) -> list[_Problem]:
    problems: list[_Problem] = []
    portals = parsed.index[("portal",)]
    for name in await imports.missing(conn, "profiles", [k[0] for k in portals]):
        problems.append(
            _Problem(
                parsed.line_of(("portal",), (name,)),
                "portal",
                f"no portal profile named {_shown(name)} (import profiles first)",
            )
        )
    customers = parsed.index[("stripe_customer_id",)]
    accounts = parsed.index[("stripe_account_id",)]
    users = parsed.index[("user_id",)]
    owners = await imports.stripe_id_owners(
        conn, [k[0] for k in customers], [k[0] for k in accounts]
    )
    for stripe_id, owner in owners.items():
        column = "stripe_customer_id" if (stripe_id,) in customers else "stripe_account_id"
        position = parsed.index[(column,)][(stripe_id,)]
        # Moving an id away from a user who is also in this file is allowed;
        # the database has the last word on the order.
        if owner != parsed.rows[position].user_id and (owner,) not in users:
            problems.append(
                _Problem(
                    parsed.lines[position],
                    column,
                    f"{_shown(stripe_id)} is already mapped to user {_shown(owner)}",
                )
            )
    return problems


async def _check_subscriptions(conn: Connection, parsed: _Parsed[Any]) -> list[_Problem]:
    problems: list[_Problem] = []
    users = parsed.index[("user_id",)]
    for user in await imports.missing(conn, "customers", [k[0] for k in users]):
        problems.append(
            _Problem(
                parsed.line_of(("user_id",), (user,)),
                "user_id",
                f"user {_shown(user)} has no customer mapping (import customers first)",
            )
        )
    refs = parsed.index[("user_id", "external_ref")]
    subscriptions = parsed.index[("stripe_subscription_id",)]
    owners = await imports.external_ref_owners(conn, [(k[0], k[1]) for k in refs])
    for (user, ref), owner in owners.items():
        position = refs[(user, ref)]
        if owner != parsed.rows[position].stripe_subscription_id and (owner,) not in subscriptions:
            problems.append(
                _Problem(
                    parsed.lines[position],
                    "external_ref",
                    f"user {_shown(user)} already has external_ref {_shown(ref)} on {owner}",
                )
            )
    return problems


KINDS: dict[str, _Kind[Any]] = {
    "customers": _Kind(
        columns=("user_id", "stripe_customer_id", "stripe_account_id", "portal", "locale"),
        parse=_customer,
        keys=(
            _Key(("user_id",), lambda r: (r.user_id,)),
            _Key(
                ("stripe_customer_id",),
                lambda r: (r.stripe_customer_id,) if r.stripe_customer_id else None,
            ),
            _Key(
                ("stripe_account_id",),
                lambda r: (r.stripe_account_id,) if r.stripe_account_id else None,
            ),
            _Key(("portal",), lambda r: (r.portal,) if r.portal else None, unique=False),
        ),
        check=_check_customers,
        write=imports.upserting(imports.UPSERT_CUSTOMERS),
        optional=("connected_account",),
    ),
    "subscriptions": _Kind(
        columns=(
            "user_id",
            "stripe_subscription_id",
            "external_ref",
            "status",
            "item_id",
            "price_id",
            "quantity",
        ),
        parse=_subscription,
        keys=(
            _Key(("stripe_subscription_id",), lambda r: (r.stripe_subscription_id,)),
            _Key(
                ("user_id", "external_ref"),
                lambda r: (r.user_id, r.external_ref) if r.external_ref else None,
                duplicate="this user already has this external_ref on line {line}",
            ),
            _Key(("user_id",), lambda r: (r.user_id,), unique=False),
        ),
        check=_check_subscriptions,
        write=imports.upserting(imports.UPSERT_SUBSCRIPTIONS),
    ),
    "plans": _Kind(
        columns=("plan", "stripe_price_id", "active"),
        parse=_plan,
        keys=(_Key(("plan",), lambda r: (r.plan,)),),
        write=imports.upserting(imports.UPSERT_PLANS),
        optional=("self_serve",),
    ),
    "profiles": _Kind(
        columns=("name", "configuration_id", "on_behalf_of", "default_return_url", "is_default"),
        parse=_profile,
        keys=(
            _Key(("name",), lambda r: (r.name,)),
            # "t" is how Postgres prints true in a unique-violation detail.
            _Key(
                ("is_default",),
                lambda r: ("t",) if r.is_default else None,
                duplicate="line {line} is already the default; at most one is_default=true",
            ),
        ),
        write=imports.upsert_profiles,
        optional=("self_serve",),
    ),
    "offers": _Kind(
        columns=("name", "kind", "stripe_id"),
        parse=_offer,
        keys=(_Key(("name",), lambda r: (r.name,)),),
        write=imports.upserting(imports.UPSERT_OFFERS),
        optional=("self_serve",),
    ),
}


# --- reading the file -------------------------------------------------------


def _column_at(prefix: bytes, columns: tuple[str, ...], line: int) -> str | None:
    """The column a byte offset of a line falls in (for encoding errors)."""
    try:
        fields = next(csv.reader([prefix.decode("utf-8", errors="replace")]), [])
    except csv.Error:
        return None
    position = max(len(fields), 1)
    if line > 1 and position <= len(columns):
        return columns[position - 1]
    return str(position)


def _decoded_lines(file: IO[bytes], name: str, columns: tuple[str, ...]) -> Iterator[str]:
    """The file's lines as text, refusing anything but UTF-8 with the line it is on."""
    for number, raw in enumerate(file, start=1):
        if number == 1:
            if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise ImportFailed(name, "is UTF-16 (byte-order mark); save it as UTF-8", line=1)
            # Spreadsheets like to start UTF-8 with a BOM; it is not part of the header.
            raw = raw.removeprefix(codecs.BOM_UTF8)
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise ImportFailed(
                name,
                "contains a NUL byte (is it UTF-16?); save it as UTF-8 text",
                line=number,
                column=_column_at(raw[:nul], columns, number),
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImportFailed(
                name,
                f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save it as UTF-8",
                line=number,
                column=_column_at(raw[: exc.start], columns, number),
            ) from None
        yield text


def _check_header(header: list[str], kind: str, name: str) -> tuple[str, ...]:
    """The file's columns: the kind's, then as many of its optional ones as it names."""
    spec = KINDS[kind]
    if tuple(header) in spec.headers():
        return tuple(header)
    columns = spec.columns
    known = spec.headers()[-1]
    expected = f"the header must be exactly {','.join(columns)}"
    if spec.optional:
        expected += f", optionally followed by {','.join(spec.optional)}"
    for other, other_spec in KINDS.items():
        if tuple(header) in other_spec.headers():
            expected += f" (this looks like a {other} file)"
    for i, (got, want) in enumerate(zip(header, known, strict=False)):
        if got != want:
            raise ImportFailed(
                name, f"expected {want}, got {_shown(got)}; {expected}", line=1, column=str(i + 1)
            )
    if len(header) < len(columns):
        missing = columns[len(header)]
        raise ImportFailed(
            name, f"missing {missing}; {expected}", line=1, column=str(len(header) + 1)
        )
    raise ImportFailed(
        name,
        f"unexpected extra column {_shown(header[len(known)])}; {expected}",
        line=1,
        column=str(len(known) + 1),
    )


def _read(kind: str, path: Path, settings: Settings) -> _Parsed[Any]:
    """Parse and validate the whole file; raise ImportFailed with the first problem."""
    spec = KINDS[kind]
    name = path.name
    try:
        file = path.open("rb")
    except OSError as exc:
        raise ImportFailed(name, f"cannot be read ({exc.strerror})") from None
    with file:
        reader = csv.reader(_decoded_lines(file, name, spec.headers()[-1]), strict=True)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise ImportFailed(name, f"is not valid CSV ({exc})", line=reader.line_num) from None
        if header is None:
            raise ImportFailed(name, f"is empty; expected the header {','.join(spec.columns)}")
        columns = _check_header(header, kind, name)

        parsed: _Parsed[Any] = _Parsed(index={key.columns: {} for key in spec.keys})
        first: _Problem | None = None
        count = 0
        last_line = reader.line_num
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                # Named by the line the broken row starts on (an open quote runs on).
                raise ImportFailed(name, f"is not valid CSV ({exc})", line=last_line + 1) from None
            # A quoted cell may span lines: a row starts after the previous one ended.
            line, last_line = last_line + 1, reader.line_num
            if not values:
                continue  # a blank line, as csv.DictReader skips them
            problem = _validate(values, line, spec, columns, parsed, settings)
            if problem is not None:
                count += 1
                if first is None:
                    first = problem
    if first is not None:
        raise ImportFailed(
            name, first.message, line=first.line, column=first.column, more=count - 1
        )
    return parsed


def _validate(
    values: list[str],
    line: int,
    spec: _Kind[Any],
    columns: tuple[str, ...],
    parsed: _Parsed[Any],
    settings: Settings,
) -> _Problem | None:
    """Check one row (``columns``: the file's header) and add it to ``parsed``.

    Returns the first problem the row has, if any.
    """
    if len(values) < len(columns):
        return _Problem(
            line,
            columns[len(values)],
            f"missing: the line has {len(values)} fields, the header {len(columns)}",
        )
    if len(values) > len(columns):
        return _Problem(
            line,
            str(len(columns) + 1),
            f"unexpected extra field: the line has {len(values)} fields, the header {len(columns)}",
        )
    # Optional columns the header does not name are empty cells to the parser.
    values += [""] * (len(spec.columns) + len(spec.optional) - len(values))
    try:
        row = spec.parse(values, settings)
    except _Invalid as exc:
        return _Problem(line, exc.column, exc.problem)
    position = len(parsed.rows)
    problem = None
    for key in spec.keys:
        value = key.value(row)
        if value is None:
            continue
        seen = parsed.index[key.columns]
        earlier = seen.setdefault(value, position)
        if earlier != position and key.unique and problem is None:
            problem = _Problem(
                line, key.columns[-1], key.duplicate.format(line=parsed.lines[earlier])
            )
    parsed.rows.append(row)
    parsed.lines.append(line)
    return problem


# --- the import -------------------------------------------------------------


def _refused(exc: Refused, name: str, kind: str, parsed: _Parsed[Any]) -> ImportFailed:
    """Name the line and column of a write the database refused, when it says enough."""
    columns = exc.columns
    column = columns[-1] if columns else None
    if column is None and exc.constraint:
        # ck__customers__stripe_customer_id → stripe_customer_id
        parts = exc.constraint.split("__")[2:]
        column = next((p for p in reversed(parts) if p in KINDS[kind].columns), None)
    line = None
    if columns in parsed.index and exc.key is not None:
        # Postgres prints a key as its values joined by ", ".
        printed = {", ".join(k): position for k, position in parsed.index[columns].items()}
        if exc.key in printed:
            line = parsed.lines[printed[exc.key]]
    if exc.key is not None and exc.unique:
        problem = f"{_shown(exc.key)} already exists in the database"
    elif exc.key is not None:
        problem = f"{_shown(exc.key)} does not exist in the database"
    else:
        problem = exc.message
    return ImportFailed(
        name,
        f"refused by the database: {problem} ({exc.constraint or 'no constraint'})",
        line=line,
        column=column,
    )


async def import_csv(db: Database, kind: str, path: Path, settings: Settings) -> int:
    """Import ``path`` as ``kind`` all or nothing; return the number of rows upserted.

    Raises ImportFailed (nothing imported) for any problem with the file;
    DatabaseUnavailable if the database does not answer.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown import kind {kind!r}; one of {', '.join(KINDS)}")
    spec = KINDS[kind]
    name = path.name
    # Parsing is CPU and file I/O: keep it off the event loop.
    parsed = await asyncio.to_thread(_read, kind, path, settings)
    if not parsed.rows:
        return 0
    try:
        async with imports.transaction(db) as conn:
            if spec.check is not None:
                problems = sorted(await spec.check(conn, parsed), key=lambda p: p.line)
                if problems:
                    first = problems[0]
                    raise ImportFailed(
                        name,
                        first.message,
                        line=first.line,
                        column=first.column,
                        more=len(problems) - 1,
                    )
            await spec.write(conn, parsed.rows)
    except Refused as exc:
        raise _refused(exc, name, kind, parsed) from exc
    return len(parsed.rows)
