"""The `lorasweep` command.

lorasweep render sweep.yaml [--template job.yaml.j2] [--limit N]
    print the trial Jobs a sweep would create, the headless Service of multi-node trials and
    the model download Job of spec.trainer.modelCache, as YAML (a dry run, no cluster); trials
    a model proposes from earlier results (tpe, bohb) are named on stderr, not rendered
lorasweep refine SWEEP [-n NAMESPACE] [--top K] [--margin M] [--name NAME] [--max-trials N]
    print a narrower sweep around the best trials of SWEEP (read from the cluster of the current
    kubeconfig), warm-started from it; `lorasweep refine coarse | kubectl apply -f -`
lorasweep crds
    print the HyperparameterSweep CRD
lorasweep model-shape config.json
    print spec.constraints.model for a model, from its config.json (or its directory)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from lora_trainer.shape import ShapeError, model_shape, read_config, shape_yaml
from sweep_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from sweep_operator.constraints import ConstraintError
from sweep_operator.crd import crd_yaml
from sweep_operator.defaults import DefaultsError, trial_defaults
from sweep_operator.naming import label_value, trial_name
from sweep_operator.objective import objective_values
from sweep_operator.observe import job_summary, pod_summary, trials_observer
from sweep_operator.refine import REFINE_MARGIN, REFINE_TOP, RefineError, refined_sweep
from sweep_operator.render import (
    SweepRef,
    render_model_fetch_job,
    render_trial_job,
    render_trial_service,
)
from sweep_operator.search import suggester
from sweep_operator.semantic import SweepInvalid, parse_spec, validate_sweep
from sweep_operator.trials import LABEL_SWEEP, NewTrial, ObservedTrial, TrialState

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


@dataclass(frozen=True)
class DryRun:
    """What `lorasweep render` shows of one sweep."""

    objects: list[dict[str, Any]]
    algorithm: str
    # Trial indices whose parameters a model proposes once earlier trials have results.
    proposed_later: list[int] = field(default_factory=list)


def render_sweep(
    sweep: dict[str, Any], *, template: str | None = None, limit: int | None = None
) -> DryRun:
    """What the operator creates for a sweep manifest: the model download Job with
    spec.trainer.modelCache, the headless Service when its trials span several nodes, then its
    trials' Jobs in index order (all of them unless `limit`), but for the trials the search
    algorithm can only propose from earlier results."""
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
    search = suggester(spec)
    trials, later = [], []
    try:
        for i in search.indices().indices[:limit]:
            parameters = search.fixed(i)
            if parameters is None:
                later.append(i)
            else:
                trials.append(NewTrial(index=i, name=trial_name(name, i), parameters=parameters))
    except ConstraintError as error:
        raise CliError(f"{KIND} {name}: {error}") from None
    first = [render_model_fetch_job(ref, spec), render_trial_service(ref, spec)]
    jobs = [render_trial_job(ref, spec, t, template=template) for t in trials]
    objects = [obj for obj in first if obj] + jobs
    return DryRun(objects=objects, algorithm=spec.algorithm.name, proposed_later=later)


def cmd_render(args: argparse.Namespace, out: TextIO) -> None:
    template = None
    if args.template:
        try:
            template = Path(args.template).read_text()
        except OSError as error:
            raise CliError(f"{args.template}: {error.strerror or error}") from error
    objects = []
    for sweep in _sweeps(Path(args.file)):
        run = render_sweep(sweep, template=template, limit=args.limit)
        objects += run.objects
        if run.proposed_later:
            first, last = run.proposed_later[0], run.proposed_later[-1]
            print(
                f"lorasweep: {sweep['metadata']['name']}: trials {first} to {last} "
                f"({len(run.proposed_later)}) are not rendered: {run.algorithm} proposes their "
                "parameters from the results of earlier trials while the sweep runs",
                file=sys.stderr,
            )
    out.write(yaml.safe_dump_all(objects, sort_keys=False, width=100))


def cmd_crds(args: argparse.Namespace, out: TextIO) -> None:
    out.write(crd_yaml())


def cmd_model_shape(args: argparse.Namespace, out: TextIO) -> None:
    try:
        shape = model_shape(read_config(args.config))
    except ShapeError as error:
        raise CliError(str(error)) from None
    out.write(f"model: {shape_yaml(shape)}\n")


def _current_namespace() -> str:
    from kubernetes import config

    try:
        _, context = config.list_kube_config_contexts()
    except (config.ConfigException, OSError) as error:
        raise CliError(f"no kubeconfig to read the sweep from: {error}") from None
    return context.get("context", {}).get("namespace") or "default"


def read_sweep(namespace: str, name: str) -> tuple[dict[str, Any], list[ObservedTrial]]:
    """A sweep and its trials from the cluster, observed as the operator observes them: the
    Jobs and their pods' termination messages, and MLflow for a result no pod holds."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    try:
        config.load_kube_config()
    except (config.ConfigException, OSError) as error:
        raise CliError(f"no kubeconfig to read the sweep from: {error}") from None
    api = client.ApiClient()
    try:
        sweep = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        selector = f"{LABEL_SWEEP}={label_value(name)}"
        jobs = client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=selector)
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector)
    except ApiException as error:
        if error.status == 404:
            raise CliError(f"there is no {KIND} {name} in namespace {namespace}") from None
        raise CliError(f"cannot read {KIND} {name}: {error.reason}") from None
    job_summaries = [job_summary(api.sanitize_for_serialization(j)) for j in jobs.items]
    pod_summaries = [pod_summary(api.sanitize_for_serialization(p)) for p in pods.items]
    try:
        spec = parse_spec(sweep.get("spec") or {})
    except SweepInvalid as error:
        raise CliError(f"{KIND} {name} is invalid: {error}") from None
    observe = trials_observer(
        [s for s in job_summaries if s], [s for s in pod_summaries if s], spec.objective.metric
    )

    trials = observe({})
    experiment = ((sweep.get("status") or {}).get("mlflow") or {}).get("experimentId")
    uri = (spec.mlflow.tracking_uri if spec.mlflow else None) or os.environ.get(
        "MLFLOW_TRACKING_URI"
    )
    unscored = any(
        t.state == TrialState.SUCCEEDED and objective_values(spec, t) is None for t in trials
    )
    if unscored and experiment and uri:
        from sweep_operator.tracking import SweepRuns

        try:
            trials = observe(SweepRuns(uri).trial_results(experiment, name))
        except Exception as error:
            print(f"lorasweep: results only from the pods; MLflow: {error}", file=sys.stderr)
    return sweep, trials


def cmd_refine(args: argparse.Namespace, out: TextIO) -> None:
    namespace = args.namespace or _current_namespace()
    sweep, trials = read_sweep(namespace, args.sweep)
    spec = parse_spec(sweep["spec"])
    try:
        manifest, notes = refined_sweep(
            sweep,
            spec,
            trials,
            name=args.name,
            top=args.top,
            margin=args.margin,
            max_trials=args.max_trials,
        )
    except RefineError as error:
        raise CliError(str(error)) from None
    out.write("".join(f"# {line}\n" for line in notes))
    out.write(yaml.safe_dump(manifest, sort_keys=False, width=100))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _margin(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


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
    refine = commands.add_parser(
        "refine", help="print a narrower sweep around the best trials of a sweep, warm-started"
    )
    refine.add_argument("sweep", help="the HyperparameterSweep to refine")
    refine.add_argument("-n", "--namespace", help="its namespace (default: the context's)")
    refine.add_argument(
        "--top", type=_positive_int, default=REFINE_TOP, help="best trials to narrow around"
    )
    refine.add_argument(
        "--margin",
        type=_margin,
        default=REFINE_MARGIN,
        help="widen each range by this share of the top trials' spread on each side",
    )
    refine.add_argument("--name", help="the new sweep's name (default: SWEEP-refined)")
    refine.add_argument(
        "--max-trials", type=_positive_int, help="its maxTrials (default: those of SWEEP)"
    )
    refine.set_defaults(run=cmd_refine)
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
