"""The profiles file (SPEC §12): read, validate and resolve it before anything is written.

``portal-gateway profiles plan|apply FILE`` start here. :func:`load_profiles`
reads the YAML file, checks every profile against the parameters Stripe's
portal configurations take in API version ``2025-09-30.clover``, resolves
plan names to price ids through the plans table, and returns one
:class:`ProfileSpec` per profile — or raises :class:`ProfilesFileError` with
every problem found, each one line naming the file and the line. Nothing is
written anywhere; callers act only on a file that passed.

The format (``deploy/profiles.example.yaml`` is a commented example)::

    profiles:
      - name: default            # 1-128 characters, unique in the file
        default: true            # at most one profile; default false
        self_serve: false        # end users may name it (SPEC §5); default false
        on_behalf_of: null       # acct_…, sessions' on_behalf_of
        connected_account: null  # acct_…: the configuration lives on that account
        default_return_url: https://app.example.com/account   # RETURN_URL_ALLOWLIST
        configuration:           # Stripe's create parameters, less metadata
          name: Default portal   # optional label
          business_profile: {headline: "Manage your plan",       # at most 60 characters
                             privacy_policy_url: https://…, terms_of_service_url: https://…}
          features:              # required; each feature given needs `enabled`
            invoice_history: {enabled: true}
            payment_method_update: {enabled: true}
            customer_update: {enabled: true, allowed_updates: [email, address]}
            subscription_cancel:
              enabled: true
              mode: at_period_end            # or immediately
              proration_behavior: none       # create_prorations only with immediately
              cancellation_reason: {enabled: true, options: [too_expensive, other]}
            subscription_update:
              enabled: true
              default_allowed_updates: [price, quantity]
              proration_behavior: create_prorations
              products:                      # at most 10
                - product: prod_Pro
                  prices: [pro-monthly, price_1Pro]  # plan names, or price_ ids as is
                  adjustable_quantity: {enabled: true, minimum: 1, maximum: 10}
              schedule_at_period_end: {conditions: [{type: decreasing_item_amount}]}
              trial_update_behavior: end_trial
          login_page: {enabled: false}

Rules beyond the shape: unknown keys are refused at every depth (the
parameters that came after ``2025-09-30.clover`` with a message saying so);
``metadata`` is ours (apply writes it), ``active`` is apply's and --prune's,
and the configuration's ``default_return_url`` is the profile's. A null value
is the same as leaving the key out. A plan named under ``prices`` must exist
and be active. The profile's ``default_return_url`` passes the return-URL rule
of SPEC §5; the business profile's URLs must be absolute https URLs (they are
links, not redirects, so the allowlist does not apply).

The returned ``configuration`` is exactly the Stripe parameters the file
declares, prices resolved to price ids and the profile's ``default_return_url``
added when set; :func:`content_hash` is the sha256 of its canonical JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from service.config import Settings
from service.db.plans import plans_by_name
from service.db.pool import Database
from service.return_urls import (
    MAX_URL_LENGTH,
    ReturnUrlMalformed,
    ReturnUrlNotAllowed,
    check_return_url,
)

API_VERSION: Final = "2025-09-30.clover"
MAX_NAME_LENGTH: Final = 128  # profile and plan names, as the API and the importer take them
MAX_ID_LENGTH: Final = 255
MAX_PRODUCTS: Final = 10  # Stripe's limit on features.subscription_update.products
MAX_HEADLINE: Final = 60  # Stripe's limit on business_profile.headline
# Aliases let a small file name a node many times over ("billion laughs"); the
# walk expands them, so it stops past this many values.
MAX_NODES: Final = 100_000

CUSTOMER_UPDATE_FIELDS: Final = ("address", "email", "name", "phone", "shipping", "tax_id")
CANCEL_MODES: Final = ("at_period_end", "immediately")
PRORATION_BEHAVIORS: Final = ("always_invoice", "create_prorations", "none")
CANCELLATION_REASONS: Final = (
    "customer_service",
    "low_quality",
    "missing_features",
    "other",
    "switched_service",
    "too_complex",
    "too_expensive",
    "unused",
)
SUBSCRIPTION_UPDATES: Final = ("price", "promotion_code", "quantity")
SCHEDULE_CONDITIONS: Final = ("decreasing_item_amount", "shortening_interval")
TRIAL_UPDATE_BEHAVIORS: Final = ("continue_trial", "end_trial")

# Stripe ids are a prefix and an alphanumeric tail; "_" is accepted in the tail,
# which hand-made test ids use (as the importer does).
_ID_TAIL = re.compile(r"[A-Za-z0-9_]+")
_SCALAR_TAGS: Final = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:float": "a number",
}


@dataclass(frozen=True)
class ProfileSpec:
    """One profile of the file, validated, its prices resolved to price ids."""

    name: str
    default: bool
    self_serve: bool
    on_behalf_of: str | None
    connected_account: str | None
    default_return_url: str | None
    # The Stripe parameters body: business_profile, features, login_page, name,
    # default_return_url — whichever the file gives; prices are price_ ids.
    configuration: dict[str, Any]
    line: int  # where the profile starts in the file


def content_hash(spec: ProfileSpec) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces) of the configuration params."""
    canonical = json.dumps(spec.configuration, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem of the file; ``str()`` is one line: ``FILE line N: problem``."""

    file: str
    line: int | None
    problem: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file} line {self.line}"
        # One line, whatever a value or a file name contains.
        return " ".join(f"{where}: {self.problem}".splitlines())


class ProfilesFileError(Exception):
    """The file is not usable; nothing was written.

    ``problems`` holds every problem found, by line; ``str()`` is one line per
    problem (``FILE line N: problem``), so the CLI can print it as it is.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(*self.problems)

    @property
    def lines(self) -> list[str]:
        """The problems, one line each."""
        return [str(p) for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines)


async def load_profiles(path: Path, db: Database, settings: Settings) -> list[ProfileSpec]:
    """The profiles of ``path``, validated and resolved; ProfilesFileError lists what is wrong.

    The database is read (never written) to resolve plan names; it raises
    DatabaseUnavailable if it does not answer.
    """
    path = Path(path)
    # Reading and checking is file I/O and CPU: keep it off the event loop.
    checker = await asyncio.to_thread(_check_file, path, settings)
    # No plan names, no query: a file of price_ ids needs no database.
    checker.resolve(await plans_by_name(db, {ref.name for ref in checker.plan_refs}))
    if checker.problems:
        raise ProfilesFileError(sorted(checker.problems, key=lambda p: p.line or 0))
    return checker.specs()


# --- the checker --------------------------------------------------------------


class _TooLarge(Exception):
    """The walk went past MAX_NODES."""


class _Invalid:
    """A value that failed its check (already reported); cross-field rules skip it."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()
Check = Callable[["_Checker", Node, str], Any]


@dataclass(slots=True)
class _PlanRef:
    """A plan name under ``prices``, to be replaced by its price id."""

    name: str
    line: int
    prices: list[Any]  # the list it stands in
    index: int


@dataclass(slots=True)
class _Prices:
    """One ``prices`` list with the line of each entry, checked for duplicates once resolved."""

    path: str
    values: list[Any]
    lines: list[int]


@dataclass(slots=True)
class _Profile:
    values: dict[str, Any]
    line: int


@dataclass
class _Checker:
    """Walks the composed YAML nodes, collecting problems with their lines."""

    file: str
    settings: Settings
    problems: list[Problem] = field(default_factory=list)
    plan_refs: list[_PlanRef] = field(default_factory=list)
    prices: list[_Prices] = field(default_factory=list)
    profiles: list[_Profile] = field(default_factory=list)
    # The key node of each mapping value (by id): a block mapping starts on its
    # first key, but a key missing from it is best reported on its parent key.
    keys: dict[int, Node] = field(default_factory=dict)
    visited: int = 0
    constructor: SafeConstructor = field(default_factory=SafeConstructor)

    def error(self, node: Node | int | None, problem: str) -> Any:
        """Record a problem at ``node`` (or a line number); returns INVALID for the caller."""
        line = node if isinstance(node, int) or node is None else _line(node)
        self.problems.append(Problem(self.file, line, problem))
        return INVALID

    def visit(self) -> None:
        """Count one value checked; stop the walk past MAX_NODES."""
        self.visited += 1
        if self.visited > MAX_NODES:
            raise _TooLarge

    def scalar(self, node: Node) -> Any:
        """The value of a plain YAML scalar (string, boolean, integer, number, null)."""
        assert isinstance(node, ScalarNode)
        assert node.tag in _SCALAR_TAGS
        return self.constructor.construct_object(node)

    def resolve(self, plans: Mapping[str, Any]) -> None:
        """Replace plan names by their price ids; report unknown and inactive plans."""
        for ref in self.plan_refs:
            plan = plans.get(ref.name)
            if plan is None:
                self.error(ref.line, f"unknown plan {_shown(ref.name)} (not in the plans table)")
            elif not plan.active:
                self.error(ref.line, f"plan {_shown(ref.name)} is not active")
            else:
                ref.prices[ref.index] = plan.stripe_price_id
        for prices in self.prices:
            seen: dict[str, int] = {}
            for value, line in zip(prices.values, prices.lines, strict=True):
                if not isinstance(value, str):
                    continue  # unresolved: reported above
                if value in seen:
                    self.error(
                        line,
                        f"{prices.path}: {value} is listed twice (first on line {seen[value]})",
                    )
                else:
                    seen[value] = line

    def specs(self) -> list[ProfileSpec]:
        out = []
        for profile in self.profiles:
            v = profile.values
            configuration = dict(v["configuration"])
            if v.get("default_return_url") is not None:
                configuration["default_return_url"] = v["default_return_url"]
            out.append(
                ProfileSpec(
                    name=v["name"],
                    default=v.get("default", False),
                    self_serve=v.get("self_serve", False),
                    on_behalf_of=v.get("on_behalf_of"),
                    connected_account=v.get("connected_account"),
                    default_return_url=v.get("default_return_url"),
                    configuration=configuration,
                    line=profile.line,
                )
            )
        return out


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _shown(value: object) -> str:
    """A value quoted for a message: escaped, so the message stays one line."""
    text = str(value)
    return repr(text if len(text) <= 60 else text[:60] + "…")


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _SCALAR_TAGS.get(node.tag, f"a value tagged {node.tag}")


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _check_file(path: Path, settings: Settings) -> _Checker:
    checker = _Checker(path.name, settings)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        checker.error(None, "is not UTF-8 text")
        return checker
    except OSError as exc:
        checker.error(None, f"cannot read the file ({exc.strerror or exc})")
        return checker
    try:
        # compose, not load: nodes keep their line, and nothing is constructed
        # but the plain scalars this module asks for (SafeLoader's resolver).
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        checker.error(line, f"not valid YAML: {exc.problem or exc.context}")
        return checker
    except yaml.YAMLError as exc:
        checker.error(None, f"not valid YAML: {exc}")
        return checker
    if root is None:
        checker.error(1, "the file is empty; it must declare `profiles:`")
        return checker
    try:
        _root(checker, root)
    except _TooLarge:
        checker.problems = [
            Problem(checker.file, None, f"too large: more than {MAX_NODES} values to check")
        ]
        checker.plan_refs.clear()
    return checker


# --- scalar checks -------------------------------------------------------------


def _typed(ck: _Checker, node: Node, path: str, tag: str, what: str) -> Any:
    ck.visit()
    if not isinstance(node, ScalarNode) or node.tag != f"tag:yaml.org,2002:{tag}":
        return ck.error(node, f"{path}: must be {what} (got {_kind(node)})")
    return ck.scalar(node)


def _boolean(ck: _Checker, node: Node, path: str) -> Any:
    return _typed(ck, node, path, "bool", "true or false")


def _string(ck: _Checker, node: Node, path: str) -> Any:
    value = _typed(ck, node, path, "str", "a string")
    if value is INVALID:
        return value
    if not value:
        return ck.error(node, f"{path}: must not be empty (leave the key out for none)")
    if not value.isprintable():
        return ck.error(node, f"{path}: contains a control or invisible character")
    return value


def _text(max_length: int) -> Check:
    def check(ck: _Checker, node: Node, path: str) -> Any:
        value = _string(ck, node, path)
        if value is not INVALID and len(value) > max_length:
            return ck.error(
                node, f"{path}: must be at most {max_length} characters (got {len(value)})"
            )
        return value

    return check


def _name(ck: _Checker, node: Node, path: str) -> Any:
    value = _text(MAX_NAME_LENGTH)(ck, node, path)
    if value is not INVALID and value != value.strip():
        return ck.error(node, f"{path}: has leading or trailing whitespace: {_shown(value)}")
    return value


def _integer(minimum: int) -> Check:
    def check(ck: _Checker, node: Node, path: str) -> Any:
        value = _typed(ck, node, path, "int", "an integer")
        if value is not INVALID and value < minimum:
            return ck.error(node, f"{path}: must be at least {minimum} (got {value})")
        return value

    return check


def _choice(choices: Sequence[str]) -> Check:
    def check(ck: _Checker, node: Node, path: str) -> Any:
        ck.visit()
        if not isinstance(node, ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            got = _kind(node)
        elif node.value in choices:
            return node.value
        else:
            got = _shown(node.value)
        return ck.error(node, f"{path}: must be one of {', '.join(choices)} (got {got})")

    return check


def _stripe_id(prefix: str) -> Check:
    def check(ck: _Checker, node: Node, path: str) -> Any:
        value = _typed(ck, node, path, "str", f"an id starting with {prefix}")
        if value is INVALID:
            return value
        return _stripe_id_value(ck, node, path, prefix, value)

    return check


def _stripe_id_value(ck: _Checker, node: Node, path: str, prefix: str, value: str) -> Any:
    if not value.startswith(prefix):
        return ck.error(node, f"{path}: must be an id starting with {prefix} (got {_shown(value)})")
    if len(value) > MAX_ID_LENGTH or not _ID_TAIL.fullmatch(value, len(prefix)):
        return ck.error(
            node,
            f"{path}: must be {prefix} followed by at most {MAX_ID_LENGTH - len(prefix)} "
            f"letters, digits or _ (got {_shown(value)})",
        )
    return value


def _https_url(ck: _Checker, node: Node, path: str) -> Any:
    """A link shown in the portal: an absolute https URL (any origin)."""
    value = _string(ck, node, path)
    if value is INVALID:
        return value
    problem = None
    try:
        parts = urlsplit(value)
        if len(value) > MAX_URL_LENGTH:
            problem = f"must be at most {MAX_URL_LENGTH} characters"
        elif not value.isascii() or any(c.isspace() or c == "\\" for c in value):
            problem = "contains characters that are not allowed in a URL"
        elif parts.scheme.lower() != "https" or not parts.hostname:
            problem = "must be an absolute https URL"
        elif "@" in parts.netloc:
            problem = "must not contain user information"
        else:
            parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        problem = "is not a valid URL"
    if problem is not None:
        return ck.error(node, f"{path}: {problem} (got {_shown(value)})")
    return value


def _return_url(ck: _Checker, node: Node, path: str) -> Any:
    """Where the portal sends the customer back: the return-URL rule of SPEC §5."""
    value = _typed(ck, node, path, "str", "a URL")
    if value is INVALID:
        return value
    settings = ck.settings
    try:
        return check_return_url(
            value,
            settings.return_url_allowlist,
            allow_http_localhost=settings.allow_http_localhost,
        )
    except (ReturnUrlMalformed, ReturnUrlNotAllowed) as exc:
        if not settings.return_url_allowlist and isinstance(exc, ReturnUrlNotAllowed):
            return ck.error(node, f"{path}: {exc} (RETURN_URL_ALLOWLIST is not set)")
        return ck.error(node, f"{path}: {exc} (got {_shown(value)})")


# --- structure checks -----------------------------------------------------------


def _list_of(item: Check, *, max_items: int | None = None, unique: bool = False) -> Check:
    def check(ck: _Checker, node: Node, path: str) -> Any:
        if not isinstance(node, SequenceNode):
            return ck.error(node, f"{path}: must be a list (got {_kind(node)})")
        ck.visit()
        if max_items is not None and len(node.value) > max_items:
            return ck.error(
                node, f"{path}: at most {max_items} entries allowed (got {len(node.value)})"
            )
        out: list[Any] = []
        seen: dict[Any, int] = {}
        for index, child in enumerate(node.value):
            value = item(ck, child, f"{path}[{index}]")
            if unique and isinstance(value, str):
                if value in seen:
                    ck.error(
                        child,
                        f"{path}: {value} is listed twice (first on line {seen[value]})",
                    )
                    value = INVALID
                else:
                    seen[value] = _line(child)
            out.append(value)
        return out

    return check


@dataclass(frozen=True)
class _Object:
    """A mapping with known keys: what each takes, which are required, which are refused."""

    fields: Mapping[str, Check]
    required: tuple[str, ...] = ()
    # key → why it is refused (a later API version's parameter, or ours to set)
    refused: Mapping[str, str] = field(default_factory=dict)
    # cross-field rules, run on the checked values
    rules: tuple[Callable[[_Checker, MappingNode, str, dict[str, Any]], None], ...] = ()

    def __call__(self, ck: _Checker, node: Node, path: str) -> Any:
        return self.check(ck, node, path)

    def check(self, ck: _Checker, node: Node, path: str) -> Any:
        if not isinstance(node, MappingNode):
            return ck.error(node, f"{path}: must be a mapping (got {_kind(node)})")
        ck.visit()
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                ck.error(key_node, f"{path}: keys must be strings (got {_kind(key_node)})")
                continue
            key = key_node.value
            sub = f"{path}.{key}" if path else key
            if key in seen:
                ck.error(key_node, f"{sub}: given twice (first on line {seen[key]})")
                continue
            seen[key] = _line(key_node)
            if key in self.refused:
                ck.error(key_node, f"{sub}: {self.refused[key]}")
            elif key not in self.fields:
                known = ", ".join(self.fields)
                ck.error(key_node, f"{sub}: unknown key (known here: {known})")
            elif _is_null(value_node):
                if key in self.required:
                    ck.error(value_node, f"{sub}: is required and must not be null")
                    out[key] = INVALID
                # Otherwise null is the same as leaving the key out.
            else:
                ck.keys[id(value_node)] = key_node
                out[key] = self.fields[key](ck, value_node, sub)
        for key in self.required:
            if key not in seen:
                where = ck.keys.get(id(node), node)
                ck.error(where, f"{path + ': ' if path else ''}{key} is required")
                out[key] = INVALID
        for rule in self.rules:
            rule(ck, node, path, out)
        return out


def _later(parameter: str) -> str:
    return (
        f"not a parameter of Stripe API version {API_VERSION} ({parameter} came in a later version)"
    )


def _cancel_rules(ck: _Checker, node: MappingNode, path: str, out: dict[str, Any]) -> None:
    proration = out.get("proration_behavior")
    mode = out.get("mode", "at_period_end")
    where = _value_node(node, "proration_behavior") or node
    if proration == "always_invoice":
        ck.error(
            where, f"{path}.proration_behavior: always_invoice is not allowed for cancellation"
        )
    elif proration == "create_prorations" and mode == "at_period_end":
        ck.error(
            where,
            f"{path}.proration_behavior: create_prorations needs mode: immediately "
            "(cancelling at period end prorates nothing)",
        )


def _unique_products(ck: _Checker, node: MappingNode, path: str, out: dict[str, Any]) -> None:
    products = out.get("products")
    products_node = _value_node(node, "products")
    if not isinstance(products, list) or not isinstance(products_node, SequenceNode):
        return
    seen: dict[str, int] = {}
    for entry, entry_node in zip(products, products_node.value, strict=True):
        product = entry.get("product") if isinstance(entry, dict) else None
        if not isinstance(product, str):
            continue
        if product in seen:
            ck.error(
                entry_node,
                f"{path}.products: {product} is listed twice (first on line {seen[product]})",
            )
        else:
            seen[product] = _line(entry_node)


def _quantity_range(ck: _Checker, node: MappingNode, path: str, out: dict[str, Any]) -> None:
    low, high = out.get("minimum"), out.get("maximum")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        ck.error(node, f"{path}: minimum ({low}) must not be above maximum ({high})")


def _some_feature(ck: _Checker, node: MappingNode, path: str, out: dict[str, Any]) -> None:
    if not node.value:
        # An empty mapping is no parameter at all on the wire: Stripe would say it is missing.
        ck.error(ck.keys.get(id(node), node), f"{path}: name at least one feature")


def _value_node(node: MappingNode, key: str) -> Node | None:
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            found: Node = value_node
            return found
    return None


def _prices(ck: _Checker, node: Node, path: str) -> Any:
    """Plan names (resolved later through the plans table) or price_ ids, as given."""
    if not isinstance(node, SequenceNode):
        return ck.error(node, f"{path}: must be a list (got {_kind(node)})")
    if not node.value:
        return ck.error(node, f"{path}: must name at least one plan or price")
    values: list[Any] = []
    lines: list[int] = []
    for index, child in enumerate(node.value):
        item = f"{path}[{index}]"
        value = _typed(ck, child, item, "str", "a plan name or a price_ id")
        if value is not INVALID:
            if value.startswith("price_"):
                value = _stripe_id_value(ck, child, item, "price_", value)
            else:
                value = _name(ck, child, item)
                if value is not INVALID:
                    ck.plan_refs.append(_PlanRef(value, _line(child), values, index))
        values.append(value)
        lines.append(_line(child))
    ck.prices.append(_Prices(path, values, lines))
    return values


def _enabled_only(**refused: str) -> _Object:
    return _Object({"enabled": _boolean}, required=("enabled",), refused=refused)


_PRODUCT = _Object(
    {
        "product": _stripe_id("prod_"),
        "prices": _prices,
        "adjustable_quantity": _Object(
            {"enabled": _boolean, "minimum": _integer(0), "maximum": _integer(1)},
            required=("enabled",),
            rules=(_quantity_range,),
        ),
    },
    required=("product", "prices"),
)

_FEATURES = _Object(
    {
        "customer_update": _Object(
            {
                "enabled": _boolean,
                "allowed_updates": _list_of(_choice(CUSTOMER_UPDATE_FIELDS), unique=True),
            },
            required=("enabled",),
        ),
        "invoice_history": _enabled_only(),
        "payment_method_update": _enabled_only(
            payment_method_configuration=_later("payment_method_configuration")
        ),
        "subscription_cancel": _Object(
            {
                "enabled": _boolean,
                "mode": _choice(CANCEL_MODES),
                "proration_behavior": _choice(PRORATION_BEHAVIORS),
                "cancellation_reason": _Object(
                    {
                        "enabled": _boolean,
                        "options": _list_of(_choice(CANCELLATION_REASONS), unique=True),
                    },
                    required=("enabled", "options"),
                    refused={"feedback_options": _later("feedback_options")},
                ),
            },
            required=("enabled",),
            rules=(_cancel_rules,),
        ),
        "subscription_update": _Object(
            {
                "enabled": _boolean,
                "default_allowed_updates": _list_of(_choice(SUBSCRIPTION_UPDATES), unique=True),
                "products": _list_of(_PRODUCT, max_items=MAX_PRODUCTS),
                "proration_behavior": _choice(PRORATION_BEHAVIORS),
                "schedule_at_period_end": _Object(
                    {
                        "conditions": _list_of(
                            _Object({"type": _choice(SCHEDULE_CONDITIONS)}, required=("type",))
                        )
                    }
                ),
                "trial_update_behavior": _choice(TRIAL_UPDATE_BEHAVIORS),
            },
            required=("enabled",),
            refused={"billing_cycle_anchor": _later("billing_cycle_anchor")},
            rules=(_unique_products,),
        ),
    },
    refused={"subscription_pause": _later("subscription_pause")},
    rules=(_some_feature,),
)

_CONFIGURATION = _Object(
    {
        "name": _string,
        "business_profile": _Object(
            {
                "headline": _text(MAX_HEADLINE),
                "privacy_policy_url": _https_url,
                "terms_of_service_url": _https_url,
            }
        ),
        "features": _FEATURES,
        "login_page": _enabled_only(),
    },
    required=("features",),
    refused={
        "metadata": "not allowed here: apply writes the configuration's metadata "
        "(portal_gateway_profile, content_hash)",
        "default_return_url": "set default_return_url on the profile, not in its configuration",
        "active": "not set in the file: apply activates, --prune deactivates",
        "expand": "a request option, not part of the configuration",
    },
)

_PROFILE = _Object(
    {
        "name": _name,
        "default": _boolean,
        "self_serve": _boolean,
        "on_behalf_of": _stripe_id("acct_"),
        "connected_account": _stripe_id("acct_"),
        "default_return_url": _return_url,
        "configuration": _CONFIGURATION,
    },
    required=("name", "configuration"),
)


def _root(ck: _Checker, root: Node) -> None:
    if not isinstance(root, MappingNode):
        ck.error(root, f"the file must be a mapping with a `profiles:` list (got {_kind(root)})")
        return
    top = _Object({"profiles": lambda ck, node, path: node}, required=("profiles",))
    values = top.check(ck, root, "")
    node = values.get("profiles")
    if not isinstance(node, Node):
        return  # missing: reported
    if not isinstance(node, SequenceNode):
        ck.error(node, f"profiles: must be a list (got {_kind(node)})")
        return
    names: dict[str, int] = {}
    default_line: int | None = None
    for item in node.value:
        values = _PROFILE.check(ck, item, "")
        if values is INVALID:
            continue
        assert isinstance(item, MappingNode)
        name = values.get("name")
        if isinstance(name, str):
            name_node = _value_node(item, "name") or item
            if name in names:
                ck.error(
                    name_node,
                    f"name: profile {_shown(name)} is declared twice (first on line {names[name]})",
                )
            else:
                names[name] = _line(name_node)
        if values.get("default") is True:
            default_node = _value_node(item, "default") or item
            if default_line is not None:
                ck.error(
                    default_node,
                    f"default: only one profile may be the default (line {default_line} is)",
                )
            else:
                default_line = _line(default_node)
        if not any(v is INVALID for v in values.values()):
            ck.profiles.append(_Profile(values, _line(item)))
