"""Generate the HyperparameterSweep CRD from the pydantic models.

    python -m sweep_operator.crd > crds/hyperparametersweeps.lorasweep.io.yaml

pydantic writes JSON Schema (2020-12); a CRD needs a *structural* OpenAPI v3 schema: every
node typed, no $ref, no anyOf/oneOf carrying types, free-form objects marked with
x-kubernetes-preserve-unknown-fields. `structural()` does that conversion.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from sweep_operator.api import GROUP, KIND, PLURAL, SINGULAR, VERSION, SweepSpec, SweepStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
SHORT_NAMES = ["hps", "sweep"]
HEADER = (
    "# Generated from the pydantic models in operator/sweep_operator/api.py by\n"
    "# `python -m sweep_operator.crd` (make crds). Do not edit.\n"
)

# JSON Schema keywords a CRD schema accepts as they are (apiextensions JSONSchemaProps).
_KEEP = {
    "description",
    "type",
    "format",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
}
# Key order of the generated YAML, for a readable diff: what a node is, then its limits.
_ORDER = [
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
]
_SCALARS = {"boolean", "integer", "number", "string"}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref; keywords next to the $ref (the field's description) win."""
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _collapse_any_of(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`X | None` becomes X (absent means None); `int | float` becomes number; a union of
    other scalars (a parameter value) becomes an untyped, preserved value."""
    options = [_resolve(o, defs) for o in node["anyOf"] if o.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(options) == 1:
        return {**_resolve(options[0], defs), **rest}
    types = {o.get("type") for o in options}
    if types == {"integer", "number"}:
        return {"type": "number", **rest}
    if types <= _SCALARS:
        return {"x-kubernetes-preserve-unknown-fields": True, **rest}
    raise ValueError(f"no structural form for the union {node['anyOf']}")


def structural(node: dict[str, Any], defs: dict[str, Any], *, defaults: bool = True) -> dict:
    """Convert one pydantic JSON Schema node (and its children) to a structural CRD schema."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        node = _collapse_any_of(node, defs)
    out = {k: v for k, v in node.items() if k in _KEEP}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:  # JSON Schema's number form -> OpenAPI v3.0's boolean form
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
    # Defaults are applied by the apiserver; None means "absent", which needs no default.
    default = node.get("default")
    if defaults and (isinstance(default, bool | int | float | str) or default == {}):
        out["default"] = default

    kind = node.get("type")
    out = {k: out[k] for k in sorted(out, key=_ORDER.index)}
    if kind == "object":
        if "properties" in node:
            out["properties"] = {
                name: structural(child, defs, defaults=defaults)
                for name, child in node["properties"].items()
            }
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = structural(extra, defs, defaults=defaults)
        elif "properties" not in node:
            # dict[str, Any]: a Kubernetes sub-object or free-form settings, kept as written.
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural(node["items"], defs, defaults=defaults)
    return out


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema."""
    spec = SweepSpec.model_json_schema(by_alias=True)
    status = SweepStatus.model_json_schema(by_alias=True)
    return {
        "type": "object",
        "description": "A hyperparameter sweep of LoRA fine-tuning: the operator runs its "
        "trials as Jobs, tracks them in MLflow and reports the best trial in status.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            # The apiserver owns metadata's schema and refuses anything more specific here.
            "metadata": {"type": "object"},
            "spec": structural(spec, spec.get("$defs", {})),
            # No defaults in status: it is written by the operator only.
            "status": structural(status, status.get("$defs", {}), defaults=False),
        },
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    columns = [
        ("Phase", "string", ".status.phase", "The sweep's phase."),
        ("Metric", "string", ".spec.objective.metric", "The objective metric."),
        ("Best", "number", ".status.bestTrial.value", "The best objective value so far."),
        ("Succeeded", "string", ".status.progress", "Succeeded trials / trials to run."),
        ("Queued", "integer", ".status.trials.queued", "Trials waiting for quota in Kueue."),
        ("Age", "date", ".metadata.creationTimestamp", "Time since the sweep was created."),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["lorasweep"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p, "description": d}
                        for n, t, p, d in columns
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML file committed in crds/."""
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main() -> int:
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
