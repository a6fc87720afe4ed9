"""The generated CRD: up to date, structural, documented."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from sweep_operator.crd import CRD_NAME, crd, crd_yaml
from tests.unit.sweep_helpers import REPO

CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "additionalProperties: false"}


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


def version() -> dict[str, Any]:
    [v] = crd()["spec"]["versions"]
    return v


def schema() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]


def test_committed_crd_is_up_to_date():
    assert CRD_FILE.read_text() == crd_yaml(), (
        f"{CRD_FILE} is stale: run `python -m sweep_operator.crd > {CRD_FILE.relative_to(REPO)}`"
    )


def test_schema_is_structural():
    for path, node in walk(schema()):
        assert not FORBIDDEN & node.keys(), path
        assert node.get("additionalProperties") is not False, path
        typed = "type" in node or node.get("x-kubernetes-preserve-unknown-fields")
        assert typed, f"{path} has no type"
        if node.get("type") == "object" and path != ".metadata":
            has_shape = "properties" in node or "additionalProperties" in node
            assert has_shape or node.get("x-kubernetes-preserve-unknown-fields"), path


def test_every_field_has_a_description():
    for path, node in walk(schema()):
        # List items and map values are described by their list or map.
        scalar_item = path.endswith(("[]", ".*")) and "properties" not in node
        if scalar_item or path == ".metadata":
            continue
        assert node.get("description"), f"{path} has no description"


def test_kubernetes_sub_objects_are_preserved():
    trainer = schema()["properties"]["spec"]["properties"]["trainer"]["properties"]
    assert trainer["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    assert trainer["config"]["x-kubernetes-preserve-unknown-fields"] is True
    for name in ("env", "envFrom", "volumes", "volumeMounts", "tolerations"):
        assert trainer[name]["items"] == {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }
    assert trainer["nodeSelector"]["additionalProperties"] == {"type": "string"}


def test_cross_field_rules_and_defaults():
    spec = schema()["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("has(self.maxTrials)" in r for r in rules)
    assert "self.parameters == oldSelf.parameters" in rules
    parameter = spec["properties"]["parameters"]["additionalProperties"]
    assert any("self.min < self.max" in r["rule"] for r in parameter["x-kubernetes-validations"])
    # CEL cannot see untyped fields, so no rule may mention values (the CRD would be refused).
    for path, node in walk(schema()):
        for rule in node.get("x-kubernetes-validations", []):
            assert ".values" not in rule["rule"], path
    assert parameter["properties"]["values"]["minItems"] == 1
    assert spec["properties"]["parallelism"] == {
        "description": "Trials running at the same time.",
        "type": "integer",
        "default": 1,
        "minimum": 1,
    }
    assert spec["properties"]["algorithm"]["default"] == {}


def trainer_schema() -> dict[str, Any]:
    return schema()["properties"]["spec"]["properties"]["trainer"]["properties"]


@pytest.mark.parametrize("field", ["gpus", "nodes"])
def test_apply_refuses_a_trial_without_gpus_or_nodes(field):
    node = trainer_schema()[field]
    assert (node["type"], node["default"], node["minimum"]) == ("integer", 1, 1)
    assert "exclusiveMinimum" not in node


def test_apply_refuses_a_checkpoint_claim_that_is_not_a_pvc_name():
    checkpoints = trainer_schema()["checkpoints"]
    assert checkpoints["required"] == ["claimName", "intervalSteps"]
    claim = checkpoints["properties"]["claimName"]
    assert claim["maxLength"] == 253
    # The apiserver matches pattern as Go's regexp.MatchString does: anywhere in the value.
    for good in ("ckpt", "lora-ckpt.team-a", "0ckpt"):
        assert re.search(claim["pattern"], good), good
    for bad in ("Ckpt", "ckpt_1", "-ckpt", "ckpt.", "", "a/b"):
        assert not re.search(claim["pattern"], bad), bad
    assert checkpoints["properties"]["intervalSteps"]["minimum"] == 1
    mount = checkpoints["properties"]["mountPath"]
    assert mount["default"] == "/checkpoints"
    assert re.search(mount["pattern"], "/ckpt") and not re.search(mount["pattern"], "ckpt")


def test_registered_model_and_adapter_uri():
    mlflow = schema()["properties"]["spec"]["properties"]["mlflow"]["properties"]
    assert mlflow["registeredModel"]["type"] == "string"
    best = schema()["properties"]["status"]["properties"]["bestTrial"]["properties"]
    assert best["adapterUri"]["type"] == "string"


def test_names_subresource_and_columns():
    names = crd()["spec"]["names"]
    assert names["shortNames"] == ["hps", "sweep"]
    assert crd()["metadata"]["name"] == "hyperparametersweeps.lorasweep.io"
    assert version()["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version()["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Metric": ".spec.objective.metric",
        "Best": ".status.bestTrial.value",
        "Succeeded": ".status.progress",
        "Queued": ".status.trials.queued",
        "Age": ".metadata.creationTimestamp",
    }
    conditions = schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
