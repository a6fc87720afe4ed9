"""The `lorasweep` command.

lorasweep render sweep.yaml [--template job.yaml.j2] [--limit N]
    print the trial Jobs a sweep would create, the headless Service of multi-node trials and
    the model download Job of spec.trainer.modelCache, as YAML (a dry run, no cluster)
lorasweep crds
    print the HyperparameterSweep CRD
lorasweep model-shape config.json
    print spec.constraints.model for a model, from its config.json (or its directory)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from lora_trainer.shape import ShapeError, model_shape, read_config, shape_yaml
from sweep_operator.api import API_VERSION, KIND
from sweep_operator.constraints import ConstraintError, planned_parameters, trial_indices
from sweep_operator.crd import crd_yaml
from sweep_operator.defaults import DefaultsError, trial_defaults
from sweep_operator.naming import trial_name
from sweep_operator.render import (
    SweepRef,
    render_model_fetch_job,
    render_trial_job,
    render_trial_service,
)
from sweep_operator.semantic import SweepInvalid, validate_sweep
from sweep_operator.trials import NewTrial

# What a dry run puts where the apiserver would put the sweep's uid.
DRY_RUN_UID = "00000000-0000-0000-0000-000000000000"


class CliError(Exception):
    """A problem to report on stderr with exit status 1."""


def _sweeps(path: Path) -> Iterator[dict[str, Any]]:
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except OSError as error:
        raise CliError(f"{path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise CliError(f"{path}: invalid YAML: {error}") from error
    found = False
    for doc in documents:
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            if doc.get("apiVersion") != API_VERSION:
                raise CliError(
                    f"{path}: apiVersion {doc.get('apiVersion')!r}, expected {API_VERSION}"
                )
            found = True
            yield doc
    if not found:
        raise CliError(f"{path}: no {KIND} in the file")


def render_sweep(
    sweep: dict[str, Any], *, template: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """What the operator creates for a sweep manifest: the model download Job with
    spec.trainer.modelCache, the headless Service when its trials span several nodes, then its
    trials' Jobs in index order (all of them unless `limit`)."""
    metadata = sweep.get("metadata") or {}
    name = metadata.get("name")
    if not name:
        raise CliError("metadata.name: required")
    ref = SweepRef(name=name, namespace=metadata.get("namespace") or "default", uid=DRY_RUN_UID)
    try:
        raw_spec = trial_defaults().apply(sweep.get("spec") or {})
        spec = validate_sweep(raw_spec, ref, template=template)
    except SweepInvalid as error:
        problems = "\n  ".join(map(str, error.problems))
        raise CliError(f"{KIND} {name} is invalid:\n  {problems}") from None
    except DefaultsError as error:
        raise CliError(str(error)) from None
    indices = trial_indices(spec).indices
    try:
        trials = [
            NewTrial(index=i, name=trial_name(name, i), parameters=planned_parameters(spec, i))
            for i in indices[:limit]
        ]
    except ConstraintError as error:
        raise CliError(f"{KIND} {name}: {error}") from None
    first = [render_model_fetch_job(ref, spec), render_trial_service(ref, spec)]
    jobs = [render_trial_job(ref, spec, t, template=template) for t in trials]
    return [obj for obj in first if obj] + jobs


def cmd_render(args: argparse.Namespace, out: TextIO) -> None:
    template = None
    if args.template:
        try:
            template = Path(args.template).read_text()
        except OSError as error:
            raise CliError(f"{args.template}: {error.strerror or error}") from error
    objects = [
        obj
        for sweep in _sweeps(Path(args.file))
        for obj in render_sweep(sweep, template=template, limit=args.limit)
    ]
    out.write(yaml.safe_dump_all(objects, sort_keys=False, width=100))


def cmd_crds(args: argparse.Namespace, out: TextIO) -> None:
    out.write(crd_yaml())


def cmd_model_shape(args: argparse.Namespace, out: TextIO) -> None:
    try:
        shape = model_shape(read_config(args.config))
    except ShapeError as error:
        raise CliError(str(error)) from None
    out.write(f"model: {shape_yaml(shape)}\n")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lorasweep", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    render = commands.add_parser(
        "render", help="print a sweep's trial Jobs, Service and model download Job (dry run)"
    )
    render.add_argument("file", help="YAML file with one or more HyperparameterSweeps")
    render.add_argument("--template", help="Jinja2 template of the trial Job")
    render.add_argument("--limit", type=int, help="render only the first N trials")
    render.set_defaults(run=cmd_render)
    crds = commands.add_parser("crds", help="print the HyperparameterSweep CRD")
    crds.set_defaults(run=cmd_crds)
    shape = commands.add_parser(
        "model-shape",
        help="print spec.constraints.model for a model from its config.json; the exact "
        "parameter count (a trial logs it) is left to the estimate's Llama-style count",
    )
    shape.add_argument("config", help="the model's config.json, or the model's directory")
    shape.set_defaults(run=cmd_model_shape)
    return top


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args, out or sys.stdout)
    except CliError as error:
        print(f"lorasweep: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
