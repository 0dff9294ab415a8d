"""docs/kubernetes.md stays true to the repository: every YAML block is a set of Kubernetes objects that
validate (built-in kinds with kubernetes-validate, Gateway API / Inference Extension kinds against their CRDs'
OpenAPI schemas), every `kubectl apply/delete -k|-f PATH` names a path that exists, and the example objects
it shows are the ones deploy/ applies."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from k8s_objects import check_schema

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "kubernetes.md"
K8S_VERSION = "1.32"
CUSTOM = {"GatewayClass", "Gateway", "HTTPRoute", "InferencePool"}


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)


def doc_objects() -> list[dict[str, Any]]:
    return [d for block in yaml_blocks(DOC.read_text()) for d in yaml.safe_load_all(block) if d is not None]


def validate(obj: dict[str, Any]) -> None:
    if obj["kind"] in CUSTOM:
        check_schema(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_doc_has_yaml_blocks() -> None:
    kinds = {o["kind"] for o in doc_objects()}
    assert {"InferencePool", "HTTPRoute", "Deployment"} <= kinds


@pytest.mark.parametrize(
    "obj", doc_objects(), ids=lambda o: f"{o.get('kind')}/{(o.get('metadata') or {}).get('name')}"
)
def test_every_yaml_object_validates(obj: dict[str, Any]) -> None:
    validate(obj)


@pytest.mark.parametrize(
    "bad",
    [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
         "spec": {"replicas": "two"}},
        {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "x"},
         "spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 70000}]}},
    ],
    ids=["built-in", "crd"],
)  # fmt: skip
def test_the_check_refuses_an_invalid_object(bad: dict[str, Any]) -> None:
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(bad)


def test_every_kubectl_path_exists() -> None:
    paths = re.findall(r"kubectl (?:apply|delete) -[kf] ([\w./-]+)", DOC.read_text())
    assert "deploy/" in paths and "deploy/example/" in paths
    for p in paths:
        assert (ROOT / p).exists(), f"docs/kubernetes.md names {p}, which does not exist"


def test_the_example_shown_is_the_example_applied() -> None:
    applied = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((ROOT / "deploy" / "example" / "pool.yaml").read_text())
    }
    shown = doc_objects()
    first_pool = next(o for o in shown if o["kind"] == "InferencePool")
    first_route = next(o for o in shown if o["kind"] == "HTTPRoute")
    assert first_pool == applied[("InferencePool", "sim-pool")]
    assert first_route == applied[("HTTPRoute", "sim-pool")]
