"""spec.constraints on the real cluster: a configuration over maxGpuMemoryGiB never starts, a
trial out of GPU memory (exit code 4) is infeasible and the sweep goes on."""

from __future__ import annotations

import sys
import uuid

import pytest
from kubernetes.client.exceptions import ApiException

import devcluster
from sweep_operator.api import GROUP, PLURAL, VERSION
from tests.e2e.sweeps import sweep_events, sweep_manifest, trial_jobs, wait_for_phase
from tests.e2e.test_operator import TRIAL_PROGRAM

# Llama 3.1 8B with QLoRA at cutoff_len 1024, batch 2: the estimate is 12.6 GiB at rank 4,
# 12.9 at rank 16 and 14.8 at rank 64.
MODEL = {
    "hiddenSize": 4096,
    "numHiddenLayers": 32,
    "intermediateSize": 14336,
    "numAttentionHeads": 32,
    "numKeyValueHeads": 8,
    "vocabSize": 128256,
    "dtype": "bfloat16",
}
CONFIG = {
    "quantization_bit": 4,
    "gradient_checkpointing": True,
    "cutoff_len": 1024,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 1,
}


def memory_spec(mlflow_uri: str, trace: str, constraints: dict) -> dict:
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        "parameters": {"lora_rank": {"values": [4, 8, 16, 64]}},
        "parallelism": 2,
        "maxFailedTrials": 0,
        "constraints": constraints,
        "trainer": {
            "image": "lorasweep-e2e",
            "command": [sys.executable, str(TRIAL_PROGRAM)],
            "args": [
                "--rank={{ params.lora_rank }}",
                "--lr=2e-4",
                f"--trace={trace}",
                "--out-of-memory-from-rank=16",
            ],
            "config": CONFIG,
            "env": devcluster.image_env_vars(),
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
        },
        "mlflow": {"trackingUri": mlflow_uri, "experimentName": f"e2e-mem-{uuid.uuid4().hex[:8]}"},
    }


def test_over_the_limit_never_starts_and_out_of_memory_is_infeasible(
    operator, custom, batch, kube_client, namespace, mlflow_uri, tmp_path
):
    # Without the model's shape there is no estimate: refused at apply, saying what to add.
    shapeless = memory_spec(mlflow_uri, str(tmp_path / "t0"), {"maxGpuMemoryGiB": 14})
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, sweep_manifest("shapeless", shapeless)
        )
    assert refused.value.status == 422
    assert "maxGpuMemoryGiB needs model" in refused.value.body

    spec = memory_spec(mlflow_uri, str(tmp_path / "trace"), {"maxGpuMemoryGiB": 14, "model": MODEL})
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("mem", spec)
    )
    status = wait_for_phase(custom, namespace, "mem", ("Succeeded", "Failed"), 180)["status"]
    # Rank 16 ran out of memory, rank 64 was never started: neither is a failure.
    assert status["phase"] == "Succeeded", status
    counts = status["trials"]
    assert (counts["succeeded"], counts["failed"], counts["infeasible"]) == (2, 0, 2), counts
    assert (counts["total"], counts["target"]) == (3, 3)
    assert status["message"].startswith("2/3 trials succeeded, 2 infeasible")
    assert status["bestTrial"]["parameters"] == {"lora_rank": 8}
    jobs = {job.metadata.name for job in trial_jobs(batch, namespace, "mem")}
    assert jobs == {"mem-0000", "mem-0001", "mem-0002"}  # no Job for rank 64 (index 3)

    infeasible = sweep_events(kube_client, namespace, "mem", "TrialInfeasible")
    assert [e.type for e in infeasible] == ["Warning"]
    assert infeasible[0].message.startswith("mem-0002: ran out of GPU memory: ")
