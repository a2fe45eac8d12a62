"""The Grafana dashboard and the Prometheus alert rules of ``deploy/``, proven.

``promtool`` checks the shipped rules and configuration; then a real Prometheus
(Debian's package, installed by ``scripts/prometheus.sh`` when missing) scrapes
the running service every second while the test drives every kind of traffic
and every fault a panel shows, and every PromQL expression of every panel and
every rule is evaluated through Prometheus' HTTP API: each must parse, and each
panel must return data. ``make check-dashboards`` runs just this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import yaml

from service import keys
from tests.conftest import Standin, create_client_token, seed_world
from tests.helpers import (
    configuration_event,
    created,
    customer_event,
    deliver,
    post_session,
    problem,
)
from tests.profile_rows import configuration, seed_profile
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/dashboards/portal-gateway.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
PROVIDERS = ROOT / "deploy/grafana/provisioning/dashboards/portal-gateway.yml"
PROM_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
RUNBOOK = ROOT / "docs/runbook.md"
INSTALLER = ROOT / "scripts/prometheus.sh"
JOB = "portal-gateway"

# What the issue asks the dashboard and the alerts to cover.
REQUIRED_METRICS = {
    "portal_gateway_http_requests_total",
    "portal_gateway_http_request_duration_seconds_bucket",
    "portal_gateway_http_requests_in_flight",
    "portal_gateway_sessions_created_total",
    "portal_gateway_session_errors_total",
    "portal_gateway_upstream_requests_total",
    "portal_gateway_upstream_request_duration_seconds_bucket",
    "portal_gateway_upstream_retries_total",
    "portal_gateway_upstream_circuit_open",
    "portal_gateway_db_query_duration_seconds_bucket",
    "portal_gateway_db_pool_connections",
    "portal_gateway_auth_failures_total",
    "portal_gateway_audit_events_total",
    "portal_gateway_webhook_events_total",
    "portal_gateway_stale_mappings_total",
    "portal_gateway_build_info",
    "portal_gateway_ready",
    "portal_gateway_mapping_changes_total",
    "portal_gateway_mapping_conflicts_total",
    "portal_gateway_profile_drift",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    # SPEC §14: the fleet's limits.
    "portal_gateway_redis_up",
    "portal_gateway_redis_errors_total",
    "portal_gateway_rate_limit_decisions_total",
    "portal_gateway_upstream_budget_waits_total",
    "portal_gateway_upstream_budget_wait_seconds_bucket",
}
REQUIRED_ALERTS = {
    "PortalGatewayErrorBudgetBurnFast",
    "PortalGatewayErrorBudgetBurnSlow",
    "PortalGatewayLatencyP99High",
    "PortalGatewayUpstreamFailures",
    "PortalGatewayUpstreamAuthFailed",
    "PortalGatewayCircuitOpen",
    "PortalGatewayInstanceNotReady",
    "PortalGatewayNoInstanceReady",
    "PortalGatewayAuditWriteFailed",
    "PortalGatewayProfileDrift",
    "PortalGatewayRedisUnavailable",
    "PortalGatewayUpstreamBudgetRefusing",
}
# Alerts the faults driven below must trip, and in which state: `for: 0m` pages at once.
EXPECTED_ALERT_STATES = {
    "PortalGatewayUpstreamAuthFailed": "firing",
    "PortalGatewayAuditWriteFailed": "firing",
    "PortalGatewayCircuitOpen": "pending",
    "PortalGatewayErrorBudgetBurnFast": "pending",
    "PortalGatewayUpstreamFailures": "pending",
    "PortalGatewayLoadShedding": "pending",
    "PortalGatewayProfileDrift": "pending",
}
# ... and those a healthy, ready, fast service must keep quiet.
QUIET_ALERTS = {
    "PortalGatewayInstanceNotReady",
    "PortalGatewayNoInstanceReady",
    "PortalGatewayTargetMissing",
    "PortalGatewayLatencyP99High",
    # Redis came back and the budget made calls wait without refusing any.
    "PortalGatewayRedisUnavailable",
    "PortalGatewayUpstreamBudgetRefusing",
}
WEBHOOK_SECRET = "whsec_dashboardcheck"
METADATA_KEY = "user_id"
# Grafana's $__rate_interval is max(4 x scrape interval, step + scrape interval);
# here the window spans the whole run, so every event driven below is in range.
RATE_INTERVAL = "2m"


# --------------------------------------------------------------------------- the files


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title + refId, expr) of every target of every panel."""
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in _panels() for t in p["targets"]]


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _github_slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _runbook_anchors() -> set[str]:
    return {
        _github_slug(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }


def test_dashboard_is_complete_and_templated() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "portal-gateway"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert "label_values(" in variables[name]["definition"]
    panels = _panels()
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        assert panel.get("description"), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            selectors = re.findall(r"([a-z_:]+)\{([^}]*)\}", expr)
            assert selectors, (panel["title"], expr)
            for metric, matchers in selectors:
                used.add(metric)
                # Every selector follows the dashboard's job and instance variables.
                assert 'job=~"$job"' in matchers, (panel["title"], expr)
                assert 'instance=~"$instance"' in matchers, (panel["title"], expr)
            if "rate(" in expr or "increase(" in expr:
                assert "[$__rate_interval]" in expr, (panel["title"], expr)
    assert used >= REQUIRED_METRICS, REQUIRED_METRICS - used
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in (
        "status",
        "error ratio",
        "p99",
        "by flow",
        "stripe attempt latency",
        "retries",
        "circuit",
        "db query latency",
        "db pool",
        "authentication failures",
        "rate-limited and shed",
        "cpu",
        "memory",
        "redis up",
        "rate-limit decisions by backend",
        "redis errors",
        "stripe budget",
    ):
        assert topic in titles, topic


def test_grafana_provisioning_matches_the_dashboard() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["uid"] == "prometheus"
    assert prometheus["isDefault"] is True
    providers = yaml.safe_load(PROVIDERS.read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_every_alert_has_a_window_a_severity_and_a_runbook_section() -> None:
    alerts = _alerts()
    assert set(alerts) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(alerts)
    anchors = _runbook_anchors()
    for name, rule in alerts.items():
        assert "for" in rule, name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/runbook.md", name
        assert anchor == name.lower(), name
        assert anchor in anchors, f"{name}: no section '## {name}' in docs/runbook.md"
    # Paging on a revoked key and on audit failures must not wait.
    assert alerts["PortalGatewayUpstreamAuthFailed"]["for"] in ("0m", "1m")
    assert alerts["PortalGatewayUpstreamAuthFailed"]["labels"]["severity"] == "critical"
    # The burn-rate alert is multi-window, multi-burn-rate on the 99.9 % objective.
    burn = alerts["PortalGatewayErrorBudgetBurnFast"]["expr"]
    for window in ("rate1h", "rate5m", "rate6h", "rate30m", "14.4 * 0.001", "6 * 0.001"):
        assert window in burn, window


# --------------------------------------------------------------------------- promtool


@dataclass(frozen=True)
class Tools:
    prometheus: str
    promtool: str


@pytest.fixture(scope="module")
def tools() -> Tools:
    """prometheus and promtool, installed with apt (Debian's package) when missing.

    No skip: on a machine where they can't be had, this fails with the reason.
    """
    try:
        done = subprocess.run(
            [str(INSTALLER)], capture_output=True, text=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/prometheus.sh: installing Prometheus took over 10 minutes")
    if done.returncode != 0:
        pytest.fail(
            "Prometheus/promtool are missing and scripts/prometheus.sh could not install "
            f"them (Debian's `prometheus` package):\n{done.stderr.strip()[-2000:]}"
        )
    paths = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return Tools(paths["PROMETHEUS"], paths["PROMTOOL"])


def _promtool(tools: Tools, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [tools.promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


# The first test to ask for the tools may install them: apt gets more than the
# suite's 60 s per test (about 10 s when the package lists are there).
@pytest.mark.timeout(600)
def test_promtool_accepts_the_rules(tools: Tools) -> None:
    output = _promtool(tools, "check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert f"SUCCESS: {len(_rules())} rules found" in output, output


def test_promtool_accepts_the_shipped_config(tools: Tools) -> None:
    # Run from elsewhere: rule_files resolve relative to the config file itself.
    output = _promtool(tools, "check", "config", str(PROM_CONFIG), cwd=ROOT)
    assert "SUCCESS: 1 rule files found" in output, output
    jobs = [j["job_name"] for j in yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"]]
    assert JOB in jobs


# --------------------------------------------------------------------------- a real Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scrape_config(service_port: int, tmp: Path) -> Path:
    """The shipped job (name, path, relabelling) pointed at the service under test."""
    shipped = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == JOB)
    job = {
        **job,
        "static_configs": [{"targets": [f"127.0.0.1:{service_port}"]}],
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [job],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    """A Prometheus server on loopback, queried over its HTTP API."""

    def __init__(self, url: str, http: aiohttp.ClientSession, log: Path) -> None:
        self.url = url
        self.http = http
        self.log = log

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
            return body

    async def query(self, expr: str) -> dict[str, Any]:
        """The API's answer (status, data or error) for an instant query at now."""
        body: dict[str, Any] = await self.api("query", query=expr)
        return body

    async def wait_for(self, what: str, check: Any, within: float = 20) -> Any:
        """Poll ``check()`` until it returns something truthy; fail after ``within`` s."""
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                result = await check()
                if result:
                    return result
            if time.monotonic() > deadline:
                log = self.log.read_text()[-3000:] if self.log.exists() else ""
                pytest.fail(f"Prometheus: timed out waiting for {what}\n{log}")
            await asyncio.sleep(0.2)

    async def last_scrape(self) -> float:
        """Unix time of the latest successful scrape of the service (0 if none yet)."""
        # timestamp() of a bare selector is the sample's own time (of anything
        # else, the evaluation time); the scrape's start, so it saw all before it.
        body = await self.query(f'timestamp(up{{job="{JOB}"}}) and up{{job="{JOB}"}} == 1')
        result = body.get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else 0.0

    async def scraped_after(self, moment: float) -> None:
        """Wait until a scrape that started after ``moment`` is stored."""

        async def check() -> bool:
            return await self.last_scrape() > moment

        await self.wait_for("a scrape of the service", check)


@contextlib.asynccontextmanager
async def running_prometheus(
    tools: Tools, service_port: int, tmp: Path
) -> AsyncIterator[Prometheus]:
    port = _free_port()
    config = _scrape_config(service_port, tmp)
    data = tmp / "data"
    data.mkdir()
    log = tmp / "prometheus.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            tools.prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            prometheus = Prometheus(f"http://127.0.0.1:{port}", http, log)

            async def ready() -> bool:
                if proc.returncode is not None:
                    pytest.fail(f"Prometheus exited ({proc.returncode}):\n{log.read_text()}")
                async with http.get(f"{prometheus.url}/-/ready") as resp:
                    return resp.status == 200

            await prometheus.wait_for("Prometheus to start", ready)
            yield prometheus
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(data, ignore_errors=True)


@dataclass
class Traffic:
    """Everything needed to drive the service the way production would."""

    service: Any
    standin: Standin
    conn: Any
    token: str
    tiny: str  # a client with a rate limit of 1 request per minute


FLOWS: list[dict[str, Any] | None] = [
    None,
    {"type": "payment_method_update"},
    {"type": "subscription_cancel"},
    {"type": "subscription_update"},
    {"type": "subscription_update_confirm", "plan": "pro-yearly"},
]


async def drive(t: Traffic, *, first: bool) -> None:
    """One round of every kind of traffic; each counter a panel rates moves."""
    s, token = t.service, t.token
    for flow in FLOWS:  # successes, per flow
        body: dict[str, Any] = {"user_id": "u_42", **({"flow": flow} if flow else {})}
        await created(await post_session(s, body, token))
    # Callers' mistakes (4xx), unknown routes.
    await problem(await post_session(s, {"user_id": "nobody"}, token), 404, "unknown_user")
    await problem(
        await post_session(s, {"user_id": "u_42", "locale": "xx"}, token), 422, "validation_failed"
    )
    assert (await s.get("/no/such/route")).status == 404
    # Authentication failures, by several reasons.
    await problem(await post_session(s, {"user_id": "u_42"}, None), 401, "unauthenticated")
    await problem(await post_session(s, {"user_id": "u_42"}, ""), 401, "unauthenticated")
    await problem(
        await post_session(s, {"user_id": "u_42"}, "pgw_" + "n" * 43), 401, "unauthenticated"
    )
    # Rate limited: the tiny client's bucket holds one request.
    if first:
        await created(await post_session(s, {"user_id": "u_42"}, t.tiny))
    await problem(await post_session(s, {"user_id": "u_42"}, t.tiny), 429, "rate_limited")
    # Stripe: retried then successful, failing after retries, refusing our key, rejecting.
    t.standin.state.queue_faults([{"status": 429, "headers": {"Retry-After": "0"}}])
    await created(await post_session(s, {"user_id": "u_42"}, token))
    t.standin.state.queue_faults([{"status": 500, "repeat": 2}])
    await problem(await post_session(s, {"user_id": "u_42"}, token), 503, "upstream_unavailable")
    await created(await post_session(s, {"user_id": "u_42"}, token))  # resets the breaker
    t.standin.state.queue_faults([{"status": 401}])
    await problem(await post_session(s, {"user_id": "u_42"}, token), 502, "upstream_auth_failed")
    t.standin.state.queue_faults([{"status": 400, "code": "parameter_invalid_empty"}])
    await problem(await post_session(s, {"user_id": "u_42"}, token), 502, "upstream_rejected")
    if first:  # Stripe no longer knows a mapped customer: the mapping goes stale.
        t.standin.state.missing_ids.add("cus_7")
        await problem(await post_session(s, {"user_id": "u_7"}, token), 502, "upstream_rejected")
        t.standin.state.missing_ids.discard("cus_7")
    # Stripe metadata links a new user (whose backfill is awaited: it calls the
    # stand-in, which later steps script) and names an imported user elsewhere.
    n = 1 if first else 2
    now = int(time.time())
    for customer, user, result in (
        (f"cus_dash{n}", f"u_dash{n}", "applied"),
        (f"cus_dashc{n}", "u_42", "conflict"),
    ):
        obj = {"id": customer, "object": "customer", "metadata": {METADATA_KEY: user}}
        resp = await deliver(s, customer_event("customer.updated", obj, now), secret=WEBHOOK_SECRET)
        assert (await resp.json())["result"] == result
    async with asyncio.timeout(20):
        await s.server.app[keys.BACKFILLER].wait_idle()
    if first:  # The managed profile is edited in the Dashboard: it drifts from the file.
        edited = configuration(
            "bpc_managed1",
            updated=now,
            edit={"features": {"payment_method_update": {"enabled": False}}},
        )
        event = configuration_event("billing_portal.configuration.updated", edited)
        resp = await deliver(s, event, secret=WEBHOOK_SECRET)
        assert (await resp.json())["result"] == "applied"
    # Portal links (SPEC §13): made, viewed, opened, then clicked again (used).
    resp = await s.post(
        "/v1/portal-links",
        data=orjson.dumps({"user_id": "u_42"}),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert resp.status == 201, await resp.text()
    link = urlsplit((await resp.json())["url"]).path
    assert (await s.get(link)).status == 200
    assert (await s.post(link, allow_redirects=False)).status == 303
    assert (await s.post(link, allow_redirects=False)).status == 410
    # A webhook that is not Stripe's.
    resp = await s.post(
        "/v1/stripe/webhooks", data=b"{}", headers={"Stripe-Signature": "t=1,v1=00"}
    )
    assert resp.status == 400
    # The audit trail can't be written: no URL leaves.
    await t.conn.execute("ALTER TABLE audit_events RENAME TO audit_events_away")
    try:
        await problem(
            await post_session(s, {"user_id": "u_42"}, token), 503, "database_unavailable"
        )
    finally:
        await t.conn.execute("ALTER TABLE audit_events_away RENAME TO audit_events")
    # Load shedding: more concurrent requests than MAX_IN_FLIGHT while Stripe is slow.
    t.standin.state.set_latency(400)
    try:
        burst = await asyncio.gather(
            *(post_session(s, {"user_id": "u_42"}, token) for _ in range(10))
        )
    finally:
        t.standin.state.set_latency(0)
    assert {r.status for r in burst} == {201, 503}, [r.status for r in burst]


async def redis_outage(t: Traffic, redis: RedisServer) -> None:
    """Redis stopped: the request still succeeds, deciding alone (a Redis error);
    Redis back: the service shares through it again."""
    redis.stop()
    await created(await post_session(t.service, {"user_id": "u_42"}, t.token))
    shared = t.service.server.app[keys.SHARED_REDIS]
    assert not shared.up
    redis.start()
    async with asyncio.timeout(20):
        while not shared.up:  # asked again after the re-probe backoff (a second)
            await asyncio.sleep(0.1)
            await created(await post_session(t.service, {"user_id": "u_42"}, t.token))


async def open_the_circuit(t: Traffic) -> None:
    """BREAKER_FAILURE_THRESHOLD (2) failed requests in a row; then it fails fast."""
    t.standin.state.queue_faults([{"status": 500, "repeat": 4}])
    for _ in range(2):
        await problem(
            await post_session(t.service, {"user_id": "u_42"}, t.token), 503, "upstream_unavailable"
        )
    calls = len(t.standin.requests())
    await problem(
        await post_session(t.service, {"user_id": "u_42"}, t.token), 503, "upstream_unavailable"
    )
    assert len(t.standin.requests()) == calls  # answered without calling Stripe


def _regex_value(value: str) -> str:
    """A variable's value as Grafana puts it in a ``=~"..."`` matcher: regex-escaped,
    then escaped again as a PromQL string."""
    return re.escape(value).replace("\\", "\\\\")


def _grafana_vars(expr: str, instance: str) -> str:
    """What Grafana sends for this dashboard scoped to the service under test."""
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$job", _regex_value(JOB))
        .replace("$instance", _regex_value(instance))
    )


def _label_values_query(definition: str) -> tuple[str, str]:
    """Grafana's ``label_values(selector, label)`` as PromQL, and the label."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
    assert match, definition
    return f"group by ({match[2]}) ({match[1]})", match[2]


def _shows_something(result: list[dict[str, Any]]) -> bool:
    """At least one real, non-zero number: a rate that moved, a quantile, a gauge."""
    values = [float(r["value"][1]) for r in result]
    return any(math.isfinite(v) and v != 0 for v in values)


async def test_every_panel_and_rule_works_against_a_real_prometheus(
    tools: Tools,
    make_service: Any,
    standin: Standin,
    conn: Any,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    await seed_world(conn)
    # A profile `profiles apply` made, its snapshot still Stripe's answer to it.
    await seed_profile(conn, "managed", "bpc_managed1", snapshot=configuration("bpc_managed1"))
    token = await create_client_token(conn)
    tiny = await create_client_token(conn, name="tiny", rate_limit=1)
    service = await make_service(
        MAX_IN_FLIGHT="4",
        BREAKER_FAILURE_THRESHOLD="2",
        STRIPE_MAX_RETRIES="1",
        STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET,
        STRIPE_USER_METADATA_KEY=METADATA_KEY,
        PUBLIC_BASE_URL="https://billing-gw.example.com",
        # SPEC §14: limits through Redis, and a budget a round of traffic waits for.
        REDIS_URL=redis_server.url,
        STRIPE_MAX_REQUESTS_PER_SECOND="10",
    )
    instance = f"127.0.0.1:{service.server.port}"
    traffic = Traffic(service, standin, conn, token, tiny)

    async with running_prometheus(tools, service.server.port, tmp_path) as prom:
        await prom.scraped_after(0)  # the target is up
        # Two rounds, each seen by a scrape: every counter a panel rates increases
        # between samples, so rates and quantiles are real numbers, not just series.
        await drive(traffic, first=True)
        await prom.scraped_after(time.time())
        await drive(traffic, first=False)
        await redis_outage(traffic, redis_server)
        await open_the_circuit(traffic)
        await prom.scraped_after(time.time())

        async def alerts_tripped() -> bool:
            body = await prom.api("alerts")
            states = {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}
            return all(states.get(k) == v for k, v in EXPECTED_ALERT_STATES.items())

        await prom.wait_for(f"alerts {EXPECTED_ALERT_STATES}", alerts_tripped)

        problems: list[str] = []
        # Every panel query parses and returns data, with at least one real number.
        for name, expr in _panel_queries():
            answer = await prom.query(_grafana_vars(expr, instance))
            if answer.get("status") != "success":
                problems.append(f"panel {name}: {answer.get('error')}\n  {expr}")
                continue
            result = answer["data"]["result"]
            if not _shows_something(result):
                problems.append(f"panel {name}: no data ({result})\n  {expr}")
        # The dashboard's variables find this job and this instance.
        for variable in _dashboard()["templating"]["list"]:
            if variable["type"] != "query":
                continue
            promql, label = _label_values_query(variable["definition"])
            answer = await prom.query(_grafana_vars(promql, instance))
            values = {r["metric"].get(label) for r in answer.get("data", {}).get("result", [])}
            if {"job": JOB, "instance": instance}[label] not in values:
                problems.append(f"variable {variable['name']}: {values} ({answer})")
        # Every rule's expression parses and evaluates; the driven faults trip theirs.
        for rule in _rules():
            name = rule.get("alert") or rule["record"]
            answer = await prom.query(rule["expr"])
            if answer.get("status") != "success":
                problems.append(f"rule {name}: {answer.get('error')}")
                continue
            result = answer["data"]["result"]
            if name in EXPECTED_ALERT_STATES and not result:
                problems.append(f"alert {name}: did not trip on its fault")
            if name in QUIET_ALERTS and result:
                problems.append(f"alert {name}: trips on a healthy service: {result}")
            if "record" in rule and not result:
                problems.append(f"recording rule {name}: no data")
        # Prometheus itself loaded and evaluated every rule without error.
        groups = (await prom.api("rules"))["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        assert len(loaded) == len(_rules())
        problems += [
            f"rule {r['name']}: {r['health']} {r.get('lastError')}"
            for r in loaded
            if r["health"] != "ok"
        ]
        # The circuit panel shows the breaker open right now.
        circuit = await prom.query(
            _grafana_vars(
                next(e for n, e in _panel_queries() if n.startswith("Circuit breaker")), instance
            )
        )
        if [r["value"][1] for r in circuit.get("data", {}).get("result", [])] != ["1"]:
            problems.append(f"circuit panel does not show the open breaker: {circuit}")

    assert problems == [], "\n".join(problems)
