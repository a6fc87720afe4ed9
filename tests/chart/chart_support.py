"""Helm, kubeconform and offline JSON schemas for the chart tests (a plain module, not a
conftest: conftest names clash across test folders)."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from devcluster.paths import PACKAGE, REPO

CHART = REPO / "charts" / "lorasweep"
BUILD_BINS = PACKAGE / "build-bins.sh"
README = REPO / "README.md"
INSTALL_BEGIN, INSTALL_END = "<!-- install:begin -->", "<!-- install:end -->"
# kubeconform finds a schema per kind: deployment-apps-v1.json, clusterrole-rbac-v1.json, ...
SCHEMA_LOCATION = "{{ .ResourceKind }}{{ .KindSuffix }}.json"


@functools.cache
def tools_dir() -> Path:
    """helm and kubeconform, built (once, cached) by the project's build script.

    The script prints the cluster's bin folder first; the tools sit beside it in a folder named by
    their versions, which are the script's defaults unless the environment overrides them.
    """
    out = subprocess.run(
        ["bash", str(BUILD_BINS)], check=True, capture_output=True, text=True
    ).stdout
    script = BUILD_BINS.read_text()

    def version(var: str) -> str:
        found = re.search(rf"^{var}=\$\{{{var}:-(\S+)\}}$", script, re.MULTILINE)
        assert found, f"{var} not found in {BUILD_BINS}"
        return os.environ.get(var) or found.group(1)

    folder = (
        Path(out.splitlines()[0]).parent
        / f"helm-{version('HELM_VERSION')}-kubeconform-{version('KUBECONFORM_VERSION')}"
    )
    assert (folder / "helm").is_file() and (folder / "kubeconform").is_file(), folder
    return folder


def helm(*args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run helm; on failure with check, the assertion shows its stderr."""
    result = subprocess.run(
        [str(tools_dir() / "helm"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert result.returncode == 0, f"helm {shlex.join(args)} failed:\n{result.stderr}"
        return result.stdout
    return result.stdout + result.stderr if result.returncode else ""


def template(values: dict[str, Any] | None, tmp_path: Path, *extra: str) -> str:
    """`helm template` of the chart with a values file; returns the YAML stream."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    return helm(
        "template", "rel", str(CHART), "-n", "lorasweep-system", "-f", str(values_file), *extra
    )


def documents(stream: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(stream) if d]


# --- offline JSON schemas for kubeconform -------------------------------------------------

# Types that swagger writes as strings but Kubernetes also accepts as numbers.
_NUMERIC_STRINGS = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": ["string", "integer"]},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": ["string", "number"]},
}


def kind_suffix(api_version: str) -> str:
    """kubeconform's KindSuffix: -v1, -apps-v1, -rbac-v1 (first label of the group)."""
    group, _, version = api_version.rpartition("/")
    return f"-{group.split('.')[0]}-{version}" if group else f"-{version}"


def _strict(schema: Any) -> Any:
    """Forbid unknown fields in every object schema that lists its fields (kubeconform's
    -strict checks only duplicate keys when the schemas are local). Walks schema positions
    only: a field may be named `properties`."""
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if isinstance(schema.get("properties"), dict):
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        found = {ref.rsplit("/", 1)[-1]} if isinstance(ref, str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def write_builtin_schemas(swagger: dict[str, Any], folder: Path) -> int:
    """One standalone strict schema per kind of the API server's /openapi/v2 document:
    the kind's definition as the root, with the definitions it reaches (recursion, as in
    the CRD's JSONSchemaProps, stays a $ref)."""
    definitions = {**swagger["definitions"], **_NUMERIC_STRINGS}
    count = 0
    for name, definition in swagger["definitions"].items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            reached, todo = set(), {name}
            while todo:
                current = todo.pop()
                reached.add(current)
                todo |= _refs(definitions[current]) - reached
            schema = {
                "$ref": f"#/definitions/{name}",
                "definitions": {d: _strict(definitions[d]) for d in reached},
            }
            path = folder / f"{gvk['kind'].lower()}{kind_suffix(api_version)}.json"
            path.write_text(json.dumps(schema))
            count += 1
    return count


def write_crd_schemas(crd_files: list[Path], folder: Path) -> list[str]:
    """A strict schema per version of each CRD, from its openAPIV3Schema; returns the kinds."""
    kinds = []
    for crd_file in crd_files:
        for crd in yaml.safe_load_all(crd_file.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                # apiVersion, kind and metadata are the apiserver's, not in the CRD schema.
                schema.setdefault("properties", {}).update(
                    apiVersion={"type": "string"},
                    kind={"type": "string"},
                    metadata={"type": "object"},
                )
                api_version = f"{spec['group']}/{version['name']}"
                kind = spec["names"]["kind"]
                path = folder / f"{kind.lower()}{kind_suffix(api_version)}.json"
                path.write_text(json.dumps(schema))
                kinds.append(kind)
    return kinds


def kubeconform(stream: str, schemas: Path) -> dict[str, Any]:
    """kubeconform -strict over a YAML stream with only the local schemas (no downloads: a
    kind without a schema is an error). Returns its JSON summary."""
    result = subprocess.run(
        [
            str(tools_dir() / "kubeconform"),
            "-strict",
            "-summary",
            "-output=json",
            f"-schema-location={schemas}/{SCHEMA_LOCATION}",
        ],
        input=stream,
        capture_output=True,
        text=True,
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0, json.dumps(report["resources"], indent=1)
    return report


# --- README's install section -------------------------------------------------------------


def install_commands() -> list[list[str]]:
    """The shell commands of README's install section, in order, split into words
    (continuation lines joined, comments dropped)."""
    text = README.read_text()
    section = text[text.index(INSTALL_BEGIN) : text.index(INSTALL_END)]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands
