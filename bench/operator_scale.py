"""How fast the operator fans a large sweep out into Jobs, against a plain client doing the same.

On the dev cluster (started if needed) with 20 extra simulated nodes of 100 GPUs each:

1. baseline: a plain client creates the 1,000 trial Jobs the sweep would render, 16 requests
   in flight (the operator's own concurrency), into a namespace of its own;
2. operator: `kopf run` of the operator watching another namespace; a 1,000-trial grid sweep
   with parallelism 1,000 is applied, and the clock stops when the 1,000th Job exists.

Also counted: the operator's API requests per trial (from the apiserver's audit log, which
records only the operator's identity) until every trial pod runs, and the operator's peak
resident memory. Prints one JSON line.

    .venv/bin/python bench/operator_scale.py [--trials 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep_operator.api import GROUP, PLURAL, VERSION, SweepSpec  # noqa: E402
from sweep_operator.naming import trial_name  # noqa: E402
from sweep_operator.render import SweepRef, render_trial_job  # noqa: E402
from sweep_operator.space import trial_parameters  # noqa: E402
from sweep_operator.trials import NewTrial  # noqa: E402
from tests.cluster import devcluster  # noqa: E402
from tests.cluster.operator_process import OperatorProcess, release_sweeps  # noqa: E402
from tests.support import wait_for  # noqa: E402

# Room for both phases at once: the baseline's pods are still going when the operator starts.
BENCH_NODES = {f"bench-gpu-{i}": 100 for i in range(20)}
CONCURRENCY = 16


def sweep_spec(trials: int) -> dict:
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        "parameters": {"lora_rank": {"values": list(range(1, trials + 1))}},
        "maxTrials": trials,
        "parallelism": trials,
        "trainer": {
            "image": "lorasweep-bench",
            "command": ["train"],
            "nodeSelector": {"lorasweep.io/node-mode": "sim"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            # Trials outlive the benchmark: it measures fan-out, not completion.
            "podAnnotations": {"lorasweep.io/sim-duration": "30m"},
        },
    }


def create_namespace(core: client.CoreV1Api, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: devcluster.has_default_service_account(core, name), 30, "ServiceAccount")
    return name


def job_count(batch: client.BatchV1Api, namespace: str) -> int:
    # One item and the count of the rest: polling must not load the apiserver it measures
    # (the baseline's clock needs no polling at all). The apiserver counts the rest only for
    # a list without selectors; the namespace holds nothing but the sweep's Jobs.
    page = batch.list_namespaced_job(namespace, limit=1)
    return len(page.items) + (page.metadata.remaining_item_count or 0)


def running_pods(core: client.CoreV1Api, namespace: str) -> int:
    pods = core.list_namespaced_pod(namespace, field_selector="status.phase=Running")
    return len(pods.items)


def baseline(batch: client.BatchV1Api, namespace: str, spec: dict, trials: int) -> float:
    parsed = SweepSpec.model_validate(spec)
    sweep = SweepRef(name="baseline", namespace=namespace, uid=str(uuid.uuid4()))
    jobs = []
    for index in range(trials):
        trial = NewTrial(
            index=index,
            name=trial_name("baseline", index),
            parameters=trial_parameters(parsed, index),
        )
        job = render_trial_job(sweep, parsed, trial)
        # No owner: the garbage collector would delete Jobs of a sweep that does not exist.
        del job["metadata"]["ownerReferences"]
        jobs.append(job)
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda job: batch.create_namespaced_job(namespace, job), jobs))
    return time.monotonic() - started


def operator_requests(offset: int) -> int:
    with devcluster.AUDIT_LOG.open() as log:
        log.seek(offset)
        return sum(1 for line in log if '"lorasweep-operator"' in line)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    args = parser.parse_args()
    trials = args.trials

    devcluster.up()
    api = config.new_client_from_config(str(devcluster.KUBECONFIG))
    api.configuration.connection_pool_maxsize = CONCURRENCY
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom = client.CustomObjectsApi(api)
    existing = {n.metadata.name for n in core.list_node().items}
    devcluster.create_nodes({n: g for n, g in BENCH_NODES.items() if n not in existing}, "sim")
    devcluster.apply_crds(devcluster.Cluster.load())

    spec = sweep_spec(trials)
    base_ns = create_namespace(core, "bench-baseline")
    op_ns = create_namespace(core, "bench-operator")
    log_path = devcluster.STATE_DIR / "logs" / "bench-operator.log"
    operator = OperatorProcess(op_ns, log_path)
    try:
        baseline_seconds = baseline(batch, base_ns, spec, trials)
        wait_for(lambda: running_pods(core, base_ns) == trials, 300, "baseline pods running")
        core.delete_namespace(base_ns)

        operator.start()
        audit_offset = devcluster.AUDIT_LOG.stat().st_size
        started = time.monotonic()
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            op_ns,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "HyperparameterSweep",
                "metadata": {"name": "scale"},
                "spec": spec,
            },
        )
        wait_for(lambda: job_count(batch, op_ns) == trials, 600, f"{trials} Jobs", interval=0.1)
        operator_seconds = time.monotonic() - started
        wait_for(lambda: running_pods(core, op_ns) == trials, 300, "operator pods running")
        # Let the status settle: the count covers the reconciles that follow the fan-out too.
        time.sleep(5)
        requests = operator_requests(audit_offset)
        memory = peak_rss_mib(operator.pid)
        status = custom.get_namespaced_custom_object(GROUP, VERSION, op_ns, PLURAL, "scale")
    finally:
        operator.stop()
        release_sweeps(api, op_ns)
        for ns in (base_ns, op_ns):
            with contextlib.suppress(client.exceptions.ApiException):
                core.delete_namespace(ns)
        # The extra nodes would change what other users of the dev cluster (tests) expect.
        for node in BENCH_NODES:
            with contextlib.suppress(client.exceptions.ApiException):
                core.delete_node(node)
    print(
        json.dumps(
            {
                "bench": "operator_scale",
                "trials": trials,
                "baseline_seconds": round(baseline_seconds, 2),
                "operator_seconds": round(operator_seconds, 2),
                "ratio_operator_to_baseline": round(operator_seconds / baseline_seconds, 2),
                "operator_requests_per_trial": round(requests / trials, 2),
                "operator_peak_rss_mib": round(memory, 1),
                "status_running": status.get("status", {}).get("trials", {}).get("running"),
            }
        )
    )


if __name__ == "__main__":
    main()
