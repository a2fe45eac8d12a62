"""Turn py-spy's collapsed stacks (``--format raw``) into the profile summary.

Each input line is ``frame;frame;...;leaf COUNT`` with frames like
``function (package/file.py)``. py-spy drops idle samples (the event loop
waiting in epoll), so the samples are where the CPU went; time in C code and
in the kernel (a ``send()`` on a socket) counts for the Python frame that
called it.

The report has four views:

* own time: samples whose innermost frame is that function;
* cumulative: samples with that function anywhere on the stack (once each);
* layers (exclusive, they add up to 100 %): each sample goes to the innermost
  frame that belongs to a library or to our code, skipping asyncio and
  generic stdlib frames (so a socket write goes to asyncpg or aiohttp, whoever
  wrote, and ``dataclasses.asdict`` to the service code that called it);
* steps (inclusive, they nest): the service functions a request goes
  through, with everything they call.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

# Exclusive layers, first match on the frame's file wins.
LAYERS: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "validation",
        "webargs / marshmallow / aiohttp-apigami",
        ("webargs/", "marshmallow/", "aiohttp_apigami/", "apispec/"),
    ),
    (
        "logging",
        "structlog, stdlib logging, ProcessorFormatter, redaction (service/logs.py)",
        ("structlog/", "logging/", "service/logs.py"),
    ),
    ("metrics", "prometheus-client", ("prometheus_client/",)),
    (
        "asyncpg",
        "asyncpg: protocol, pool acquire/release (+ any reset), socket writes",
        ("asyncpg/",),
    ),
    ("jwt", "PyJWT, cryptography, hmac", ("jwt/", "cryptography/", "hmac.py")),
    ("aiohttp_client", "aiohttp client (the Stripe call), incl. its socket writes", ()),
    ("aiohttp_server", "aiohttp server: protocol, parser, request, response writes", ()),
    (
        "service",
        "our own code (service/*.py; for the floor, its handler in bench/)",
        ("service/", "bench/", "floor.py", "scheme.py"),
    ),
    ("event_loop", "asyncio/selectors with no library above them", ()),
    ("other", "anything else", ()),
]
_GENERIC = (
    "asyncio/",
    "selectors.py",
    "dataclasses.py",
    "copy.py",
    "uuid.py",
    "ipaddress.py",
    "typing.py",
    "re/",
    "enum.py",
    "_weakrefset.py",
    "contextlib.py",
    "functools.py",
    "abc.py",
    "<string>",
    "<frozen",
    "json/",
    "urllib/",
    "datetime.py",
    "collections/",
    "threading.py",
    "inspect.py",
    "weakref.py",
)
_CLIENT_FILES = ("aiohttp/client", "aiohttp/connector.py", "aiohttp/tracing.py", "aiohttp/formdata")

# Inclusive steps: (label, function name as py-spy shows it, file).
_AUTH, _DB = "service/auth.py", "service/db/"
STEPS: list[tuple[str, str, str]] = [
    ("access log line + HTTP metrics (access_middleware's own calls)", "=access_middleware", ""),
    ("authenticate: client-token lookup or JWT verify", "Authenticator.authenticate", _AUTH),
    ("  client-token lookup (find_client query)", "find_client", _DB + "clients.py"),
    ("  JWT verify (PyJWT)", "Authenticator._end_user", _AUTH),
    ("body validation (marshmallow)", "_validate", "service/protected.py"),
    ("resolve query (lookups)", "resolve", _DB + "resolve.py"),
    (
        "Stripe call (encode, POST, read, parse)",
        "StripeClient.create_portal_session",
        "service/stripe/client.py",
    ),
    ("audit.emit: row insert + audit log line", "emit", "service/audit.py"),
    ("  audit insert query", "insert", _DB + "audit.py"),
    ("every asyncpg query (Database._run)", "Database._run", _DB + "pool.py"),
    (
        "every socket write (transport.write, incl. kernel)",
        "_SelectorSocketTransport.write",
        "asyncio/selector_events.py",
    ),
    ("every structlog/logging call", "*logging*", ""),
    ("every prometheus-client call", "*metrics*", ""),
]


def _layer_of(file: str) -> str | None:
    for name, _, prefixes in LAYERS:
        if prefixes and file.startswith(prefixes):
            return name
    return None


@dataclass
class Profile:
    samples: int
    own: Counter[str]
    cumulative: Counter[str]
    layers: Counter[str]
    service_files: Counter[str]
    steps: Counter[str]


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for raw in stack.split(";"):
        match = _FRAME.match(raw.strip())
        if match is None:
            continue
        file = match["file"]
        # py-spy shortens site-packages and stdlib paths; make ours relative too.
        for marker in ("/site-packages/", "/work/main/"):
            if marker in file:
                file = file.split(marker, 1)[1]
        out.append((match["func"], file))
    return out


def _classify(frames: list[tuple[str, str]]) -> tuple[str, str | None]:
    """(layer, service file) of one sample."""
    in_client = any(f.startswith(_CLIENT_FILES) for _, f in frames)
    for func, file in reversed(frames):
        if (
            file == "portal-gateway"
            or file.startswith("service/cli.py")
            or (file.endswith("floor.py") and func in ("<module>", "main", "serve"))
        ):
            break  # the process's entry point: only the event loop was below
        if file.startswith(("aiohttp/", "yarl/", "multidict/", "propcache/", "aiosignal/")):
            client = file.startswith(_CLIENT_FILES) or (
                not file.startswith(("aiohttp/web", "aiohttp/http_parser")) and in_client
            )
            return ("aiohttp_client" if client else "aiohttp_server"), None
        layer = _layer_of(file)
        if layer == "service":
            return layer, file
        if layer is not None:
            return layer, None
        if file.startswith(_GENERIC):
            continue
        return "other", None
    return "event_loop", None


def parse(lines: Iterable[str]) -> Profile:
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    service_files: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = _frames(stack)
        if not frames:
            continue
        samples += count
        keys = [f"{func} ({file})" for func, file in frames]
        own[keys[-1]] += count
        for key in set(keys):
            cumulative[key] += count
        layer, service_file = _classify(frames)
        layers[layer] += count
        if service_file is not None:
            service_files[service_file] += count
        for label, func, file in STEPS:
            if func == "*logging*":
                hit = any(_layer_of(f) == "logging" for _, f in frames)
            elif func == "*metrics*":
                hit = any(f.startswith("prometheus_client/") for _, f in frames)
            elif func.startswith("="):
                # The innermost frame of our code is this function: its own calls.
                ours = [fn for fn, f in frames if f.startswith("service/")]
                hit = bool(ours) and ours[-1] == func[1:]
            else:
                hit = any(fn == func and f == file for fn, f in frames)
            if hit:
                steps[label] += count
    return Profile(samples, own, cumulative, layers, service_files, steps)


def report(profile: Profile, *, cpu_us_per_request: float | None, top: int = 30) -> str:
    """The text of ``profile.txt``."""
    n = max(profile.samples, 1)

    def row(count: int, label: str) -> str:
        per = f"{count / n * cpu_us_per_request:7.0f} µs" if cpu_us_per_request else ""
        return f"{count / n:7.1%} {per:>10}  {label}"

    lines = [f"py-spy samples (CPU only, idle dropped): {profile.samples}"]
    if cpu_us_per_request:
        lines.append(
            f"service CPU in this phase: {cpu_us_per_request:.0f} µs/request;"
            " µs below = share × that"
        )
    lines += ["", f"Top {top} by own time (innermost frame):"]
    lines += [row(c, k) for k, c in profile.own.most_common(top)]
    lines += ["", f"Top {top} by cumulative time (anywhere on the stack):"]
    lines += [row(c, k) for k, c in profile.cumulative.most_common(top)]
    lines += ["", "Layers (exclusive: each sample once, to the innermost library or our code):"]
    for name, what, _ in LAYERS:
        lines.append(row(profile.layers.get(name, 0), f"{name:<15} {what}"))
    lines += ["", "  our code by file (own time of service/*.py, generic stdlib calls included):"]
    lines += [row(c, f"  {k}") for k, c in profile.service_files.most_common()]
    lines += ["", "Steps of a request (inclusive: with everything they call; they nest):"]
    for label, _, _ in STEPS:
        lines.append(row(profile.steps.get(label, 0), label))
    return "\n".join(lines) + "\n"


def layer_diff(service: Profile, service_cpu: float, floor: Profile, floor_cpu: float) -> str:
    """Service minus floor, µs per request by layer: where the extra CPU goes."""
    ns, nf = max(service.samples, 1), max(floor.samples, 1)
    lines = [
        "Service minus floor, by layer (µs/request = share × each one's CPU per request):",
        f"{'service':>9} {'floor':>8} {'extra':>8}  layer",
    ]
    total = 0.0
    for name, what, _ in LAYERS:
        s = service.layers.get(name, 0) / ns * service_cpu
        f = floor.layers.get(name, 0) / nf * floor_cpu
        total += s - f
        lines.append(f"{s:9.0f} {f:8.0f} {s - f:+8.0f}  {name:<15} {what}")
    lines.append(f"{service_cpu:9.0f} {floor_cpu:8.0f} {total:+8.0f}  total")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Summarise py-spy raw output.")
    parser.add_argument("raw", type=Path)
    parser.add_argument("--cpu-us-per-request", type=float, default=None)
    args = parser.parse_args()
    with args.raw.open() as lines:
        print(report(parse(lines), cpu_us_per_request=args.cpu_us_per_request), end="")


if __name__ == "__main__":
    main()
