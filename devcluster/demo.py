"""`make demo`: a real LoRA sweep on the dev cluster, followed until it ends.

The Makefile starts the cluster and the operator first; this builds the tiny model and toy
data into .demo/ (nothing is downloaded), applies examples/demo-sweep.yaml with its paths made
absolute, prints the sweep's progress, then the best trial and where to look in MLflow.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import devcluster
from devcluster import REPO

DEMO_SWEEP = REPO / "examples" / "demo-sweep.yaml"
ASSETS = REPO / ".demo"
TRAIN_EXAMPLES = 400
EVAL_EXAMPLES = 40
FINAL_PHASES = ("Succeeded", "Failed", "Stopped")


def build_assets(folder: Path) -> dict[str, Path]:
    """The tiny random model and the toy dataset under `folder`; kept when already there."""
    from lora_trainer import tiny

    paths = {
        "model": folder / "model",
        "train": folder / "train.jsonl",
        "eval": folder / "eval.jsonl",
    }
    # The tokenizer is saved after the weights: with it present, the model is complete.
    if not (paths["model"] / "tokenizer.json").exists():
        tiny.build_model(paths["model"])
    if not paths["train"].exists():
        tiny.write_jsonl(paths["train"], tiny.toy_dataset(TRAIN_EXAMPLES, seed=0))
    if not paths["eval"].exists():
        tiny.write_jsonl(paths["eval"], tiny.toy_dataset(EVAL_EXAMPLES, seed=1))
    return paths


def demo_manifest(assets: Path, source: Path = DEMO_SWEEP) -> dict[str, Any]:
    """The demo sweep with its `.demo/...` paths pointed at `assets`, as absolute paths, and
    the environment the trainer image would give its trials.

    Trial processes run in a folder of their own (like a container's working directory), so
    the paths that the sweep hands the trainer must not be relative. They get only their pod's
    environment, and the pod runner ignores images, so the sweep states what the image sets.
    """
    manifest = yaml.safe_load(source.read_text())
    trainer = manifest["spec"]["trainer"]

    def local(path: str) -> str:
        return str(assets.resolve() / Path(path).relative_to(ASSETS.name))

    trainer["model"] = local(trainer["model"])
    trainer["data"] = {key: local(path) for key, path in trainer["data"].items()}
    trainer["env"] = [*trainer.get("env", []), *devcluster.image_env_vars()]
    return manifest


def apply_sweep(custom: Any, core: Any, manifest: dict[str, Any]) -> None:
    """Create the sweep (and its namespace), replacing one left by an earlier demo."""
    from kubernetes.client.exceptions import ApiException

    from sweep_operator.api import GROUP, PLURAL, VERSION

    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        core.create_namespace({"metadata": {"name": namespace}})
    except ApiException as error:
        if error.status != 409:
            raise
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        print(f"replacing the sweep {namespace}/{name} of an earlier demo", flush=True)
        while get_sweep(custom, namespace, name) is not None:
            time.sleep(0.5)
    except ApiException as error:
        if error.status != 404:
            raise
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)


def get_sweep(custom: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    from sweep_operator.api import GROUP, PLURAL, VERSION

    try:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def progress_row(status: dict[str, Any]) -> list[str]:
    """The sweep's printer columns (phase, best value, succeeded/total) and trial counts."""
    trials = status.get("trials", {})
    best = status.get("bestTrial")
    return [
        status.get("phase", "-"),
        f"{best['value']:.4f}" if best else "-",
        status.get("progress", "-"),
        *(str(trials.get(state, 0)) for state in ("running", "pending", "failed")),
    ]


ROW = "{:>5}  {:<10} {:<8} {:<10} {:<8} {:<8} {}"


def follow(custom: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """Print a progress row whenever it changes (and every 10 s, so a long trial still shows
    a sign of life); returns the sweep once it has ended."""
    print(ROW.format("TIME", "PHASE", "BEST", "SUCCEEDED", "RUNNING", "PENDING", "FAILED"))
    started = time.monotonic()
    last_row: list[str] = []
    last_print = 0.0
    while True:
        sweep = get_sweep(custom, namespace, name) or {}
        status = sweep.get("status", {})
        row = progress_row(status)
        now = time.monotonic()
        if row != last_row or now - last_print >= 10:
            elapsed = int(now - started)
            print(ROW.format(f"{elapsed // 60}:{elapsed % 60:02d}", *row), flush=True)
            last_row, last_print = row, now
        if status.get("phase") in FINAL_PHASES:
            return sweep
        if now - started > timeout:
            raise SystemExit(
                f"the sweep did not end within {timeout:.0f}s; see `kubectl describe hps {name} "
                f"-n {namespace}` and .cluster/operator.log"
            )
        time.sleep(1)


def trial_table(mlflow_uri: str, experiment_id: str, parent_run_id: str, metric: str) -> list[str]:
    """One line per child run of the sweep's parent run, best first."""
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri=mlflow_uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=[f"metrics.`{metric}` ASC"],
    )
    lines = []
    for run in runs:
        params = run.data.params
        value = run.data.metrics.get(metric, float("nan"))
        lines.append(
            f"  {run.data.tags.get('lorasweep.trial', run.info.run_name)}  "
            f"lora_rank={params.get('lora_rank')}  learning_rate={params.get('learning_rate')}  "
            f"{metric}={value:.4f}"
        )
    return lines


def report(sweep: dict[str, Any], mlflow_uri: str) -> int:
    status = sweep["status"]
    name = sweep["metadata"]["name"]
    metric = sweep["spec"]["objective"]["metric"]
    trials = status.get("trials", {})
    counts = f"{trials.get('succeeded', 0)} trials succeeded, {trials.get('failed', 0)} failed"
    print(f"\nsweep {name}: {status['phase']}: {status.get('message') or counts}")
    best = status.get("bestTrial")
    if best:
        params = ", ".join(f"{k}={v}" for k, v in sorted(best["parameters"].items()))
        print(f"best trial {best['name']}: {metric} = {best['value']:.4f} with {params}")
    tracking = status.get("mlflow") or {}
    if tracking.get("experimentId") and tracking.get("parentRunId"):
        print("\ntrials, best first (from MLflow):")
        lines = trial_table(mlflow_uri, tracking["experimentId"], tracking["parentRunId"], metric)
        print("\n".join(lines))
        print(f"\nMLflow UI: {tracking.get('url') or mlflow_uri}")
        print(f"  the parent run {name!r} holds the trials: expand it in the runs table,")
        print("  or select the runs and open Chart view to compare their eval_loss curves")
        if best and best.get("url"):
            print(f"  best run: {best['url']}")
    print("\nthe cluster, the operator and MLflow keep running; stop them with `make demo-down`")
    return 0 if status["phase"] == "Succeeded" else 1


def run(timeout: float) -> int:
    from kubernetes import client, config

    cluster = devcluster.Cluster.load()
    if cluster is None or not cluster.healthy():
        raise SystemExit("the dev cluster is not up: run `make demo` (or `make cluster-up`)")
    started = time.monotonic()
    print(f"building the tiny model and toy data in {ASSETS.relative_to(REPO)}/", flush=True)
    build_assets(ASSETS)
    manifest = demo_manifest(ASSETS)
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    api = config.new_client_from_config(str(devcluster.KUBECONFIG))
    custom = client.CustomObjectsApi(api)
    apply_sweep(custom, client.CoreV1Api(api), manifest)
    print(f"applied {DEMO_SWEEP.relative_to(REPO)} as {namespace}/{name}", flush=True)
    print(f"(also: source .cluster/env; kubectl get hps -n {namespace} -w)\n", flush=True)
    sweep = follow(custom, namespace, name, timeout)
    code = report(sweep, cluster.mlflow_url)
    print(f"(demo sweep took {time.monotonic() - started:.0f}s)")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds to wait for the sweep to end"
    )
    args = parser.parse_args()
    return run(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
