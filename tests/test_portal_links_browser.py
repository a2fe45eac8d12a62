"""Portal links in a real browser (SPEC §13): Debian's Chromium, driven by Playwright,
through the real service to the stand-in's portal page.

A link is opened as a person opens it: the page submits itself and the browser
ends on the portal; with scripts off the button does the same; the spent link
shows the "used" page; the page loads nothing but itself, and its
Content-Security-Policy blocks a script it does not allow. (Every answer as
bytes is checked in tests/test_portal_links.py.)

Chromium comes from scripts/chromium.sh (apt-get when absent; `make test` runs
it first). These tests skip only where it is absent and cannot be installed.

One Chromium per module, on an event loop of its own in a thread: each test
and the fixtures it uses (service, stand-in, database) run on the test's own
loop (asyncio_default_fixture_loop_scope = "function"), and Playwright's
objects belong to the loop that made them. A test hands a whole browser
scenario (a coroutine taking the Browser, returning plain data) to the
browser's loop and awaits it; its own loop keeps serving the service meanwhile.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, get_unused_port_socket
from playwright.async_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    Request,
    Route,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

from service.app import create_app
from service.metrics import Metrics
from tests.conftest import ServiceTestServer, Standin, make_settings

pytestmark = [
    pytest.mark.usefixtures("world"),
    # The first test's setup may install Chromium with apt-get (a lone pytest run;
    # `make test` installs it beforehand). Every browser wait has its own bound below.
    pytest.mark.timeout(600),
]

T = TypeVar("T")
Scenario = Callable[[Browser], Coroutine[Any, Any, T]]

REPO = Path(__file__).resolve().parent.parent
LINKS = "/v1/portal-links"
# What the machine notes ask of Chromium run as root on a closed network: without
# the background-networking flags it keeps trying to reach Google and stalls.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Every wait in a scenario is bounded by this; well below pytest's 60 s timeout
# so a stuck page fails with Playwright's message rather than a bare timeout.
WAIT_MS = 15_000
LAUNCH_SECONDS = 60.0


# --- the browser --------------------------------------------------------------------


def _chromium_or_skip() -> str:
    """The system Chromium's path, installed by the project's script when absent."""
    script = REPO / "scripts" / "chromium.sh"
    try:
        done = subprocess.run(
            [str(script)], capture_output=True, text=True, timeout=540, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/chromium.sh did not finish within 9 minutes")
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        pytest.skip(f"Chromium is not installed and could not be installed: {why[0]}")
    return done.stdout.strip()


class BrowserThread:
    """Chromium, launched by Playwright on an event loop running in a thread."""

    def __init__(self, executable: str) -> None:
        self._executable = executable
        self._loop = asyncio.new_event_loop()
        # A daemon, so that a browser stuck beyond stop()'s bounds cannot keep pytest alive.
        self._thread = threading.Thread(target=self._loop.run_forever, name="chromium", daemon=True)
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None

    def start(self) -> None:
        self._thread.start()
        self._wait(self._launch(), LAUNCH_SECONDS)

    def stop(self) -> None:
        try:
            self._wait(self._close(), LAUNCH_SECONDS)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(LAUNCH_SECONDS)
            if not self._thread.is_alive():  # a loop still running cannot be closed
                self._loop.close()

    async def run(self, scenario: Scenario[T]) -> T:
        """Run a scenario on the browser's loop; the caller's loop stays free meanwhile."""
        assert self._browser is not None
        future = asyncio.run_coroutine_threadsafe(scenario(self._browser), self._loop)
        return await asyncio.wrap_future(future)

    def _wait(self, coro: Coroutine[Any, Any, None], timeout: float) -> None:
        # From pytest's own (synchronous) fixture code, never from a running loop.
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _launch(self) -> None:
        self._playwright = await async_playwright().start()
        # Playwright gives it a new, empty user-data-dir of its own.
        self._browser = await self._playwright.chromium.launch(
            executable_path=self._executable,
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=LAUNCH_SECONDS * 1000,
        )

    async def _close(self) -> None:
        if self._browser is not None:
            await self._browser.close()
        if self._playwright is not None:
            await self._playwright.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserThread]:
    chromium = BrowserThread(_chromium_or_skip())
    try:
        chromium.start()
        yield chromium
    finally:
        chromium.stop()


# --- the service, at the address its links name -------------------------------------


@dataclass
class Gateway:
    client: TestClient[web.Request, web.Application]
    base: str  # PUBLIC_BASE_URL, the test server's own address
    portal: str  # where the stand-in's portal pages are


@pytest.fixture
async def gateway(database_url: str, standin: Standin) -> AsyncIterator[Gateway]:
    """The service with PUBLIC_BASE_URL = its own real address; portal URLs on the stand-in.

    The address must be known before the settings are made, so the socket is
    bound first (port 0: the kernel picks a free one) and handed to the test
    server as it is: no window in which another process could take the port.
    """
    sock = get_unused_port_socket("127.0.0.1")
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = make_settings(database_url, standin.url, PUBLIC_BASE_URL=base)
    server = ServiceTestServer(create_app(settings, metrics=Metrics()))
    server.socket_factory = lambda host, port, family: sock
    client = TestClient(server)
    # The portal URLs Stripe would put on billing.stripe.com: pages a browser can load.
    standin.state.session_url_base = standin.url
    await client.start_server()
    try:
        assert str(client.make_url("")).rstrip("/") == base
        yield Gateway(client, base, f"{standin.url}/p/session/")
    finally:
        await client.close()
        sock.close()


async def new_link(gateway: Gateway, token: str, body: dict[str, Any]) -> str:
    """POST /v1/portal-links as a service client; the link's URL."""
    resp = await gateway.client.post(
        LINKS,
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    answer = await resp.json()
    assert resp.status == 201, answer
    url: str = answer["url"]
    assert url.startswith(f"{gateway.base}{LINKS}/"), url
    return url


# --- what a scenario reports ---------------------------------------------------------


@dataclass
class Seen:
    """One request the page made, as the browser reported it."""

    method: str
    url: str
    navigation: bool
    redirected_from: str | None

    @classmethod
    def of(cls, request: Request) -> Seen:
        previous = request.redirected_from
        return cls(
            request.method,
            request.url,
            request.is_navigation_request(),
            previous.url if previous is not None else None,
        )


@dataclass
class Visit:
    """What opening a link showed: the link page's answer, where the browser ended."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    final_url: str = ""
    heading: str = ""
    text: str = ""
    customer: str = ""
    back: str | None = None
    requests: list[Seen] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)  # "METHOD status", for failures


async def _page(browser: Browser, *, javascript: bool = True) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(java_script_enabled=javascript)
    context.set_default_timeout(WAIT_MS)
    return context, await context.new_page()


async def _describe(page: Page, visit: Visit) -> Visit:
    visit.final_url = page.url
    visit.heading = await page.locator("h1").inner_text()
    visit.text = await page.locator("body").inner_text()
    if await page.locator("#customer").count():
        visit.customer = await page.locator("#customer").inner_text()
    if await page.locator("#back").count():
        visit.back = await page.locator("#back").get_attribute("href")
    return visit


def open_link(url: str, portal: str, *, javascript: bool) -> Scenario[Visit]:
    """Open ``url`` and end on the portal: by the page's script, or by clicking its button."""

    async def scenario(browser: Browser) -> Visit:
        context, page = await _page(browser, javascript=javascript)
        visit = Visit()
        page.on("request", lambda request: visit.requests.append(Seen.of(request)))
        page.on("response", lambda r: visit.responses.append(f"{r.request.method} {r.status}"))
        try:
            # "commit": the page's script may navigate away before its load event.
            response = await page.goto(url, wait_until="commit")
            assert response is not None
            visit.status = response.status
            visit.headers = await response.all_headers()
            if not javascript:
                await page.locator("#open").click()
            try:
                await page.wait_for_url(re.compile(rf"^{re.escape(portal)}"))
            except PlaywrightError as exc:
                # Say where the browser got stuck instead of only that it timed out.
                shown = await page.locator("body").inner_text(timeout=1000)
                raise AssertionError(
                    f"the browser did not reach the portal: {exc.message.splitlines()[0]};"
                    f" it is on {page.url} showing {shown!r}; responses: {visit.responses}"
                ) from None
            await page.locator("#portal").wait_for()
            return await _describe(page, visit)
        finally:
            await context.close()

    return scenario


def revisit(url: str) -> Scenario[Visit]:
    """Open ``url`` and stay on what it shows."""

    async def scenario(browser: Browser) -> Visit:
        context, page = await _page(browser)
        visit = Visit()
        page.on("request", lambda request: visit.requests.append(Seen.of(request)))
        try:
            response = await page.goto(url)
            assert response is not None
            visit.status = response.status
            visit.headers = await response.all_headers()
            return await _describe(page, visit)
        finally:
            await context.close()

    return scenario


@dataclass
class CspProbe:
    headers: dict[str, str]
    submitted: bool  # the page's own (allowed) script ran: it submitted the form
    violations_before: list[str]  # what the page's own script and style set off
    injection_error: str | None  # what add_script_tag raised, None if it did not
    injected_ran: bool
    violations: list[str]


# Recorded before any of the page's own code runs (an init script is the browser's,
# not the page's, so the CSP does not apply to it).
_RECORD_VIOLATIONS = (
    "window.__violations = [];"
    "document.addEventListener('securitypolicyviolation',"
    " (e) => window.__violations.push(e.effectiveDirective));"
)


def probe_csp(url: str) -> Scenario[CspProbe]:
    """Open the link page with its submission held back, then try to run a script on it."""

    async def scenario(browser: Browser) -> CspProbe:
        context, page = await _page(browser)
        await page.add_init_script(_RECORD_VIOLATIONS)

        async def hold_back(route: Route) -> None:
            # "aborted" (not "failed"): the page stays, no error page replaces it.
            if route.request.method == "POST":
                await route.abort("aborted")
            else:
                await route.continue_()

        await page.route(url, hold_back)
        try:
            # Chromium fires no load event for a page whose form submission was
            # aborted: wait for the held-back POST and the page's button instead.
            async with page.expect_event("requestfailed", lambda r: r.method == "POST") as held:
                response = await page.goto(url, wait_until="commit")
            assert response is not None
            submitted = (await held.value).url == url
            await page.locator("#open").wait_for()
            before = await page.evaluate("window.__violations.slice()")
            error: str | None = None
            try:
                await page.add_script_tag(content="window.__injected = true;")
            except PlaywrightError as exc:
                error = exc.message
            return CspProbe(
                headers=await response.all_headers(),
                submitted=submitted,
                violations_before=before,
                injection_error=error,
                injected_ran=await page.evaluate("window.__injected === true"),
                violations=await page.evaluate("window.__violations"),
            )
        finally:
            await context.close()

    return scenario


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --- the tests ------------------------------------------------------------------------


async def test_the_page_submits_itself_and_the_browser_ends_on_the_portal(
    browser: BrowserThread, gateway: Gateway, token: str, standin: Standin
) -> None:
    url = await new_link(gateway, token, {"user_id": "u_42"})

    visit = await browser.run(open_link(url, gateway.portal, javascript=True))

    assert visit.status == 200
    assert visit.final_url.startswith(gateway.portal)
    assert visit.heading == "Customer portal"
    assert visit.customer == "cus_42"
    # One click, one Stripe session: the one the browser ended on.
    (sent,) = standin.requests()
    assert sent.params["customer"] == "cus_42"
    assert visit.final_url.rpartition("/")[2] in standin.state.portal_sessions

    # Nothing but the page itself until the navigation to the portal: no asset,
    # no other origin; the form's POST went to the link's own URL.
    before = [(seen.method, seen.url) for seen in visit.requests[:2]]
    assert before == [("GET", url), ("POST", url)]
    portal, *after = visit.requests[2:]
    assert portal.navigation
    assert (portal.method, portal.redirected_from) == ("GET", url)
    assert portal.url == visit.final_url
    assert after == []
    assert {origin(seen.url) for seen in visit.requests[:2]} == {gateway.base}


async def test_with_scripts_off_the_button_opens_the_portal(
    browser: BrowserThread, gateway: Gateway, token: str, standin: Standin
) -> None:
    url = await new_link(gateway, token, {"user_id": "u_42"})

    visit = await browser.run(open_link(url, gateway.portal, javascript=False))

    assert visit.status == 200
    assert visit.final_url.startswith(gateway.portal)
    assert visit.heading == "Customer portal"
    assert visit.customer == "cus_42"
    assert len(standin.requests()) == 1
    assert [(seen.method, seen.url) for seen in visit.requests[:2]] == [("GET", url), ("POST", url)]


async def test_a_spent_link_shows_the_used_page(
    browser: BrowserThread, gateway: Gateway, token: str, standin: Standin
) -> None:
    url = await new_link(gateway, token, {"user_id": "u_42"})
    await browser.run(open_link(url, gateway.portal, javascript=True))

    again = await browser.run(revisit(url))

    assert again.status == 410
    assert again.final_url == url  # it stayed: no second session, no redirect
    assert "used" in again.text.lower(), again.text
    assert "expired" not in again.text.lower(), again.text
    assert again.back == "https://app.example.com/account"
    assert "content-security-policy" in again.headers
    assert [(seen.method, seen.url) for seen in again.requests] == [("GET", url)]
    assert len(standin.requests()) == 1


async def test_the_csp_allows_the_page_its_own_script_and_nothing_else(
    browser: BrowserThread, gateway: Gateway, token: str, standin: Standin
) -> None:
    url = await new_link(gateway, token, {"user_id": "u_42"})

    probe = await browser.run(probe_csp(url))

    csp = probe.headers["content-security-policy"]
    directives = {d.strip().split()[0]: d.strip() for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == "default-src 'none'"
    assert re.fullmatch(
        r"script-src '(sha256-[A-Za-z0-9+/]+=*|nonce-[^']+)'", directives["script-src"]
    )
    # The page's own script ran (allowed by its hash or nonce), and neither it
    # nor the page's style set off the policy ...
    assert probe.submitted
    assert probe.violations_before == []
    # ... and one the policy does not allow is refused, and says so.
    assert probe.injection_error is not None
    assert "Content Security Policy" in probe.injection_error
    assert not probe.injected_ran
    assert probe.violations == ["script-src-elem"]
    # The submission was held back in the browser: the link is still unspent.
    assert standin.requests() == []
