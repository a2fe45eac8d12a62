"""The production image, built and run for real (issue 16).

``deploy/Dockerfile`` built by podman (``scripts/image.sh build``: a Debian
bookworm base made here with debootstrap, as no registry answers), then run
the way the Kubernetes pod runs it: as the image's user, root filesystem
read-only, no capabilities, the secrets as files. In order, in one test (the
build is the slow part, so it is done once):

1. the image: its user, HEALTHCHECK, stop signal, size;
2. what is inside it: no compiler, no ``stripe_standin``, no copy of the
   host's CA bundle that the build mounted;
3. ``portal-gateway migrate`` in a container, on a new database;
4. ``serve`` in a container (host network, a free port) until ``/readyz``;
5. a portal session through it, against the in-process Stripe stand-in;
6. the image's own HEALTHCHECK (``podman healthcheck run``);
7. PID 1 is the service, as uid 10001, on a read-only root;
8. ``podman stop`` (the image's STOPSIGNAL, SIGTERM) → exit code 0;
9. its logs: JSON lines, no secret among them.

It skips only where podman cannot be installed or does not run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.conftest import (
    ALLOWED_ORIGIN,
    LEAK_PATTERNS,
    STRIPE_TEST_KEY,
    Standin,
    _admin_execute,
    _admin_url,
    _with_database,
    create_client_token,
    seed_world,
)
from tests.helpers import PATH

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "image.sh"
UID = 10001
# The image was 243 MB when first built (bookworm's Python and the venv, 115 MB
# of it): a bound with room, that catches a compiler or a cache creeping in.
MAX_IMAGE_MB = 300
# The first run makes the base (debootstrap) and downloads every dependency:
# about two minutes. With the base and the layers cached: seconds.
BUILD_TIMEOUT = 480
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SECRETS_IN_POD = "/var/run/secrets/portal-gateway"
# What the pod has beside its read-only root (deploy/k8s/deployment.yaml).
POD_OPTIONS = (
    "--read-only",
    "--read-only-tmpfs=false",
    "--tmpfs=/tmp:rw,size=64m",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--network=host",
)

# Run inside the image (as root, to see every file): what must not be there.
PROBE = r"""
import hashlib, json, os, re, sys
size, digest = int(sys.argv[1]), sys.argv[2]
compiler = re.compile(r"(gcc|cc|c\+\+|g\+\+|clang|cc1|tcc)(-[0-9.]+)?$|.*-linux-gnu-gcc.*")
found = {"standin": [], "compilers": [], "bundle_copies": []}
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    for name in dirs + files:
        if "stripe_standin" in name:
            found["standin"].append(os.path.join(top, name))
    for name in files:
        path = os.path.join(top, name)
        if compiler.fullmatch(name) and os.access(path, os.X_OK):
            found["compilers"].append(path)
        if size and not os.path.islink(path) and os.path.getsize(path) == size:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == digest:
                    found["bundle_copies"].append(path)
print(json.dumps(found))
"""


# --------------------------------------------------------------------------- helpers


async def _run(*argv: str, within: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{argv[:4]} still running after {within} s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _podman(*args: str, within: float = 60) -> str:
    """podman with the project's containers.conf; its stdout. Fails on an error."""
    code, out, err = await _run(str(SCRIPT), "podman", *args, within=within)
    assert code == 0, f"podman {' '.join(args[:2])}: exit {code}: {err[-2000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Steps:
    """How long each step took: printed at the end (``make image-smoke`` shows it)."""

    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)

    def done(self, what: str) -> None:
        now = time.monotonic()
        self.lines.append(f"{what}: {now - self.last:.1f} s")
        self.last = now

    def report(self) -> None:
        total = time.monotonic() - self.started
        print("\n".join([*self.lines, f"total: {total:.1f} s"]))


def _host_ca_bundle() -> tuple[int, str]:
    """Size and SHA-256 of the host's CA bundle (what the build mounts), or (0, "")."""
    if not HOST_CA_BUNDLE.is_file():
        return 0, ""
    bundle = HOST_CA_BUNDLE.read_bytes()
    return len(bundle), hashlib.sha256(bundle).hexdigest()


def _secret_volume(folder: Path, values: dict[str, str]) -> Path:
    """The pod's secret volume: one file per secret, readable by the image's user."""
    folder.mkdir()
    for key, value in values.items():
        (folder / key).write_text(value + "\n")
        (folder / key).chmod(0o444)
    folder.chmod(0o555)
    return folder


async def _probe(image: str, bundle_size: int, bundle_digest: str) -> dict[str, list[str]]:
    out = await _podman(
        "run", "--rm", "--network=none", "--user=0:0", "--entrypoint=python",
        image, "-c", PROBE, str(bundle_size), bundle_digest,
    )  # fmt: skip
    found: dict[str, list[str]] = json.loads(out)
    return found


@pytest.fixture
async def podman_ready() -> None:
    """podman installed (apt-get when absent) and able to run: else the test skips."""
    code, _, err = await _run(str(SCRIPT), "install", within=300)
    if code != 0:
        pytest.skip(f"podman cannot be installed on this machine: {err.strip()[-300:]}")
    code, _, err = await _run(str(SCRIPT), "podman", "info", within=60)
    if code != 0:
        pytest.skip(f"podman does not run on this machine: {err.strip()[-300:]}")


@dataclass
class Container:
    name: str
    waiter: asyncio.subprocess.Process  # `podman wait`: exits with the container


@pytest.fixture
async def new_database() -> AsyncIterator[str]:
    """A database that does not exist yet: the container's ``migrate`` creates it."""
    name = f"pgw_image_{uuid.uuid4().hex[:12]}"
    try:
        yield _with_database(_admin_url(), name)
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def containers() -> AsyncIterator[list[str]]:
    """Names of the containers the test starts; all removed at the end."""
    names: list[str] = []
    try:
        yield names
    finally:
        for name in names:
            await _run(str(SCRIPT), "podman", "rm", "--force", "--time=0", name)


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(BUILD_TIMEOUT + 120)
@pytest.mark.usefixtures("podman_ready")
async def test_the_image_builds_migrates_serves_and_stops_cleanly(
    standin: Standin, new_database: str, containers: list[str], tmp_path: Path
) -> None:
    steps = Steps()
    code, base, err = await _run(str(SCRIPT), "base", within=BUILD_TIMEOUT)
    assert code == 0, err[-3000:]
    base = base.strip()
    steps.done(f"base {base}")
    code, image, err = await _run(str(SCRIPT), "build", within=BUILD_TIMEOUT)
    (tmp_path / "build.log").write_text(err)
    assert code == 0, err[-3000:]
    image = image.strip()
    # A container that is never started keeps the image from being pruned by
    # another run's build (scripts/image.sh) while this test uses it.
    holder = f"pgw-image-hold-{secrets.token_hex(4)}"
    containers.append(holder)
    await _podman("create", f"--name={holder}", image)
    steps.done("build")

    # 1. The image: its configuration survived the build (--format docker keeps
    # the HEALTHCHECK), and its size.
    (info,) = json.loads(await _podman("image", "inspect", image))
    config = info["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["portal-gateway"]
    assert config["Cmd"] == ["serve"]
    assert config.get("StopSignal") == "SIGTERM"
    healthcheck = info["Healthcheck"]["Test"]
    assert healthcheck[0] == "CMD"
    assert any("/healthz" in word for word in healthcheck)
    size_mb = info["Size"] / 1e6
    assert size_mb < MAX_IMAGE_MB, f"the image is {size_mb:.0f} MB"
    steps.done(f"image {image[:12]}: {size_mb:.0f} MB")

    # 2. Inside: no compiler, no stand-in, and the build's CA mount left no copy
    # of the host's bundle (but for the one the base itself may have).
    bundle_size, bundle_digest = _host_ca_bundle()
    inside, in_base = await asyncio.gather(
        _probe(image, bundle_size, bundle_digest), _probe(base, bundle_size, bundle_digest)
    )
    assert inside["compilers"] == []
    assert inside["standin"] == []
    assert set(inside["bundle_copies"]) <= set(in_base["bundle_copies"])
    diff = json.loads(await _podman("diff", "--format=json", image, base))
    touched = [*(diff.get("added") or []), *(diff.get("changed") or [])]
    # (pip's own Mozilla bundle, pip/_vendor/certifi/cacert.pem, is in the venv.)
    trust_store = re.compile(r"^/(etc/ssl|usr/(local/)?share/ca-certificates)(/|$)")
    assert [p for p in touched if trust_store.match(p)] == []
    steps.done("inside the image")

    secrets_dir = _secret_volume(
        tmp_path / "secrets", {"database-url": new_database, "stripe-api-key": STRIPE_TEST_KEY}
    )
    pod = [
        *POD_OPTIONS,
        f"--volume={secrets_dir}:{SECRETS_IN_POD}:ro",
        f"--env=DATABASE_URL_FILE={SECRETS_IN_POD}/database-url",
    ]

    # 3. The migration Job: `migrate` in a container, on a database it creates.
    await _podman("run", "--rm", *pod, image, "migrate", within=120)
    connection = await asyncpg.connect(new_database)
    try:
        await seed_world(connection)
        token = await create_client_token(connection, name="image-check")
    finally:
        await connection.close()
    steps.done("migrate")

    # 4. `serve`: the image's ENTRYPOINT and CMD, on the host's loopback.
    port = _free_port()
    name = f"pgw-image-{secrets.token_hex(4)}"
    containers.append(name)
    await _podman(
        "run", "--detach", f"--name={name}", *pod,
        f"--env=STRIPE_API_KEY_FILE={SECRETS_IN_POD}/stripe-api-key",
        f"--env=STRIPE_API_BASE={standin.url}",
        f"--env=RETURN_URL_ALLOWLIST={ALLOWED_ORIGIN}",
        "--env=HOST=127.0.0.1", f"--env=PORT={port}", "--env=SHUTDOWN_TIMEOUT=5",
        image,
    )  # fmt: skip
    waiter = await asyncio.create_subprocess_exec(
        str(SCRIPT), "podman", "wait", name,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    served = Container(name, waiter)
    base_url = f"http://127.0.0.1:{port}"
    try:
        await _until_ready(served, base_url + "/readyz", within=30)
        steps.done("serve until /readyz")

        # 5. A portal session through the container, against the stand-in.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                base_url + PATH,
                data=orjson.dumps({"user_id": "u_42", "flow": {"type": "subscription_cancel"}}),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ) as resp,
        ):
            body: dict[str, Any] = await resp.json(content_type=None)
            assert resp.status == 201, body.get("code")
        assert body["url"].startswith("https://")
        assert body["flow"] == "subscription_cancel"
        (sent,) = standin.requests()
        assert sent.params is not None
        assert sent.params["customer"] == "cus_42"
        steps.done("a portal session")

        # 6. The image's HEALTHCHECK, as the engine runs it.
        await _podman("healthcheck", "run", name)
        status = await _podman("inspect", "--format={{.State.Health.Status}}", name)
        assert status.strip() == "healthy"

        # 7. PID 1 is the service itself (exec form), as the image's user, on a
        # read-only root filesystem.
        pid1 = await _podman(
            "exec", name, "python", "-c",
            "import json; print(json.dumps([open('/proc/1/cmdline').read().split('\\0'),"
            " [l.split() for l in open('/proc/1/status') if l.startswith(('Uid:', 'Gid:'))],"
            " [l.split() for l in open('/proc/1/mountinfo') if l.split()[4] == '/']]))",
        )  # fmt: skip
        cmdline, ids, (root_mount,) = json.loads(pid1)
        assert cmdline[:3] == ["/opt/venv/bin/python", "/opt/venv/bin/portal-gateway", "serve"]
        assert ids == [["Uid:", *[str(UID)] * 4], ["Gid:", *[str(UID)] * 4]]
        assert "ro" in root_mount[5].split(","), root_mount
        steps.done("healthcheck, user, read-only root")

        # 8. `podman stop`: SIGTERM (the image's STOPSIGNAL), drain, exit 0 well
        # before podman would resort to SIGKILL.
        started = time.monotonic()
        await _podman("stop", "--time=30", name, within=40)
        exit_code, _ = await asyncio.wait_for(waiter.communicate(), 10)
        assert exit_code.decode().strip() == "0"
        assert time.monotonic() - started < 15
        steps.done("SIGTERM → exit 0")
    finally:
        if waiter.returncode is None:
            await _run(str(SCRIPT), "podman", "rm", "--force", "--time=0", name)
            await waiter.wait()

    # 9. Its logs: JSON lines only, serving then stopped, no secret among them.
    code, out, err = await _run(str(SCRIPT), "podman", "logs", name)
    assert code == 0, err
    lines = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    events = [line["event"] for line in lines]
    assert [e for e in events if e in ("serving", "stopped")] == ["serving", "stopped"]
    assert [line for line in out.splitlines() if LEAK_PATTERNS.search(line)] == []
    steps.report()


async def _until_ready(container: Container, url: str, within: float) -> None:
    """Poll ``url`` until 200; fail at once if the container exits, or after ``within`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            assert container.waiter.returncode is None, f"{container.name} exited before ready"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientConnectionError, TimeoutError):
                pass
            assert loop.time() < end, f"{url} not 200 within {within} s"
            await asyncio.sleep(0.05)
