"""spec.trainer.modelCache on the real dev cluster: the model is downloaded from a (local) hub
once per sweep, by one Job, before any trial; the trials train from the claim. A model that
cannot be downloaded fails the sweep, with the reason, before any trial exists."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

import devcluster
from devcluster import demo
from sweep_operator.api import GROUP, PLURAL, VERSION
from tests.e2e.sweeps import sweep_events, sweep_manifest, wait_for_phase
from tests.local_hub import LocalHub

MODEL = "lorasweep/tiny-llama"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalHub, dict[str, Path]]]:
    assets = demo.build_assets(tmp_path_factory.mktemp("model-cache"))
    with LocalHub({MODEL: assets["model"]}) as local_hub:
        yield local_hub, assets


def cached_spec(assets: dict[str, Path], hub_url: str, mlflow_uri: str, model: str) -> dict:
    """Two trials of the bundled trainer on local-gpu-0, the model from the hub via the cache."""
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "parameters": {"learning_rate": {"values": [1.0e-3, 5.0e-3]}},
        "parallelism": 2,
        "trainer": {
            "image": "lorasweep-trainer:0.1.0",
            "model": model,
            "modelCache": {"claimName": "models"},
            "env": [*devcluster.image_env_vars(), {"name": "HF_ENDPOINT", "value": hub_url}],
            "data": {
                "train": str(assets["train"].resolve()),
                "eval": str(assets["eval"].resolve()),
            },
            "config": {"max_steps": 10, "eval_steps": 5, "cutoff_len": 64},
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "activeDeadlineSeconds": 600,
        },
        "mlflow": {
            "trackingUri": mlflow_uri,
            "experimentName": f"e2e-cache-{uuid.uuid4().hex[:8]}",
        },
    }


def run(kube_client, namespace: str, name: str, spec: dict) -> tuple[dict, float]:
    custom = client.CustomObjectsApi(kube_client)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest(name, spec)
    )
    started = time.monotonic()
    sweep = wait_for_phase(custom, namespace, name, ("Succeeded", "Failed"), 300)
    return sweep["status"], time.monotonic() - started


def test_a_sweep_downloads_its_model_once_and_every_trial_trains_from_the_cache(
    operator, kube_client, namespace, mlflow_uri, hub
):
    local_hub, assets = hub
    core, batch = client.CoreV1Api(kube_client), client.BatchV1Api(kube_client)
    volume = devcluster.create_volume_claim(core, namespace, "models")
    spec = cached_spec(assets, local_hub.url, mlflow_uri, MODEL)
    status, elapsed = run(kube_client, namespace, "cache", spec)

    assert status["phase"] == "Succeeded", status
    assert (status["trials"]["succeeded"], status["trials"]["total"]) == (2, 2)
    # One download Job, whose one pod fetched each file of the model once.
    [fetch] = batch.list_namespaced_job(namespace, label_selector="lorasweep.io/model-fetch").items
    assert (fetch.metadata.name, fetch.status.succeeded, fetch.status.failed) == (
        "cache-model",
        1,
        None,
    )
    fetch_pods = core.list_namespaced_pod(namespace, label_selector="lorasweep.io/model-fetch")
    assert len(fetch_pods.items) == 1
    files = [str(p.relative_to(assets["model"])) for p in assets["model"].rglob("*") if p.is_file()]
    assert local_hub.downloads == {(MODEL, f): 1 for f in files}
    # The model is complete on the claim, under the directory named after it.
    cached = volume / "lorasweep--tiny-llama"
    assert (cached / "model.safetensors").read_bytes() == (
        assets["model"] / "model.safetensors"
    ).read_bytes()
    assert not (volume / ".lorasweep--tiny-llama.partial").exists()
    # Each trial started after the download, and loaded the model from the claim, read-only.
    trials = batch.list_namespaced_job(namespace, label_selector="lorasweep.io/trial").items
    assert len(trials) == 2
    for trial in trials:
        assert trial.metadata.creation_timestamp >= fetch.status.completion_time
        pod = trial.spec.template.spec
        [trainer] = pod.containers
        assert "model_name_or_path=/models-cache/lorasweep--tiny-llama" in trainer.args
        [mount] = [m for m in trainer.volume_mounts if m.mount_path == "/models-cache"]
        assert mount.read_only
    [fetching] = sweep_events(kube_client, namespace, "cache", "FetchingModel")
    assert fetching.message == (
        f"cache-model: downloading model {MODEL} into PersistentVolumeClaim models"
    )
    assert sweep_events(kube_client, namespace, "cache", "ModelFetched")
    print(f"cached sweep: {elapsed:.1f}s from apply to Succeeded, {len(files)} files fetched once")


def test_a_model_that_cannot_be_downloaded_fails_the_sweep_before_any_trial(
    operator, kube_client, namespace, mlflow_uri, hub
):
    local_hub, assets = hub
    core, batch = client.CoreV1Api(kube_client), client.BatchV1Api(kube_client)
    devcluster.create_volume_claim(core, namespace, "models")
    spec = cached_spec(assets, local_hub.url, mlflow_uri, "lorasweep/no-such-model")
    status, elapsed = run(kube_client, namespace, "nomodel", spec)

    assert status["phase"] == "Failed", status
    [failed] = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "ModelFetchFailed"
    assert status["message"] == (
        "downloading model lorasweep/no-such-model into spec.trainer.modelCache (Job "
        "nomodel-model) failed: model 'lorasweep/no-such-model' not found on "
        f"{local_hub.url} (HTTP 401), or it is private or gated and HF_TOKEN gives no access "
        "to it"
    )
    assert batch.list_namespaced_job(namespace, label_selector="lorasweep.io/trial").items == []
    # Exit code 2 fails the Job at once: no retry of a hopeless download.
    [fetch] = batch.list_namespaced_job(namespace, label_selector="lorasweep.io/model-fetch").items
    assert fetch.status.failed == 1
    assert sweep_events(kube_client, namespace, "nomodel", "ModelFetchFailed")
    print(f"failed download: {elapsed:.1f}s from apply to Failed")
