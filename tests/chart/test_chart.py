"""The Helm chart, rendered: lint, kubeconform against the API server's own schemas, the values
schema, RBAC shape, and the operator image's Dockerfile."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import devcluster
from tests.chart.chart_support import (
    CHART,
    REPO,
    documents,
    helm,
    install_commands,
    kubeconform,
    template,
    write_builtin_schemas,
    write_crd_schemas,
)

COMBOS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "mlflow": {"mlflow": {"enabled": True}},
    "replicas-2": {"replicas": 2},
    "namespaced-replicas-2-mlflow": {
        "replicas": 2,
        "watchNamespaces": ["team-a"],
        "mlflow": {"enabled": True, "persistence": {"storageClassName": "fast"}},
        "trialDefaults": {
            "image": "registry.example.com/lorasweep-trainer:0.1.0",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        },
        "extraEnv": [{"name": "MLFLOW_TRACKING_INSECURE_TLS", "value": "true"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "logLevel": "debug",
        "logFormat": "json",
        "podAnnotations": {"example.com/team": "ml"},
    },
}


@pytest.fixture(scope="session")
def schemas(cluster, tmp_path_factory) -> Path:
    """Strict JSON schemas of every kind the dev cluster's API server serves (its
    /openapi/v2), plus the chart's CRDs and the project's CRD from their openAPIV3Schema."""
    folder = tmp_path_factory.mktemp("schemas")
    swagger = subprocess.run(
        [f"{cluster.bin_dir}/kubectl", "get", "--raw", "/openapi/v2"],
        check=True,
        capture_output=True,
        env={"KUBECONFIG": str(devcluster.KUBECONFIG)},
    ).stdout
    assert write_builtin_schemas(json.loads(swagger), folder) > 50
    kinds = write_crd_schemas(sorted((CHART / "crds").glob("*.yaml")), folder)
    assert {"HyperparameterSweep", "ClusterKopfPeering", "KopfPeering"} <= set(kinds)
    return folder


def test_chart_crd_is_the_generated_crd():
    for crd in (REPO / "crds").glob("*.yaml"):
        copy = CHART / "crds" / crd.name
        assert copy.is_file() and copy.read_text() == crd.read_text(), (
            f"{copy.relative_to(REPO)} differs from {crd.relative_to(REPO)}: "
            f"cp {crd.relative_to(REPO)} {copy.relative_to(REPO)}"
        )


@pytest.mark.parametrize("combo", COMBOS)
def test_lint_and_kubeconform(combo: str, schemas: Path, tmp_path: Path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(COMBOS[combo]))
    lint = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in lint
    stream = template(COMBOS[combo], tmp_path, "--include-crds")
    report = kubeconform(stream, schemas)
    kinds = {d["kind"] for d in documents(stream)}
    assert report["summary"]["valid"] == len(documents(stream)), report
    assert report["summary"]["skipped"] == 0
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole"} <= kinds


def test_kubeconform_is_strict(schemas: Path, tmp_path: Path):
    """The schemas catch what the chart tests rely on them to catch."""
    deployment = next(d for d in documents(template({}, tmp_path)) if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(AssertionError, match="livenessprobe"):
        kubeconform(yaml.safe_dump(deployment), schemas)
    sweep = yaml.safe_load((REPO / "examples" / "sweep.yaml").read_text())
    kubeconform(yaml.safe_dump(sweep), schemas)  # the example fits the CRD's schema
    sweep["spec"]["maxTrails"] = 3
    with pytest.raises(AssertionError, match="maxTrails"):
        kubeconform(yaml.safe_dump(sweep), schemas)


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"replica": 2}, "additional properties 'replica' not allowed"),
        ({"mlflow": {"enable": True}}, "additional properties 'enable' not allowed"),
        ({"resources": {"requets": {"cpu": 1}}}, "additional properties 'requets' not allowed"),
        ({"replicas": "2"}, "got string, want integer"),
        ({"replicas": 0}, "minimum"),
        ({"watchNamespaces": "team-a"}, "got string, want array"),
        ({"watchNamespaces": ["Team_A"]}, "does not match pattern"),
        ({"logLevel": "trace"}, "value must be one of"),
        ({"mlflow": {"enabled": "yes"}}, "got string, want boolean"),
        ({"trialDefaults": {"nodeSelector": {"gpu": True}}}, "got boolean, want string"),
        ({"trialDefaults": {"tolerations": {"key": "x"}}}, "got object, want array"),
        ({"trialDefaults": {"mlflowTrackingUri": "mlflow:5000"}}, "does not match pattern"),
        ({"trialDefaults": {"queueName": "Team_A"}}, "does not match pattern"),
        ({"image": {"pullPolicy": "Sometimes"}}, "value must be one of"),
        ({"sweepAccessPolicy": {"enabled": "yes"}}, "got string, want boolean"),
    ],
)
def test_values_schema_refuses(values: dict[str, Any], error: str, tmp_path: Path):
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    output = helm("template", "rel", str(CHART), "-f", str(values_file), check=False)
    assert "values don't meet the specifications of the schema" in output, output
    assert error in output


# Values that are Kubernetes objects: their fields are Kubernetes' and documented there.
KUBERNETES_OBJECTS = {"podSecurityContext", "securityContext", "resources"}


def test_every_value_is_documented():
    """Each key of values.yaml has a comment right above it (or above the sibling keys right
    above it, which share it), or is a mapping whose keys are all documented."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_pattern = re.compile(r"^(\s*)([A-Za-z][\w.-]*):")
    keys = [(i, len(m[1]), m[2]) for i, line in enumerate(lines) if (m := key_pattern.match(line))]

    def commented(i: int, indent: int) -> bool:
        for above in reversed(lines[:i]):
            if above.strip().startswith("#") and len(above) - len(above.lstrip()) == indent:
                return True
            key = key_pattern.match(above)
            if not key or len(key[1]) != indent:
                return False
        return False

    def children(k: int) -> list[int]:
        """Indexes in `keys` of the direct child keys of keys[k]."""
        indent, found = keys[k][1], []
        for c in range(k + 1, len(keys)):
            if keys[c][1] <= indent:
                break
            if not found or keys[c][1] == keys[found[0]][1]:
                found.append(c)
        return found

    def documented(k: int) -> bool:
        i, indent, _ = keys[k]
        if commented(i, indent):
            return True
        direct = children(k)
        return bool(direct) and all(documented(c) for c in direct)

    undocumented = []
    exempt_below: int | None = None  # indent of a Kubernetes object being skipped
    for k, (_, indent, name) in enumerate(keys):
        if exempt_below is not None and indent > exempt_below:
            continue
        exempt_below = indent if name in KUBERNETES_OBJECTS else None
        if not documented(k):
            undocumented.append(name)
    assert not undocumented


def rules_by_kind(stream: str) -> dict[str, list[dict[str, Any]]]:
    """The operator's roles' rules, by kind and namespace."""
    rules: dict[str, list[dict[str, Any]]] = {}
    for doc in documents(stream):
        component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        if doc["kind"] in ("ClusterRole", "Role") and component == "operator":
            where = doc["metadata"].get("namespace", "")
            rules[f"{doc['kind']}/{where}"] = doc["rules"]
    return rules


def resources(rules: list[dict[str, Any]]) -> set[str]:
    return {r for rule in rules for r in rule["resources"]}


def test_rbac_is_least_privilege(tmp_path: Path):
    cluster_wide = rules_by_kind(template({}, tmp_path))
    assert list(cluster_wide) == ["ClusterRole/"]
    namespaced = rules_by_kind(template({"watchNamespaces": ["a", "b"]}, tmp_path))
    assert sorted(namespaced) == ["ClusterRole/", "Role/a", "Role/b"]
    # Namespaced: nothing namespaced is granted cluster-wide, only discovery.
    assert resources(namespaced["ClusterRole/"]) == {"customresourcedefinitions", "namespaces"}
    for rules in [*cluster_wide.values(), *namespaced.values()]:
        granted = resources(rules)
        assert not granted & {"secrets", "pods/exec", "*"}
        # ConfigMaps: the report is written, no ConfigMap is ever read.
        for rule in rules:
            if "configmaps" in rule["resources"]:
                assert rule["resources"] == ["configmaps"]
                assert set(rule["verbs"]) == {"create", "patch"}
        verbs = {v for rule in rules for v in rule["verbs"]}
        assert not verbs & {"*", "escalate", "bind", "impersonate"}
        # Kueue: stopped trials' Workloads are deactivated; nothing of Kueue's is created,
        # deleted or watched.
        kueue = {r: set(rule["verbs"]) for rule in rules for r in rule["resources"]}
        if rules is not namespaced["ClusterRole/"]:  # the discovery-only one
            assert kueue["workloads"] == {"list", "patch"}
            assert kueue["localqueues"] == {"get"}
        for rule in rules:
            if rule["resources"] == ["customresourcedefinitions"]:
                assert rule["verbs"] == ["list", "watch"]  # reads, never writes, CRDs
    peering = rules_by_kind(template({"replicas": 2}, tmp_path))
    assert "clusterkopfpeerings" in resources(peering["ClusterRole/"])
    assert "clusterkopfpeerings" not in resources(cluster_wide["ClusterRole/"])


def test_user_roles_aggregate_into_the_builtin_ones(tmp_path: Path):
    """The users' roles, by name, with the built-in roles they aggregate into."""
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"

    def user_roles(values: dict[str, Any]) -> dict[str, list[str]]:
        return {
            d["metadata"]["name"]: sorted(
                key.removeprefix(aggregate)
                for key, value in d["metadata"]["labels"].items()
                if key.startswith(aggregate) and value == "true"
            )
            for d in documents(template(values, tmp_path))
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "user-roles"
        }

    assert user_roles({}) == {
        "rel-lorasweep-sweep-editor": ["admin", "edit"],
        "rel-lorasweep-sweep-viewer": ["view"],
    }
    assert user_roles({"rbac": {"userRoles": False}}) == {}


def test_the_sweep_access_policy_covers_where_the_operator_acts(tmp_path: Path):
    """The apiserver, not the operator, decides who may have trials: the policy's binding is
    everywhere with a ClusterRole, in the watched namespaces with Roles."""

    def policy(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        docs = documents(template(values, tmp_path))
        found = [d for d in docs if d["kind"].startswith("ValidatingAdmissionPolicy")]
        if not found:
            return None
        [vap] = [d for d in found if d["kind"] == "ValidatingAdmissionPolicy"]
        [binding] = [d for d in found if d["kind"] == "ValidatingAdmissionPolicyBinding"]
        assert binding["spec"]["policyName"] == vap["metadata"]["name"]
        return vap["spec"], binding["spec"]

    vap, binding = policy({}) or ({}, {})
    assert vap["failurePolicy"] == "Fail"
    [rule] = vap["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"]) == (["lorasweep.io"], ["hyperparametersweeps"])
    assert rule["operations"] == ["CREATE", "UPDATE"]
    [validation] = vap["validations"]
    assert "resource('jobs')" in validation["expression"] and validation["reason"] == "Forbidden"
    assert binding["validationActions"] == ["Deny"] and "matchResources" not in binding
    _, binding = policy({"watchNamespaces": ["a", "b"]}) or ({}, {})
    [selector] = binding["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert selector == {
        "key": "kubernetes.io/metadata.name",
        "operator": "In",
        "values": ["a", "b"],
    }
    assert policy({"sweepAccessPolicy": {"enabled": False}}) is None


def operator_deployment(stream: str) -> dict[str, Any]:
    return next(
        d
        for d in documents(stream)
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("lorasweep")
    )


def operator_container(stream: str) -> dict[str, Any]:
    [container] = operator_deployment(stream)["spec"]["template"]["spec"]["containers"]
    return container


def test_a_single_operator_is_replaced_never_run_beside_its_successor(tmp_path: Path):
    """Without peering (one replica), an upgrade must stop the old operator before the new
    one starts; with peering, a rolling update is safe and keeps a standby working."""
    assert operator_deployment(template({}, tmp_path))["spec"]["strategy"] == {"type": "Recreate"}
    assert "strategy" not in operator_deployment(template({"replicas": 2}, tmp_path))["spec"]


def test_deployment_arguments_and_defaults(tmp_path: Path):
    default = operator_container(template({}, tmp_path))
    assert default["args"] == [
        "run",
        "--module=sweep_operator.handlers",
        "--standalone",
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--log-format=full",
    ]
    assert default["image"] == "ghcr.io/lorasweep/lorasweep-operator:0.1.0"  # appVersion
    assert default["livenessProbe"]["httpGet"]["path"] == "/healthz"
    security = default["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert [e["name"] for e in default["env"]] == ["POD_ID"]

    values = {
        "replicas": 3,
        "watchNamespaces": ["a", "b"],
        "logLevel": "warning",
        "mlflow": {"enabled": True},
        "trialDefaults": {
            "image": "trainer:1",
            "nodeSelector": {"gpu": "yes"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "queueName": "team-gpus",
        },
    }
    stream = template(values, tmp_path)
    container = operator_container(stream)
    assert container["args"][1:5] == [
        "--module=sweep_operator.handlers",
        "--module=sweep_operator.peering",
        "--peering=rel-lorasweep",
        "--namespace=a",
    ]
    assert "--quiet" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (
        env["LORASWEEP_MLFLOW_TRACKING_URI"]
        == "http://rel-lorasweep-mlflow.lorasweep-system.svc:5000"
    )
    assert env["LORASWEEP_DEFAULT_TRAINER_IMAGE"] == "trainer:1"
    assert json.loads(env["LORASWEEP_DEFAULT_NODE_SELECTOR"]) == {"gpu": "yes"}
    assert (
        json.loads(env["LORASWEEP_DEFAULT_TOLERATIONS"]) == values["trialDefaults"]["tolerations"]
    )
    assert env["LORASWEEP_DEFAULT_QUEUE_NAME"] == "team-gpus"
    peerings = [d for d in documents(stream) if d["kind"] == "KopfPeering"]
    assert [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings] == [
        ("a", "rel-lorasweep"),
        ("b", "rel-lorasweep"),
    ]
    # An explicit URI wins over the bundled server's.
    values["trialDefaults"]["mlflowTrackingUri"] = "https://mlflow.example.com"
    env = {e["name"]: e.get("value") for e in operator_container(template(values, tmp_path))["env"]}
    assert env["LORASWEEP_MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"


def test_readme_install_commands_render(tmp_path: Path):
    """README's install and upgrade flags are valid for the chart (the cluster test runs them)."""
    commands = install_commands()
    assert [c[:2] for c in commands] == [
        ["helm", "install"],
        ["helm", "upgrade"],
        ["helm", "uninstall"],
    ]
    install = commands[0]
    flags = [w for w in install[4:] if w != "--create-namespace"]
    stream = helm("template", install[2], str(REPO / install[3]), *flags)
    env = {e["name"]: e.get("value") for e in operator_container(stream)["env"]}
    assert env["LORASWEEP_DEFAULT_TRAINER_IMAGE"] == "registry.example.com/lorasweep-trainer:0.1.0"


# --- operator/Dockerfile ------------------------------------------------------------------


def test_dockerfile_is_pinned_non_root_and_matches_pyproject():
    dockerfile = (REPO / "operator" / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+)\.(\d+)\.(\d+)-slim-\w+$", dockerfile, re.M)
    assert base, "the base image must be a fully pinned python:X.Y.Z-slim-<debian> tag"
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    assert minimum and (base[1], base[2]) == minimum.groups(), (
        "the image's Python must be pyproject's requires-python (and ruff's target)"
    )
    # Dependencies come from pyproject's [operator] extra, so their pins are pyproject's.
    assert (
        'pip install ".[operator]"' in dockerfile and "operator" in project["optional-dependencies"]
    )
    assert not re.search(r"pip install (?!\"\.\[operator\]\")", dockerfile), (
        "install nothing beside the [operator] extra: its pins would not be pyproject's"
    )
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert not re.search(r"^USER (root|0)\b", dockerfile, re.M)
    # The chart runs `kopf` with these modules; the image must provide both.
    assert '["kopf"]' in dockerfile
    for module in ("handlers", "peering"):
        assert (REPO / "operator" / "sweep_operator" / f"{module}.py").is_file()
    # The chart's pod securityContext runs as the image's user.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
