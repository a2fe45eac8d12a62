"""SPEC §8 deploy artefacts, checked offline (tests/test_image.py runs the image).

* ``deploy/k8s``: every manifest against the Kubernetes schemas
  (kubernetes-validate, strict), and the invariants that make it safe to run:
  probes on real routes, a grace period that outlasts the drain, non-root and
  read-only, limits sized from the benchmark, no secret values.
* ``deploy/docker-compose.yml``: parses, mounts and builds only files that
  exist, its Prometheus config passes ``promtool``, and its wiring (scrape
  target, Grafana data source, start order) names real services.
* ``deploy/Dockerfile`` and ``.dockerignore``: the image's invariants, parsed
  from the file (hadolint is not available here).
* A production-like run: the service started the way the image starts it,
  from a copy of exactly what the Dockerfile copies, in a read-only working
  directory, with the Kubernetes ConfigMap's variables and the Stripe key and
  database URL as files: ``migrate`` (the Job), then ``serve``; ``/readyz``,
  one portal session, the image's HEALTHCHECK, SIGTERM → exit 0, and nothing
  written outside its temporary directory.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import orjson
import pytest
import yaml

from service import audit_retention
from service.app import create_app
from service.cli import build_parser
from service.config import Settings
from service.handlers.health import metrics_app
from service.metrics import Metrics
from tests.conftest import (
    ALLOWED_ORIGIN,
    LEAK_PATTERNS,
    STRIPE_TEST_KEY,
    Standin,
    _admin_execute,
    _admin_url,
    _with_database,
    _with_role,
)
from tests.helpers import PATH

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent
JOB = "portal-gateway"  # Prometheus job name the dashboard and alerts select on

# The oldest Kubernetes we claim, and the newest whose schemas the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Custom resources: no schema in kubernetes-validate; checked field by field below.
CRD_KINDS = frozenset({"ServiceMonitor"})
# Not objects for the API server: kustomize's own file.
NOT_MANIFESTS = frozenset({"kustomization.yaml"})
# Created once per release with `kubectl create`, so not in the kustomization.
PER_RELEASE = frozenset({"migrate-job.yaml"})
# Postgres' default max_connections is 100: leave room for the Job and operators.
MAX_DB_CONNECTIONS = 90
# Without bench/results/latest.json (committed: the README's run), the figures SPEC §10's
# benchmark gave on this machine: peak RSS at concurrency 200, in MB.
DEFAULT_PEAK_RSS_MB = 150.0

SECRET_LITERAL = re.compile(r"\b(?:sk|rk)_(?:test|live)_[A-Za-z0-9_]+|\bwhsec_[A-Za-z0-9_]+")
COMPOSE_KEY_PLACEHOLDER = "sk_test_local_stripe_mock_placeholder"
SECRET_VARIABLES = (
    "DATABASE_URL",
    "MIGRATE_DATABASE_URL",
    "STRIPE_API_KEY",
    "STRIPE_WEBHOOK_SECRETS",
    "JWT_HS256_SECRET",
)
# Two database credentials (SPEC §5): the runtime role's, for the server, and
# the schema owner's, for the migration Job only, each in a Secret of its own.
SECRETS_OF = {
    "Deployment": ("portal-gateway", {"DATABASE_URL_FILE"}),
    "Job": ("portal-gateway-migrate", {"MIGRATE_DATABASE_URL_FILE"}),
}


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Manifest:
    file: str
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        kind: str = self.doc["kind"]
        return kind

    @property
    def id(self) -> str:
        return f"{self.file}:{self.kind}"


def _manifests() -> list[Manifest]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in NOT_MANIFESTS:
            continue
        found += [Manifest(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return found


MANIFESTS = _manifests()


def _one(kind: str) -> dict[str, Any]:
    docs = [m.doc for m in MANIFESTS if m.kind == kind]
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def _configmap() -> dict[str, str]:
    data: dict[str, str] = _one("ConfigMap")["data"]
    return data


def _pod_spec(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one(kind)["spec"]["template"]["spec"]
    return spec


def _container(kind: str) -> dict[str, Any]:
    containers = _pod_spec(kind)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def _bytes(quantity: str | int) -> float:
    text = str(quantity)
    for unit, factor in _MEMORY_UNITS.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def _config_variables() -> set[str]:
    """Every environment variable name service/config.py reads (and their *_FILE)."""
    source = (ROOT / "service/config.py").read_text()
    names = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source))
    return names | {f"{n}_FILE" for n in SECRET_VARIABLES}


# --------------------------------------------------------------------------- Kubernetes


def test_the_manifests_are_the_expected_set() -> None:
    kinds = sorted(m.kind for m in MANIFESTS)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "CronJob",
            "HorizontalPodAutoscaler",
            "Job",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    # Everything the API server would check, kubernetes-validate checks; the
    # only kinds it has no schema for are the CRDs checked by hand below.
    unvalidated = {m.kind for m in MANIFESTS} & CRD_KINDS
    assert unvalidated == {"ServiceMonitor"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "manifest", [m for m in MANIFESTS if m.kind not in CRD_KINDS], ids=lambda m: m.id
)
def test_manifest_passes_kubernetes_schemas_in_strict_mode(
    manifest: Manifest, version: str
) -> None:
    try:
        kubernetes_validate.validate(manifest.doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{manifest.id} against Kubernetes {version}: {where}: {exc.message}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    # The check above would be worthless if unknown fields passed.
    deployment = copy.deepcopy(_one("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_long_lived_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - NOT_MANIFESTS
    assert set(kustomization["resources"]) == files - PER_RELEASE
    image = _container("Deployment")["image"].rsplit(":", 1)[0]
    assert [i["name"] for i in kustomization["images"]] == [image]
    # The per-release Job is created, not applied: a fresh name every time.
    job = _one("Job")["metadata"]
    assert "generateName" in job
    assert "name" not in job


def _routes() -> set[tuple[str, str]]:
    settings = Settings.from_env({**_configmap(), "STRIPE_API_KEY": STRIPE_TEST_KEY})
    app = create_app(settings, metrics=Metrics())
    return {
        (route.method, route.resource.canonical) for route in app.router.routes() if route.resource
    }


def test_probes_point_at_routes_the_app_really_has() -> None:
    routes = _routes()
    container = _container("Deployment")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": int(_configmap()["PORT"]),
        "metrics": int(_configmap()["METRICS_PORT"]),
    }
    probes = {
        name: container[name]["httpGet"]
        for name in ("readinessProbe", "livenessProbe", "startupProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for name, probe in probes.items():
        assert ("GET", probe["path"]) in routes, (name, probe)
        assert probe["port"] in ports, (name, probe)
    # A probe answers within its timeout: /readyz is bounded by the database timeout.
    readiness = container["readinessProbe"]
    assert readiness["timeoutSeconds"] > float(_configmap()["DB_TIMEOUT_SECONDS"])
    # The Service sends traffic to the API port, scrapes to METRICS_PORT: the API
    # port (all the ingress reaches) has no /metrics, METRICS_PORT nothing else.
    service = _one("Service")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "http": "http",
        "metrics": "metrics",
    }
    assert ("GET", "/metrics") not in routes
    settings = Settings.from_env({**_configmap(), "STRIPE_API_KEY": STRIPE_TEST_KEY})
    scrape_routes = metrics_app(create_app(settings, metrics=Metrics())).router.routes()
    assert [(r.method, r.resource.canonical) for r in scrape_routes if r.resource] == [
        ("GET", "/metrics")
    ]


def test_servicemonitor_scrapes_the_service_as_job_portal_gateway() -> None:
    monitor = _one("ServiceMonitor")
    service = _one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    # It selects our Service, and only by labels the Service has.
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
    assert endpoint["port"] in port_names
    assert endpoint["port"] == "metrics"  # METRICS_PORT: the API port has no /metrics
    assert endpoint["path"] == "/metrics"
    # Without jobLabel the operator names the job after the Service.
    assert "jobLabel" not in spec
    assert service["metadata"]["name"] == JOB
    # The same job as the compose/VM scrape config, the alerts and the dashboard use.
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert JOB in [job["job_name"] for job in prometheus["scrape_configs"]]
    assert f'job="{JOB}"' in (DEPLOY / "prometheus/alerts.yml").read_text()


def _dockerfile_uid() -> int:
    user = _stage_instructions(_stages()[-1], "USER")[-1]
    return int(user.split(":")[0])


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_non_root_read_only_without_capabilities(kind: str) -> None:
    pod = _pod_spec(kind)
    uid = _dockerfile_uid()
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod
    assert "hostPID" not in pod
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == uid
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context.get("privileged", False) is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        # The one writable place is an emptyDir at /tmp.
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
        assert [m["mountPath"] for m in writable] == ["/tmp"]  # noqa: S108 - a pod path
        assert "emptyDir" in volumes[writable[0]["name"]]
        # Requests and limits for both resources, limits at or above requests.
        resources = container["resources"]
        for resource, parse in (("cpu", _cpu), ("memory", _bytes)):
            request = parse(resources["requests"][resource])
            limit = parse(resources["limits"][resource])
            assert 0 < request <= limit, (kind, resource)


def _bench_peak_rss_mb() -> float:
    latest = ROOT / "bench/results/latest.json"
    if not latest.exists():
        return DEFAULT_PEAK_RSS_MB
    scenarios = json.loads(latest.read_text())["scenarios"]
    return max(float(s["service"]["peak_rss_mb"]) for s in scenarios)


def test_resources_are_sized_from_the_benchmark() -> None:
    resources = _container("Deployment")["resources"]
    peak = _bench_peak_rss_mb() * 10**6
    # The scheduler reserves what a replica really uses at concurrency 200, and
    # only a leak (twice the peak) gets it OOM-killed.
    assert _bytes(resources["requests"]["memory"]) >= peak
    assert _bytes(resources["limits"]["memory"]) >= 2 * peak
    # One event loop saturates one core (~300 req/s in the benchmark): the
    # limit lets it use that core; the request is what the HPA scales on.
    assert _cpu(resources["limits"]["cpu"]) >= 1
    assert 0.25 <= _cpu(resources["requests"]["cpu"]) <= _cpu(resources["limits"]["cpu"])


def _prestop_seconds(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    # No shell in the pattern: python, which the image has, and code that compiles.
    assert command[:2] == ["python", "-c"], command
    compile(command[2], "<preStop>", "exec")
    match = re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[2])
    assert match, command
    return float(match.group(1))


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    pod = _pod_spec("Deployment")
    pause = _prestop_seconds(_container("Deployment"))
    shutdown = float(_configmap()["SHUTDOWN_TIMEOUT"])
    assert pause >= 3  # long enough for endpoints and load balancers to catch up
    # SHUTDOWN_TIMEOUT, then up to 1 s of final grace and the pool/session cleanup.
    assert pod["terminationGracePeriodSeconds"] > pause + shutdown + 2
    strategy = _one("Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_replicas_autoscaling_and_disruption_budget() -> None:
    deployment = _one("Deployment")
    hpa = _one("HorizontalPodAutoscaler")
    pdb = _one("PodDisruptionBudget")
    service = _one("Service")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # At least two replicas: the HPA's floor (spec.replicas is left to the HPA,
    # or else at least the floor).
    assert hpa["spec"]["minReplicas"] >= 2
    assert deployment["spec"].get("replicas", hpa["spec"]["minReplicas"]) >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Every replica opens up to DB_POOL_MAX_SIZE connections.
    pool = int(_configmap()["DB_POOL_MAX_SIZE"])
    assert hpa["spec"]["maxReplicas"] * pool <= MAX_DB_CONNECTIONS
    # One voluntary disruption at a time, never the last replica.
    assert pdb["spec"].get("maxUnavailable", 0) == 1 or pdb["spec"]["minAvailable"] >= 1
    # Deployment, Service and PDB select the server pods, and never the Job's.
    selector = deployment["spec"]["selector"]["matchLabels"]
    server_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = _one("Job")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= server_labels.items()
    assert service["spec"]["selector"] == selector
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert not selector.items() <= job_labels.items()


def test_configmap_is_accepted_by_the_service_and_holds_no_secret() -> None:
    data = _configmap()
    known = _config_variables()
    assert set(data) <= known, set(data) - known
    assert not set(data) & {*SECRET_VARIABLES, *(f"{n}_FILE" for n in SECRET_VARIABLES)}
    # The service's own validation, as at start-up (the key comes from the Secret).
    settings = Settings.from_env({**data, "STRIPE_API_KEY": STRIPE_TEST_KEY})
    assert settings.log_format == "json"
    assert all(isinstance(v, str) for v in data.values())


def _env_file_paths(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if e["name"].endswith("_FILE")}


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_secrets_come_from_the_secret_volume_as_files(kind: str) -> None:
    pod = _pod_spec(kind)
    container = _container(kind)
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]
        for m in container["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    assert secret_mounts, "no Secret volume"
    files = _env_file_paths(container)
    secret_name, database_files = SECRETS_OF[kind]
    assert database_files <= set(files)
    if kind == "Deployment":
        assert {"STRIPE_API_KEY_FILE", "STRIPE_WEBHOOK_SECRETS_FILE"} <= set(files)
    known = _config_variables()
    for name, path in files.items():
        assert name in known, name
        mount, _, key = path.rpartition("/")
        source = secret_mounts[mount]
        assert source["secretName"] == secret_name
        if "items" in source:
            assert key in [item["path"] for item in source["items"]]
    # Nothing secret as a plain value or through envFrom of a Secret.
    for entry in container.get("env", []):
        assert entry["name"] not in SECRET_VARIABLES, entry
    assert all("secretRef" not in source for source in container.get("envFrom", []))


def _secret_names(kind: str) -> set[str]:
    return {v["secret"]["secretName"] for v in _pod_spec(kind)["volumes"] if "secret" in v}


def _env_names(kind: str) -> set[str]:
    """Every variable the pod's container gets: its env, and the ConfigMap's through envFrom."""
    container = _container(kind)
    names = {e["name"] for e in container.get("env", [])}
    if any("configMapRef" in source for source in container.get("envFrom", [])):
        names |= set(_configmap())
    return names


def test_the_server_and_the_migration_job_use_two_database_credentials() -> None:
    """SPEC §5: only the migration Job has the schema owner's credential."""
    server, job = SECRETS_OF["Deployment"][0], SECRETS_OF["Job"][0]
    assert server != job
    # The server never sees the owner's credential; the Job neither the runtime
    # role's nor the Stripe key.
    assert _secret_names("Deployment") == {server}
    assert _secret_names("Job") == {job}
    assert not {"MIGRATE_DATABASE_URL", "MIGRATE_DATABASE_URL_FILE"} & _env_names("Deployment")
    assert not {"DATABASE_URL", "DATABASE_URL_FILE", "STRIPE_API_KEY_FILE"} & _env_names("Job")
    # After the upgrade the Job grants the runtime role only what serve needs.
    args = _container("Job")["args"]
    assert args[:2] == ["migrate", "--grant-to"]
    assert len(args) == 3
    assert build_parser().parse_args(args).grant_to == args[2]  # a valid role name


def test_audit_prune_cronjob_runs_prune_monthly_with_the_owner_credential_only() -> None:
    """SPEC §6: old audit partitions are dropped by the schema owner, once a month."""
    cronjob = _one("CronJob")
    template = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    # As hardened as the migration Job, from the same image as the server.
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == _pod_spec("Job")["securityContext"]
    assert container["securityContext"] == _container("Job")["securityContext"]
    assert container["image"] == _container("Deployment")["image"]
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert writable == ["/tmp"]  # noqa: S108 - a pod path
    for resource, parse in (("cpu", _cpu), ("memory", _bytes)):
        requested = parse(container["resources"]["requests"][resource])
        assert 0 < requested <= parse(container["resources"]["limits"][resource])
    # `audit prune` with a retention the CLI accepts.
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.audit_command) == ("audit", "prune")
    assert args.older_than >= audit_retention.MIN_PRUNE_DAYS
    # The owner's credential (the migration Job's Secret), and no other.
    owner_secret = SECRETS_OF["Job"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    files = _env_file_paths(container)
    assert set(files) == {"MIGRATE_DATABASE_URL_FILE"}
    mount, _, key = files["MIGRATE_DATABASE_URL_FILE"].rpartition("/")
    assert mounts[mount]["secret"]["secretName"] == owner_secret
    assert key in [item["path"] for item in mounts[mount]["secret"]["items"]]
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {owner_secret}
    assert all("secretRef" not in source for source in container.get("envFrom", []))
    # Monthly, one run at a time; its pods may reach Postgres (the NetworkPolicy
    # selects them) but are never behind the Service.
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    _minute, _hour, day, month, weekday = cronjob["spec"]["schedule"].split()
    assert day.isdigit()
    assert (month, weekday) == ("*", "*")
    labels = template["metadata"]["labels"]
    policy_selector = _one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    assert policy_selector.items() <= labels.items()
    assert not _one("Deployment")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_no_secret_values_anywhere_in_deploy() -> None:
    # Secrets are referenced, never defined.
    assert not [m.id for m in MANIFESTS if m.kind == "Secret"]
    found = []
    for path in sorted([*DEPLOY.rglob("*"), DOCKERIGNORE]):
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for literal in SECRET_LITERAL.findall(line):
                allowed = path == COMPOSE and literal == COMPOSE_KEY_PLACEHOLDER
                if not allowed:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {literal}")
            # No credentials in a URL anywhere but the compose file's local Postgres.
            if path != COMPOSE and re.search(r"://[^/\s:@]+:[^/\s@]+@", line):
                found.append(f"{path.relative_to(ROOT)}:{number}: credentials in a URL")
    assert found == []
    # The compose placeholder is documented as one, beside its only use.
    compose = COMPOSE.read_text()
    assert compose.count(COMPOSE_KEY_PLACEHOLDER) == 1
    assert "placeholder" in compose.split(COMPOSE_KEY_PLACEHOLDER)[0].splitlines()[-2]


def test_networkpolicy_allows_only_what_the_pods_need() -> None:
    policy = _one("NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    for kind in ("Deployment", "Job"):
        labels = _one(kind)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), kind
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # The ingress controller reaches the API only, Prometheus /metrics only.
    allowed = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        for peer in rule["from"]:
            name = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            allowed[name] = [p["port"] for p in rule["ports"]]
    assert allowed == {
        "ingress-nginx": [int(_configmap()["PORT"])],
        "prometheus": [int(_configmap()["METRICS_PORT"])],
    }
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {("TCP", 5432), ("UDP", 53), ("TCP", 53), ("TCP", 443)}


def _json_patch(doc: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 ``test`` and ``replace``, what kustomization.yaml's patches use."""
    doc = copy.deepcopy(doc)
    for op in operations:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) else last
        if op["op"] == "test":
            assert target[key] == op["value"], f"kustomization patch: test failed: {op}"
        elif op["op"] == "replace":
            assert key in target or isinstance(target, list), op
            target[key] = op["value"]
        else:
            raise AssertionError(f"unexpected patch op in kustomization.yaml: {op}")
    return doc


def _kustomized(kind: str) -> dict[str, Any]:
    """One object as `kubectl apply -k deploy/k8s` creates it: the kustomization's
    patches applied (kubectl, when installed, is checked to agree)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    doc = _one(kind)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        if (target["kind"], target["name"]) == (kind, doc["metadata"]["name"]):
            doc = _json_patch(doc, yaml.safe_load(patch["patch"]))
    return doc


def _egress_rule(policy: dict[str, Any], protocol: str, port: int) -> dict[str, Any]:
    (rule,) = [
        r for r in policy["egress"] if {"protocol": protocol, "port": port} in r.get("ports", [])
    ]
    return rule


def _ip_blocks(rule: dict[str, Any]) -> list[dict[str, Any]]:
    peers: list[dict[str, Any]] = rule["to"]
    assert all(set(peer) == {"ipBlock"} for peer in peers), peers
    return [peer["ipBlock"] for peer in peers]


def test_networkpolicy_egress_goes_to_the_database_range_and_never_to_metadata() -> None:
    policy = _kustomized("NetworkPolicy")
    kubernetes_validate.validate(policy, K8S_VERSIONS[-1], strict=True)
    spec = policy["spec"]
    # Every egress rule names where it goes: a rule without `to` is "anywhere".
    assert all(rule.get("to") and rule.get("ports") for rule in spec["egress"]), spec["egress"]

    # Postgres: exactly the range set in the kustomization, never the base's placeholder.
    (database,) = _ip_blocks(_egress_rule(spec, "TCP", 5432))
    network = ipaddress.ip_network(database["cidr"])
    assert network.is_private, network
    assert network.prefixlen >= 8, network  # a range, not "anywhere"
    assert "except" not in database
    (base,) = _ip_blocks(_egress_rule(_one("NetworkPolicy")["spec"], "TCP", 5432))
    assert ipaddress.ip_network(base["cidr"]) == ipaddress.ip_network("192.0.2.0/24")
    assert network != ipaddress.ip_network(base["cidr"])

    # DNS: kube-dns only.
    (dns,) = _egress_rule(spec, "UDP", 53)["to"]
    assert _egress_rule(spec, "TCP", 53)["to"] == [dns]
    assert dns["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert "ipBlock" not in dns

    # HTTPS to the internet (Stripe), but not to the metadata endpoints, either family.
    blocks = _ip_blocks(_egress_rule(spec, "TCP", 443))
    metadata = [
        ipaddress.ip_address(a)
        for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "fd20:ce::254")
    ]
    for address in metadata:
        allowing = [
            b
            for b in blocks
            if address in ipaddress.ip_network(b["cidr"])
            and not any(address in ipaddress.ip_network(e) for e in b.get("except", []))
        ]
        assert allowing == [], (str(address), allowing)
    stripe = ipaddress.ip_address("54.187.174.169")  # one of api.stripe.com's addresses
    assert any(stripe in ipaddress.ip_network(b["cidr"]) for b in blocks)
    assert {ipaddress.ip_network(b["cidr"]).version for b in blocks} == {4, 6}


def test_kubectl_kustomize_renders_the_same_networkpolicy() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the patch was applied by the test alone")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    (policy,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "NetworkPolicy"]
    expected = _kustomized("NetworkPolicy")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected["metadata"]["namespace"] = kustomization["namespace"]
    assert policy == expected


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return compose


def _binds(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """Host files and folders a service mounts (relative to deploy/), with their targets."""
    found = []
    for volume in service.get("volumes", []):
        source, target, *_ = (
            volume.split(":")
            if isinstance(volume, str)
            else (
                volume["source"],
                volume["target"],
            )
        )
        if source.startswith((".", "/")):
            found.append(((DEPLOY / source).resolve(), target))
    return found


def test_compose_parses_and_references_only_files_that_exist() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "migrate", "stripe-mock", "portal-gateway", "prometheus", "grafana"} <= set(
        services
    )
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), (name, context)
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert context == ROOT  # the context .dockerignore is written for
        for env_file in service.get("env_file", []):
            assert (DEPLOY / env_file).is_file(), (name, env_file)
        for source, _ in _binds(service):
            assert source.exists(), (name, source)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named_volumes, (name, source)
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)


def test_compose_starts_in_release_order() -> None:
    services = _compose()["services"]
    postgres, migrate, app = services["postgres"], services["migrate"], services["portal-gateway"]
    assert "healthcheck" in postgres
    assert any(v.startswith("pgdata:") for v in postgres["volumes"])
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["command"] == ["migrate"]
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert app["command"] == ["serve"]
    # One image for both, built from deploy/Dockerfile.
    assert migrate["image"] == app["image"]
    assert migrate["build"] == app["build"]
    assert Path(app["build"]["dockerfile"]) == DOCKERFILE.relative_to(ROOT)
    # stripe-mock on its usual port, and the service pointed at it.
    mock = services["stripe-mock"]
    assert mock["image"].startswith("stripe/stripe-mock:")
    assert any(p.endswith(":12111") for p in mock["ports"])
    assert app["environment"]["STRIPE_API_BASE"] == "http://stripe-mock:12111"
    # `docker compose down` waits longer than the drain.
    shutdown = float(app["environment"]["SHUTDOWN_TIMEOUT"])
    assert float(app["stop_grace_period"].removesuffix("s")) > shutdown


def test_compose_service_environment_is_accepted_by_the_service() -> None:
    env = {
        str(k): str(v) for k, v in _compose()["services"]["portal-gateway"]["environment"].items()
    }
    assert set(env) <= _config_variables(), set(env) - _config_variables()
    settings = Settings.from_env(env)
    assert settings.stripe_api_key is not None
    assert settings.stripe_api_key.reveal() == COMPOSE_KEY_PLACEHOLDER
    assert not settings.livemode


def _host_port(url_or_target: str) -> tuple[str, int]:
    host, _, port = url_or_target.removeprefix("http://").rstrip("/").partition(":")
    return host, int(port)


def _service_port(service: dict[str, Any], default: int) -> int:
    environment = service.get("environment") or {}
    return int(environment.get("PORT", default))


def test_compose_prometheus_scrapes_the_service_and_grafana_reads_prometheus() -> None:
    services = _compose()["services"]
    prometheus_binds = dict((target, source) for source, target in _binds(services["prometheus"]))
    config_path = prometheus_binds["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    # Rule files resolve beside the config file, in the container too.
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in prometheus_binds
        assert prometheus_binds[f"/etc/prometheus/{rule_file}"].is_file()
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets
    for target in targets:
        host, port = _host_port(target)
        assert host in services, target
        assert port == _service_port(services[host], 8080), target

    grafana_binds = {target: source for source, target in _binds(services["grafana"])}
    provisioning = "/etc/grafana/provisioning"
    datasources = grafana_binds[f"{provisioning}/datasources"]
    dashboards = grafana_binds[f"{provisioning}/dashboards"]
    for doc in (yaml.safe_load(p.read_text()) for p in sorted(datasources.glob("*.yml"))):
        for source in doc["datasources"]:
            host, port = _host_port(source["url"])
            assert host in services
            assert port == 9090
    for doc in (yaml.safe_load(p.read_text()) for p in sorted(dashboards.glob("*.yml"))):
        for provider in doc["providers"]:
            folder = grafana_binds[provider["options"]["path"]]
            assert list(folder.glob("*.json")), folder


@dataclass(frozen=True)
class Tools:
    promtool: str


@pytest.fixture(scope="module")
def tools() -> Tools:
    """promtool, installed with apt by scripts/prometheus.sh when missing."""
    try:
        done = subprocess.run(
            [str(ROOT / "scripts/prometheus.sh")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/prometheus.sh: installing Prometheus took over 10 minutes")
    assert done.returncode == 0, f"scripts/prometheus.sh failed:\n{done.stderr[-2000:]}"
    paths = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return Tools(paths["PROMTOOL"])


@pytest.mark.timeout(600)  # the first use may install Prometheus with apt
def test_compose_prometheus_config_passes_promtool(tools: Tools, tmp_path: Path) -> None:
    # Check the files as the container sees them: laid out at their mount points.
    binds = _binds(_compose()["services"]["prometheus"])
    for source, target in binds:
        placed = tmp_path / target.lstrip("/")
        placed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, placed)
    config = tmp_path / "etc/prometheus/prometheus.yml"
    done = subprocess.run(
        [tools.promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "SUCCESS: 1 rule files found" in output, output


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str  # the image it starts from, build arguments at their defaults
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    written: str = ""  # the FROM line's image as written (e.g. ${BASE})


def _with_arguments(text: str, arguments: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by the build arguments' defaults."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: arguments[m.group(1) or m.group(2)], text)


def _stages() -> list[Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a trailing line continuation"
    stages: list[Stage] = []
    arguments: dict[str, str] = {}  # the ARGs before the first FROM, for the FROM lines
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(
                r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.I
            )
            assert match, line
            base = _with_arguments(match.group(1), arguments)
            stages.append(Stage(base, match.group(2), written=match.group(1)))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before FROM"
            name, _, default = rest.strip().partition("=")
            assert default, f"ARG {name} before FROM without a default"
            arguments[name] = default
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def _stage_instructions(stage: Stage, keyword: str) -> list[str]:
    return [rest for kw, rest in stage.instructions if kw == keyword]


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return value


def _copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """(--from stage or None, sources, destination) of each COPY/ADD."""
    found: list[tuple[str | None, list[str], str]] = []
    for keyword, rest in stage.instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        found.append((source_stage, paths[:-1], paths[-1]))
    return found


def _image_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in _stage_instructions(stage, "ENV"):
        for word in shlex.split(rest):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_dockerfile_is_multi_stage_with_a_slim_python_final_stage() -> None:
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim(?:-\w+)?", final.base), final.base
    # The final stage takes its software from an earlier stage, not the network.
    builders = {s.name for s in stages[:-1]}
    froms = [source for source, _, _ in _copies(final)]
    assert froms
    assert all(source in builders for source in froms), froms


def test_dockerfile_stages_share_one_base_argument_defaulting_to_the_official_image() -> None:
    # `make image-smoke` builds with podman from a base made locally (no registry
    # here): --build-arg BASE=... A build without it takes the official image.
    stages = _stages()
    assert {s.written for s in stages} == {"${BASE}"}
    assert {s.base for s in stages} == {"python:3.11-slim-bookworm"}


_BUILD_TOOLS = re.compile(
    r"\b(?:apt-get|apt|apk|dnf|yum|pip3?|uv|gcc|g\+\+|cc|clang|make|build-essential"
    r"|python3?-dev|libpq-dev|compileall)\b"
)


def test_dockerfile_final_stage_installs_and_compiles_nothing() -> None:
    final = _stages()[-1]
    for command in _stage_instructions(final, "RUN"):
        assert not _BUILD_TOOLS.search(command), command


def test_dockerfile_runs_as_a_fixed_non_root_user() -> None:
    final = _stages()[-1]
    users = _stage_instructions(final, "USER")
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), users[-1]  # numeric: runAsNonRoot can check it
    assert int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # ... and the user exists in that stage, with that UID.
    created = " ".join(_stage_instructions(final, "RUN"))
    assert re.search(rf"useradd\b[^&;]*--uid {uid}\b", created), created
    # The instructions after USER run as that user too: nothing switches back.
    keywords = [kw for kw, _ in final.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]


def test_dockerfile_signals_health_and_entry_point() -> None:
    final = _stages()[-1]
    assert _stage_instructions(final, "STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = _stage_instructions(final, "HEALTHCHECK")
    assert "/healthz" in healthcheck
    _, _, command = healthcheck.partition(" CMD ")
    assert _exec_form(command)[0] == "python"  # no shell, no curl in a slim image
    (entrypoint,) = _stage_instructions(final, "ENTRYPOINT")
    (cmd,) = _stage_instructions(final, "CMD")
    # Exec form: the service itself is PID 1 and gets SIGTERM, not a shell.
    assert _exec_form(entrypoint) == ["portal-gateway"]
    assert _exec_form(cmd) == ["serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["portal-gateway"] == "service.cli:main"
    # Kubernetes runs the same command; the Job, the other one.
    assert _container("Deployment")["args"] == _exec_form(cmd)
    assert _container("Job")["args"][0] == "migrate"
    assert "command" not in _container("Deployment")
    assert "command" not in _container("Job")
    assert _container("Deployment")["image"] == _container("Job")["image"]
    ports = [int(p) for p in _stage_instructions(final, "EXPOSE")]
    assert ports == [int(_configmap()["PORT"])]


def test_dockerfile_copies_service_and_migrations_but_not_the_standin() -> None:
    stages = _stages()
    build = stages[0]
    sources = [
        s.rstrip("/") for source, paths, _ in _copies(build) if source is None for s in paths
    ]
    assert {"service", "migrations", "pyproject.toml"} <= set(sources)
    for forbidden in ("stripe_standin", "tests", "bench", ".", "*"):
        assert forbidden not in sources
    # migrations/ beside service/ under one WORKDIR: service/migrations.py finds
    # them at <package>/../migrations, and the final stage copies that folder.
    (workdir,) = set(_stage_instructions(build, "WORKDIR"))
    destinations = {paths[0].rstrip("/"): dest for _, paths, dest in _copies(build) if paths}
    assert destinations["service"].rstrip("/") == "service"
    assert destinations["migrations"].rstrip("/") == "migrations"
    final_copies = {paths[0] for _, paths, _ in _copies(stages[-1])}
    assert workdir in final_copies
    # No dev extras, nothing but the package itself.
    for command in _stage_instructions(build, "RUN"):
        assert "[dev]" not in command
        assert "stripe_standin" not in command
    assert "stripe_standin" not in DOCKERFILE.read_text().split("FROM")[-1]
    # The image's environment keeps the read-only filesystem read-only.
    env = _image_env(stages[-1])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["LOG_FORMAT"] == "json"


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negated
    return ignored


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    patterns = _dockerignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".pg/data/PG_VERSION",
        "tests/test_deploy.py",
        "bench/results/latest.json",
        "bench/run.py",
        "stripe_standin/app.py",
        "service/__pycache__/app.cpython-311.pyc",
        "portal_gateway.egg-info/PKG-INFO",
        "deploy/Dockerfile",
        ".env",
    ):
        assert _docker_ignored(path, patterns), path
    # Everything the Dockerfile copies from the context is in it.
    build = _stages()[0]
    sources = [s for origin, paths, _ in _copies(build) if origin is None for s in paths]
    for source in sources:
        found = ROOT / source
        files = [found] if found.is_file() else [p for p in found.rglob("*") if p.is_file()]
        kept = [
            f
            for f in files
            if "__pycache__" not in f.parts
            and not _docker_ignored(str(f.relative_to(ROOT)), patterns)
        ]
        assert kept, source
        if found.is_dir():
            assert all(
                not _docker_ignored(str(f.relative_to(ROOT)), patterns)
                for f in files
                if "__pycache__" not in f.parts and f.suffix != ".pyc"
            ), source


# --------------------------------------------------------------------------- production-like run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _layout_app(target: Path) -> None:
    """/app as the image has it: the build stage's COPYs from the context, through .dockerignore."""
    patterns = _dockerignore_patterns()
    build = _stages()[0]

    def ignore(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).relative_to(ROOT)
        return {n for n in names if _docker_ignored(str(relative / n).removeprefix("./"), patterns)}

    for origin, paths, destination in _copies(build):
        if origin is not None:
            continue
        for source in paths:
            src = ROOT / source
            dest = target / destination.rstrip("/")
            if destination.endswith("/") and src.is_file():
                dest = target / destination / src.name
            if src.is_dir():
                shutil.copytree(src, dest, ignore=ignore)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@dataclass
class ImageRun:
    """The service as the image runs it, with the Kubernetes pod's environment."""

    app: Path
    env: dict[str, str]
    logs: Path
    database_url: str
    executable: Path = VENV_BIN / "portal-gateway"
    # The migration Job's own secret files (the owner's credential), and the
    # runtime role its `--grant-to` names (unique per run).
    job_env_files: dict[str, str] = field(default_factory=dict)
    runtime_role: str = ""

    async def run(self, *args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            str(self.executable),
            *args,
            cwd=self.app,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def image_run(standin: Standin, tmp_path: Path) -> AsyncIterator[ImageRun]:
    app = tmp_path / "app"
    _layout_app(app)
    home, tmp, secrets_dir = tmp_path / "home", tmp_path / "tmp", tmp_path / "secrets"
    for folder in (home, tmp, secrets_dir):
        folder.mkdir()

    # A database that does not exist yet: `migrate` creates it, as on a new cluster,
    # as the schema owner; the server connects as the runtime role the Job grants to.
    name = f"pgw_deploy_{uuid.uuid4().hex[:12]}"
    database_url = _with_database(_admin_url(), name)
    role, password = f"pgw_deploy_{uuid.uuid4().hex[:10]}", secrets.token_hex(16)

    # The Secret volumes: one file per key, at the path the pod's *_FILE names.
    values = {
        "DATABASE_URL_FILE": _with_role(database_url, role, password),
        "MIGRATE_DATABASE_URL_FILE": database_url,
        "STRIPE_API_KEY_FILE": STRIPE_TEST_KEY,
        "STRIPE_WEBHOOK_SECRETS_FILE": "whsec_" + secrets.token_hex(16),
    }
    files_of: dict[str, dict[str, str]] = {}
    for kind in ("Deployment", "Job"):
        files_of[kind] = {}
        for variable, pod_path in _env_file_paths(_container(kind)).items():
            local = secrets_dir / Path(pod_path).name
            local.write_text(values[variable] + "\n")
            local.chmod(0o440)
            files_of[kind][variable] = str(local)
    env_files = files_of["Deployment"]

    image_env = _image_env(_stages()[-1])
    env = {
        **{k: v for k, v in image_env.items() if k != "PATH"},
        **_configmap(),
        **env_files,
        # What differs from a pod: loopback, a free port, the stand-in for Stripe.
        "HOST": "127.0.0.1",
        "PORT": str(_free_port()),
        "METRICS_PORT": str(_free_port()),
        "STRIPE_API_BASE": standin.url,
        "RETURN_URL_ALLOWLIST": ALLOWED_ORIGIN,
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(tmp),
        # The image runs /app/service through the venv's editable finder; here
        # the venv points at the work tree, so the copy goes first on the path.
        "PYTHONPATH": str(app),
    }
    _read_only(app)
    await _admin_execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
    try:
        yield ImageRun(
            app,
            env,
            tmp_path / "serve.jsonl",
            database_url,
            job_env_files=files_of["Job"],
            runtime_role=role,
        )
    finally:
        for path in [app, *app.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await _admin_execute(f'DROP ROLE IF EXISTS "{role}"')


def _leaks(text: str) -> list[str]:
    return [line for line in text.splitlines() if LEAK_PATTERNS.search(line)]


async def _poll_ready(base: str, process: asyncio.subprocess.Process, within: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    async with aiohttp.ClientSession() as http:
        while True:
            assert process.returncode is None, "the service exited before it was ready"
            try:
                async with http.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert loop.time() < end, f"/readyz not 200 within {within} s"
            await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_production_like_run_migrate_then_serve(
    image_run: ImageRun, standin: Standin, tmp_path: Path
) -> None:
    app_before = _snapshot(image_run.app)
    env = image_run.env

    # The code that runs is the copy laid out like /app, and it does not need the stand-in.
    probe = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "python"),
        "-c",
        "import sys, service, service.cli, service.migrations as m;"
        "print(service.__file__); print(m.MIGRATIONS_DIR);"
        "print('stripe_standin' in sys.modules)",
        cwd=image_run.app,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    printed, _ = await asyncio.wait_for(probe.communicate(), 30)
    package, migrations_dir, standin_loaded = printed.decode().split()
    assert Path(package).is_relative_to(image_run.app)
    assert Path(migrations_dir) == image_run.app / "migrations"
    assert standin_loaded == "False"

    # The migration Job: its args, and only the secret files it mounts (no Stripe key).
    # The owner's credential is the Job's alone; it grants the runtime role, whose
    # credential is all the server and the CLI below have (SPEC §5).
    job = _container("Job")
    job_env = {k: v for k, v in env.items() if not k.endswith("_FILE")}
    job_env |= image_run.job_env_files
    *grant, _ = job["args"]  # ["migrate", "--grant-to", ROLE]: this run's role
    code, _, err = await ImageRun(
        image_run.app, job_env, image_run.logs, image_run.database_url
    ).run(*grant, image_run.runtime_role)
    assert code == 0, err[-3000:]

    # Data and a client, with the same CLI an operator runs in a pod.
    code, token, err = await image_run.run("clients", "create", "deploy-check")
    assert code == 0, err
    token = token.strip()
    data = tmp_path / "tmp"
    (data / "customers.csv").write_text(
        "user_id,stripe_customer_id,stripe_account_id,portal,locale\nu_deploy,cus_deploy1,,,fr\n"
    )
    (data / "subscriptions.csv").write_text(
        "user_id,stripe_subscription_id,external_ref,status,item_id,price_id,quantity\n"
        "u_deploy,sub_deploy1,team-plan,active,si_deploy1,price_basic,3\n"
    )
    for kind in ("customers", "subscriptions"):
        code, _, err = await image_run.run("import", kind, str(data / f"{kind}.csv"))
        assert code == 0, err

    # `serve`, exactly the image's ENTRYPOINT + CMD (and the Deployment's args).
    cmd = _exec_form(_stage_instructions(_stages()[-1], "CMD")[0])
    base = f"http://127.0.0.1:{env['PORT']}"
    with image_run.logs.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(image_run.executable),
            *cmd,
            cwd=image_run.app,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await _poll_ready(base, process, within=20)
        container = _container("Deployment")
        async with aiohttp.ClientSession() as http:
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                async with http.get(base + container[probe_name]["httpGet"]["path"]) as resp:
                    assert resp.status == 200, probe_name
            # The ConfigMap's METRICS_PORT: /metrics there, not on the API port.
            async with http.get(base + "/metrics") as resp:
                assert resp.status == 404
            async with http.get(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics") as resp:
                assert resp.status == 200
                assert "portal_gateway_ready 1.0" in await resp.text()
            async with http.post(
                base + PATH,
                data=orjson.dumps({"user_id": "u_deploy", "flow": {"type": "subscription_cancel"}}),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 201, body
        assert body["url"].startswith("https://")
        assert body["flow"] == "subscription_cancel"
        (sent,) = standin.requests()
        assert sent.params is not None
        assert sent.params["customer"] == "cus_deploy1"

        # The image's HEALTHCHECK command, as the engine would run it.
        healthcheck = _stage_instructions(_stages()[-1], "HEALTHCHECK")[0]
        check = _exec_form(healthcheck.partition(" CMD ")[2])
        checker = await asyncio.create_subprocess_exec(
            str(VENV_BIN / check[0]), *check[1:], cwd=image_run.app, env=env
        )
        assert await asyncio.wait_for(checker.wait(), 10) == 0

        process.send_signal(signal.SIGTERM)
        shutdown = float(env["SHUTDOWN_TIMEOUT"])
        assert await asyncio.wait_for(process.wait(), shutdown + 5) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # Logs: JSON lines only (LOG_FORMAT from the ConfigMap), no secret among them.
    text = image_run.logs.read_text()
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert [line["event"] for line in lines if line.get("event") in ("serving", "stopped")] == [
        "serving",
        "stopped",
    ]
    assert _leaks(text) == []
    # Nothing written outside TMPDIR: the code tree (the working directory) and HOME untouched.
    assert _snapshot(image_run.app) == app_before
    assert list((tmp_path / "home").iterdir()) == []


def _iter_files(folder: Path) -> Iterator[Path]:
    yield from (p for p in folder.rglob("*") if p.is_file())


def test_the_image_layout_leaves_the_standin_and_tests_out(tmp_path: Path) -> None:
    _layout_app(tmp_path / "app")
    top = sorted(p.name for p in (tmp_path / "app").iterdir())
    assert top == ["README.md", "migrations", "pyproject.toml", "service"]
    files = [str(p.relative_to(tmp_path / "app")) for p in _iter_files(tmp_path / "app")]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert "migrations/env.py" in files
    assert os.path.join("service", "cli.py") in files
