"""The deploy/ manifests: every object validates (built-in kinds with kubernetes-validate, Gateway API and
Inference Extension objects against their CRDs' schemas), the kustomizations list files that exist, and the
controller's RBAC grants exactly what the controller's code does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from inferoute.controller.model import WATCHED
from k8s_objects import check_schema

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.32"
CUSTOM = {"GatewayClass", "Gateway", "HTTPRoute", "InferencePool"}


def kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def rendered(kustomization: Path) -> list[dict[str, Any]]:
    """What ``kubectl apply -k`` would apply (resources in order, the namespace set on namespaced objects
    that lack one; CRDs and other cluster-scoped kinds unchanged)."""
    spec = yaml.safe_load(kustomization.read_text())
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
    assert set(spec) <= {"apiVersion", "kind", "namespace", "resources", "images"}  # nothing we do not render
    out: list[dict[str, Any]] = []
    for res in spec["resources"]:
        path = kustomization.parent / res
        assert path.is_file(), f"{kustomization}: {res} does not exist"
        out.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def all_objects() -> list[dict[str, Any]]:
    return [obj for k in kustomizations() for obj in rendered(k)]


def test_every_yaml_file_is_in_a_kustomization() -> None:
    listed = {
        (k.parent / r).resolve() for k in kustomizations() for r in yaml.safe_load(k.read_text())["resources"]
    }
    files = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == listed


@pytest.mark.parametrize("obj", all_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_object_validates(obj: dict[str, Any]) -> None:
    if obj["kind"] in CUSTOM:
        check_schema(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_images_are_a_value() -> None:
    for k in kustomizations():
        assert yaml.safe_load(k.read_text())["images"][0]["name"] == "inferoute"
    images = {
        c["image"]
        for o in all_objects()
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"inferoute"}  # every container takes the kustomization's image


def test_controller_rbac_is_what_the_controller_does() -> None:
    (role,) = [
        o
        for o in all_objects()
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "inferoute-controller"
    ]
    grants = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    need = {(k.group, k.plural, v) for k in WATCHED for v in ("get", "list", "watch")}
    need |= {(k.group, f"{k.plural}/status", "patch") for k in WATCHED if k.group}  # status of the CRD kinds
    need |= {("", "configmaps", "create"), ("", "configmaps", "patch")}
    assert grants == need  # nothing more: no secrets, no deletes, no events


def test_gateway_mounts_the_configmap_the_controller_writes() -> None:
    from inferoute.controller.runtime import CONFIG_KEY, config_map_name

    objs = all_objects()
    (gw,) = [o for o in objs if o["kind"] == "Gateway"]
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "inferoute-gateway"]
    (vol,) = dep["spec"]["template"]["spec"]["volumes"]
    assert vol["configMap"]["name"] == config_map_name(gw["metadata"]["name"])
    assert vol["configMap"]["items"][0]["key"] == CONFIG_KEY
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--watch-config" in args and f"/etc/inferoute/{CONFIG_KEY}" in args
    (cls,) = [o for o in objs if o["kind"] == "GatewayClass"]
    assert cls["spec"]["controllerName"] == "inferoute.dev/gateway-controller"


def test_picker_rbac_and_probes_fit_leader_election() -> None:
    """The example picker runs two replicas with leader election: its Role grants what the election writes
    (create + merge patch of its Lease), and liveness probes the always-SERVING service, so a standby is not
    restarted for not leading (readiness, the "" service, follows leadership)."""
    objs = [o for o in all_objects() if o["metadata"]["name"] == "sim-pool-picker"]
    (role,) = [o for o in objs if o["kind"] == "Role"]
    grants = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert {("coordination.k8s.io", "leases", v) for v in ("get", "create", "patch")} <= grants
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--ha-enable-leader-election" in container["args"] and dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # a standby never turns ready: no rolling update
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert container["readinessProbe"]["grpc"]["service"] == "readiness"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
