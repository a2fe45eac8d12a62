"""Redis in ``deploy/``, the optional component of SPEC §14, validated like the rest.

Compose: ``deploy/docker-compose.redis.yml``, merged onto the base file as
``docker compose -f … -f …`` merges it, parses, names only what exists, keeps
nothing on disk, and gives the service an environment it accepts.

Kubernetes: ``deploy/k8s/components/redis`` (a kustomize Component): its
objects pass the Kubernetes schemas in strict mode and run as locked down as
the service's; its patches, applied to the base objects, give the service a
REDIS_URL it accepts (the Service's name and port) and an egress rule to Redis
only; ``kubectl kustomize`` (when installed) renders the same.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.test_deploy import (
    COMPOSE,
    DEPLOY,
    K8S,
    K8S_VERSIONS,
    _compose,
    _config_variables,
    _configmap,
    _one,
)

COMPOSE_REDIS = DEPLOY / "docker-compose.redis.yml"
COMPONENT = K8S / "components" / "redis"


# --------------------------------------------------------------------------- compose


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of a second file: mappings merge key by key, the rest replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


def _compose_with_redis() -> dict[str, Any]:
    overlay = yaml.safe_load(COMPOSE_REDIS.read_text())
    assert set(overlay) == {"services"}, "the overlay adds services and nothing else"
    merged: dict[str, Any] = _merge(_compose(), overlay)
    return merged


def test_compose_overlay_adds_redis_and_points_the_service_at_it() -> None:
    services = _compose_with_redis()["services"]
    redis, app = services["redis"], services["portal-gateway"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    # Nothing on disk, and full means evicting, not refusing writes.
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["read_only"] is True
    assert all(port.startswith("127.0.0.1:") for port in redis["ports"])
    # The base service keeps everything it had, and waits for a healthy Redis.
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    base = _compose()["services"]["portal-gateway"]["environment"]
    assert set(base) < set(app["environment"])
    url = urlsplit(app["environment"]["REDIS_URL"])
    assert url.hostname in services
    assert url.password is None


def test_compose_overlay_environment_is_accepted_by_the_service() -> None:
    environment = _compose_with_redis()["services"]["portal-gateway"]["environment"]
    env = {str(k): str(v) for k, v in environment.items()}
    assert set(env) <= _config_variables(), set(env) - _config_variables()
    settings = Settings.from_env(env)
    assert settings.redis_url is not None
    assert settings.redis_url.reveal() == "redis://redis:6379/0"


def test_the_base_compose_file_works_without_redis() -> None:
    services = _compose()["services"]
    assert "redis" not in services
    assert "REDIS_URL" not in services["portal-gateway"]["environment"]
    # Both files say how to add it.
    assert "docker-compose.redis.yml" in COMPOSE.read_text()
    assert "docker-compose.redis.yml" in (DEPLOY.parent / "docs/deploying.md").read_text()


# --------------------------------------------------------------------------- Kubernetes


def _component() -> dict[str, Any]:
    component: dict[str, Any] = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    return component


def _component_objects() -> list[dict[str, Any]]:
    objects = []
    for name in _component()["resources"]:
        objects += [d for d in yaml.safe_load_all((COMPONENT / name).read_text()) if d]
    return objects


def _object(kind: str) -> dict[str, Any]:
    (found,) = [d for d in _component_objects() if d["kind"] == kind]
    return found


def _json_patch(doc: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 ``add`` (``-`` appends to a list), what the component's patches use."""
    doc = copy.deepcopy(doc)
    for op in operations:
        assert op["op"] == "add", f"unexpected patch op in the component: {op}"
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), op["value"])
        else:
            target[last] = op["value"]
    return doc


def _patched(kind: str) -> dict[str, Any]:
    """A base object as the component leaves it."""
    doc = _one(kind)
    for patch in _component()["patches"]:
        target = patch["target"]
        if (target["kind"], target["name"]) == (kind, doc["metadata"]["name"]):
            doc = _json_patch(doc, yaml.safe_load(patch["patch"]))
    return doc


def test_the_component_is_a_kustomize_component_of_three_objects() -> None:
    component = _component()
    assert component["kind"] == "Component"
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    kinds = sorted(d["kind"] for d in _component_objects())
    assert kinds == ["Deployment", "NetworkPolicy", "Service"]
    # Optional: the base kustomization does not pull it in.
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "components" not in base


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_component_objects_pass_kubernetes_schemas_in_strict_mode(version: str) -> None:
    for doc in [*_component_objects(), _patched("NetworkPolicy"), _patched("ConfigMap")]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} against Kubernetes {version}: {where}: {exc.message}")


def test_redis_runs_locked_down_without_persistence() -> None:
    deployment = _object("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"  # never two, splitting the limits
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert container["readinessProbe"]
    assert container["livenessProbe"]
    args = container["args"]
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    (data,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["name"] == data["name"]
    assert "emptyDir" in volume


def test_the_service_gets_a_redis_url_it_accepts_naming_the_redis_service() -> None:
    data = _patched("ConfigMap")["data"]
    assert set(data) - set(_configmap()) == {"REDIS_URL"}
    settings = Settings.from_env({**data, "STRIPE_API_KEY": "sk_live_abc123"})
    assert settings.redis_url is not None
    url = urlsplit(settings.redis_url.reveal())
    assert url.password is None  # a password would go in the Secret (REDIS_URL_FILE)
    service = _object("Service")
    assert url.hostname == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"] == 6379
    pod_labels = _object("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # The budget defaults to Stripe's live limit less a fifth on api.stripe.com.
    assert settings.upstream_budget_per_second == 80


def test_only_the_servers_reach_redis_and_redis_reaches_nothing() -> None:
    redis_labels = _object("Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = _object("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["egress"] == []
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    server_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= server_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    # The service's own policy gains exactly one rule: to the Redis pods on 6379.
    before, after = _one("NetworkPolicy")["spec"]["egress"], _patched("NetworkPolicy")["spec"]
    (added,) = [r for r in after["egress"] if r not in before]
    assert added["ports"] == [{"protocol": "TCP", "port": 6379}]
    (target,) = added["to"]
    assert target["podSelector"]["matchLabels"].items() <= redis_labels.items()
    # The base objects themselves are untouched by the component's existence.
    assert "REDIS_URL" not in _configmap()


def test_kubectl_kustomize_renders_the_component_the_same(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the patches were applied by the test alone")
    base = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [base],
                "components": [f"{base}/components/redis"],
            }
        )
    )
    rendered = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "portal-gateway-redis"),
        ("Service", "portal-gateway-redis"),
        ("NetworkPolicy", "portal-gateway-redis"),
    } <= names
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert configmap["data"]["REDIS_URL"] == _patched("ConfigMap")["data"]["REDIS_URL"]
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "portal-gateway"
    ]
    redis_rules = [
        r for r in policy["spec"]["egress"] if {"protocol": "TCP", "port": 6379} in r["ports"]
    ]
    assert len(redis_rules) == 1
