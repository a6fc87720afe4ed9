"""The operator end to end: real apiserver, Job controller, scheduler, pod runner and MLflow."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import devcluster
from sweep_operator.api import GROUP, PLURAL, VERSION
from sweep_operator.render import builtin_template
from sweep_operator.trials import LABEL_SWEEP
from tests.e2e.sweeps import (
    get_sweep,
    replanned_with_room,
    sim_spec,
    sweep_events,
    sweep_manifest,
    trial_jobs,
    wait_for_phase,
)
from tests.e2e.test_rbac import OPERATOR_USER, audit_files, events
from tests.support import free_port, wait_for

TRIAL_PROGRAM = Path(__file__).with_name("trial_program.py")
RESULT = '{"metrics": {"eval_loss": 0.5}}'  # what simulated trials report


def local_grid_spec(mlflow_uri: str, trace: Path, experiment: str) -> dict:
    """6 trials of the known-optimum program on local-gpu-0, 2 at a time."""
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        "parameters": {
            "lora_rank": {"values": [4, 8, 16]},
            "learning_rate": {"values": [1.0e-4, 2.0e-4]},
        },
        "parallelism": 2,
        "trainer": {
            "image": "lorasweep-e2e",
            "command": [sys.executable, str(TRIAL_PROGRAM)],
            "args": [
                "--rank={{ params.lora_rank }}",
                "--lr={{ params.learning_rate }}",
                f"--trace={trace}",
            ],
            "env": devcluster.image_env_vars(),
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
        },
        "mlflow": {"trackingUri": mlflow_uri, "experimentName": experiment},
    }


def max_overlap(trace: Path) -> int:
    events = []
    for line in trace.read_text().splitlines():
        kind, _, stamp = line.split()
        events.append((float(stamp), 1 if kind == "start" else -1))
    running = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    return peak


def test_grid_sweep_finds_the_true_optimum(
    operator, custom, batch, namespace, mlflow_uri, tmp_path
):
    experiment = f"e2e-grid-{uuid.uuid4().hex[:8]}"
    trace = tmp_path / "trace"
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        sweep_manifest("rank-lr", local_grid_spec(mlflow_uri, trace, experiment)),
    )

    sweep = wait_for_phase(custom, namespace, "rank-lr", ("Succeeded", "Failed"), 240)
    status = sweep["status"]
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["succeeded"] == 6 and status["trials"]["failed"] == 0
    best = status["bestTrial"]
    assert best["parameters"] == {"lora_rank": 8, "learning_rate": 2.0e-4}
    assert best["value"] == pytest.approx(0.1)
    assert 1 <= max_overlap(trace) <= 2
    assert len(trial_jobs(batch, namespace, "rank-lr")) == 6

    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    assert status["mlflow"]["experimentId"] == experiment_id
    parent_id = status["mlflow"]["parentRunId"]
    children = mlflow.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert len(children) == 6
    assert best["mlflowRunId"] in {r.info.run_id for r in children}

    def parent_closed():
        parent = mlflow.get_run(parent_id)
        return parent if parent.info.status == "FINISHED" else None

    parent = wait_for(parent_closed, 30, "the parent run to end")
    assert parent.data.params["best.lora_rank"] == "8"
    assert parent.data.metrics["best_value"] == pytest.approx(0.1)


def test_failure_budget_fails_the_sweep(operator, custom, batch, namespace):
    spec = sim_spec(
        6,
        2,
        {"lorasweep.io/sim-duration": "300ms", "lorasweep.io/sim-exit-code": "1"},
        maxFailedTrials=1,
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("doomed", spec)
    )
    status = wait_for_phase(custom, namespace, "doomed", ("Failed",), 60)["status"]
    assert status["trials"]["failed"] >= 2
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "TooManyFailedTrials"
    assert "maxFailedTrials=1" in status["message"]
    # Past the budget nothing new starts. (A third trial may have started between the first
    # and the second failure, while the budget still held.)
    created = len(trial_jobs(batch, namespace, "doomed"))
    assert created <= 3
    assert replanned_with_room(custom, namespace, "doomed", 6)["status"]["phase"] == "Failed"
    assert len(trial_jobs(batch, namespace, "doomed")) == created


def test_operator_restart_loses_and_duplicates_nothing(operator, custom, batch, namespace):
    spec = sim_spec(
        8, 2, {"lorasweep.io/sim-duration": "1500ms", "lorasweep.io/sim-result": RESULT}
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("restart", spec)
    )
    wait_for(lambda: len(trial_jobs(batch, namespace, "restart")) >= 3, 60, "3 trials")
    operator.kill()
    before = {j.metadata.name: j.metadata.uid for j in trial_jobs(batch, namespace, "restart")}
    operator.start()

    status = wait_for_phase(custom, namespace, "restart", ("Succeeded", "Failed"), 120)["status"]
    assert status["phase"] == "Succeeded"
    assert status["trials"]["succeeded"] == 8 and status["trials"]["total"] == 8
    jobs = trial_jobs(batch, namespace, "restart")
    assert sorted(j.metadata.name for j in jobs) == [f"restart-{i:04d}" for i in range(8)]
    after = {j.metadata.name: j.metadata.uid for j in jobs}
    assert all(after[name] == uid for name, uid in before.items())


def test_mlflow_down_delays_nothing_and_loses_no_result(operator, custom, namespace):
    """Results come from the trials' termination messages when MLflow cannot be reached."""
    spec = sim_spec(
        3,
        3,
        {"lorasweep.io/sim-duration": "500ms", "lorasweep.io/sim-result": RESULT},
        mlflow={"trackingUri": f"http://127.0.0.1:{free_port()}", "experimentName": "gone"},
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("offline", spec)
    )
    status = wait_for_phase(custom, namespace, "offline", ("Succeeded", "Failed"), 90)["status"]
    assert status["phase"] == "Succeeded"
    assert status["trials"]["succeeded"] == 3
    assert status["bestTrial"]["value"] == 0.5
    assert "mlflow" not in status


def test_parallelism_change_takes_effect(operator, custom, batch, namespace):
    spec = sim_spec(6, 1, {"lorasweep.io/sim-duration": "2s"})
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("widen", spec)
    )
    wait_for(lambda: len(trial_jobs(batch, namespace, "widen")) >= 1, 30, "the first trial")
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "widen", {"spec": {"parallelism": 3}}
    )

    def active():
        jobs = trial_jobs(batch, namespace, "widen")
        return len([j for j in jobs if not j.status.succeeded]) == 3

    wait_for(active, 30, "3 trials running at once")


def test_deleting_the_sweep_removes_its_jobs_and_pods(
    operator, custom, batch, namespace, kube_client
):
    spec = sim_spec(4, 4, {"lorasweep.io/sim-duration": "60s"})
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("doomed", spec)
    )
    core = client.CoreV1Api(kube_client)
    selector = f"{LABEL_SWEEP}=doomed"
    wait_for(
        lambda: len(core.list_namespaced_pod(namespace, label_selector=selector).items) == 4,
        60,
        "4 trial pods",
    )
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "doomed")
    wait_for(lambda: not trial_jobs(batch, namespace, "doomed"), 60, "the Jobs to go")
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items,
        60,
        "the pods to go",
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"parallelism": 0}, "parallelism"),
        ({"parameters": {"lora_dropout": {"type": "uniform", "min": 0.3, "max": 0.1}}}, "min"),
        ({"objective": {"metric": "eval_loss", "goal": "lowest"}}, "goal"),
    ],
)
def test_schema_errors_are_refused_at_apply(sweep_crd, custom, namespace, change, expected):
    spec = {**sim_spec(2, 1, {}), **change}
    if "parameters" in change:
        spec["algorithm"] = {"name": "random", "seed": 1}
        spec["maxTrials"] = 2
    assert_refused(custom, namespace, spec, expected)


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({"gpus": 0}, "spec.trainer.gpus"),
        ({"nodes": 0}, "spec.trainer.nodes"),
        ({"checkpoints": {"claimName": "Not_A_PVC", "intervalSteps": 10}}, "claimName"),
    ],
)
def test_trial_shape_errors_are_refused_at_apply(sweep_crd, custom, namespace, trainer, expected):
    spec = sim_spec(2, 1, {})
    spec["trainer"] |= trainer
    assert_refused(custom, namespace, spec, expected)


def assert_refused(custom, namespace: str, spec: dict, expected: str) -> None:
    """The apiserver refuses the sweep (422) with a message naming `expected`."""
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, sweep_manifest("bad", spec)
        )
    assert refused.value.status == 422
    assert expected in refused.value.body


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"lora_rnak": {"values": [8, 16]}}, ["spec.parameters.lora_rnak", "lora_rank"]),
        ({"quantization_bit": {"values": [3]}}, ["quantization_bit", "4 or 8"]),
    ],
)
def test_a_bad_trainer_parameter_fails_the_sweep_without_jobs(
    operator, custom, batch, namespace, parameters, expected
):
    spec = sim_spec(2, 1, {})
    del spec["trainer"]["command"]  # the bundled trainer: parameter names are checked
    spec["parameters"] = parameters
    spec["trainer"]["model"] = "/models/tiny"
    spec["trainer"]["data"] = {"train": "/data/train.jsonl"}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("typo", spec)
    )
    status = wait_for_phase(custom, namespace, "typo", ("Failed",), 30)["status"]
    assert all(fragment in status["message"] for fragment in expected), status["message"]
    assert not trial_jobs(batch, namespace, "typo")


def test_more_sweeps_than_operator_workers_all_finish(operator, custom, batch, namespace):
    """kopf runs sync handlers in 64 threads: 40 finished sweeps and 30 running ones (70, more
    than there are threads) must all finish, the running ones without starving."""
    quick = {"lorasweep.io/sim-duration": "200ms", "lorasweep.io/sim-result": RESULT}

    def apply(names: list[str], trials: int) -> None:
        for name in names:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, sweep_manifest(name, sim_spec(trials, 1, quick))
            )

    def all_succeeded(names: list[str]) -> bool:
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        phases = {s["metadata"]["name"]: s.get("status", {}).get("phase") for s in listed}
        return all(phases.get(name) == "Succeeded" for name in names)

    finished = [f"done-{i}" for i in range(40)]
    apply(finished, 1)
    wait_for(lambda: all_succeeded(finished), 180, "40 one-trial sweeps to succeed")
    running = [f"busy-{i}" for i in range(30)]
    apply(running, 3)
    wait_for(lambda: all_succeeded(running), 180, "30 three-trial sweeps to succeed")
    assert len(batch.list_namespaced_job(namespace).items) == 40 + 30 * 3


@pytest.fixture
def audit_offset() -> int:
    """Where the audit log ends before the test's operator starts (ask for it first)."""
    return devcluster.AUDIT_LOG.stat().st_size


def test_only_trial_jobs_and_pods_reach_the_operator(audit_offset, operator, namespace):
    """On a shared cluster most Jobs and pods are not trials: the operator lists and watches
    them by the sweep label, so the apiserver never sends it the others and their changes."""

    def audited() -> Iterator[dict]:
        log = devcluster.AUDIT_LOG
        if log.stat().st_size < audit_offset:  # rotated since: read the rotated files too
            yield from events(audit_files())
            return
        with log.open() as lines:
            lines.seek(audit_offset)
            yield from (json.loads(line) for line in lines)

    def requests() -> dict[str, list[dict[str, list[str]]]]:
        queries: dict[str, list[dict[str, list[str]]]] = {"jobs": [], "pods": []}
        for event in audited():
            ref = event.get("objectRef") or {}
            if (
                event["user"]["username"] == OPERATOR_USER
                and event["verb"] in ("list", "watch")
                and ref.get("namespace") == namespace
                and ref.get("resource") in queries
            ):
                queries[ref["resource"]].append(parse_qs(urlsplit(event["requestURI"]).query))
        return queries

    wait_for(lambda: all(requests().values()), 30, "the operator to list and watch trials")
    for resource, queries in requests().items():
        assert all(query.get("labelSelector") == [LABEL_SWEEP] for query in queries), (
            resource,
            queries,
        )


def test_a_sweep_made_again_runs_its_own_trials_not_the_earlier_sweeps_jobs(
    operator, custom, batch, namespace, kube_client
):
    """Deleted and applied again under its name, a sweep starts afresh. Here the earlier
    sweep was deleted with its Jobs orphaned, so they stay: the new sweep says so and waits,
    rather than taking their results as its own, and runs once they are deleted."""
    quick = {"lorasweep.io/sim-duration": "1s", "lorasweep.io/sim-result": RESULT}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("again", sim_spec(2, 2, quick))
    )
    wait_for_phase(custom, namespace, "again", ("Succeeded",), 60)
    orphan = client.V1DeleteOptions(propagation_policy="Orphan")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "again", body=orphan)

    def gone() -> bool:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "again")
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(gone, 30, "the earlier sweep to be deleted")
    wait_for(
        lambda: all(not j.metadata.owner_references for j in trial_jobs(batch, namespace, "again")),
        30,
        "its Jobs to be orphaned",
    )
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("again", sim_spec(2, 2, quick))
    )
    taken = wait_for(
        lambda: sweep_events(kube_client, namespace, "again", "TrialNameTaken"),
        30,
        "a TrialNameTaken Event",
    )
    assert taken[0].type == "Warning"
    assert get_sweep(custom, namespace, "again")["status"]["phase"] in ("Pending", "Running")

    for job in trial_jobs(batch, namespace, "again"):
        batch.delete_namespaced_job(job.metadata.name, namespace, propagation_policy="Background")
    wait_for_phase(custom, namespace, "again", ("Succeeded",), 90)
    jobs = trial_jobs(batch, namespace, "again")
    owners = {ref.uid for job in jobs for ref in job.metadata.owner_references}
    assert owners == {created["metadata"]["uid"]}


def test_a_trial_job_the_apiserver_refuses_holds_back_nothing_else(
    operator, custom, batch, namespace, kube_client
):
    """A quota or an admission policy may refuse one trial's Job: the sweep says why, goes
    on with the rest (its other trials finish and are counted), and creates that one once
    the apiserver lets it."""
    admission = client.AdmissionregistrationV1Api(kube_client)
    name = f"refuse-trial-1-{namespace}"[:63]
    admission.create_validating_admission_policy(
        {
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["batch"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["jobs"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": "object.metadata.name != 'held-0001'",
                        "message": "no room for held-0001",
                    }
                ],
            },
        }
    )
    admission.create_validating_admission_policy_binding(
        {
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        }
    )
    try:
        probe = {
            "metadata": {"name": "held-0001"},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "lorasweep-e2e"}],
                    }
                }
            },
        }

        def refused() -> bool:
            try:
                batch.create_namespaced_job(namespace, probe, dry_run="All")
            except ApiException as error:
                return error.status in (403, 422)
            return False

        wait_for(refused, 30, "the admission policy to be in force")
        quick = {"lorasweep.io/sim-duration": "1s", "lorasweep.io/sim-result": RESULT}
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, sweep_manifest("held", sim_spec(3, 3, quick))
        )
        [event] = wait_for(
            lambda: sweep_events(kube_client, namespace, "held", "TrialCreateFailed"),
            30,
            "a TrialCreateFailed Event",
        )
        assert event.type == "Warning"
        assert event.message.startswith("held-0001: its Job was refused: ")
        assert "no room for held-0001" in event.message
        wait_for(
            lambda: get_sweep(custom, namespace, "held")["status"]["trials"]["succeeded"] == 2,
            60,
            "the other two trials to succeed and be counted",
        )
    finally:
        admission.delete_validating_admission_policy_binding(name)
        admission.delete_validating_admission_policy(name)
    wait_for_phase(custom, namespace, "held", ("Succeeded",), 60)
    assert len(trial_jobs(batch, namespace, "held")) == 3


def test_a_trial_job_the_template_does_not_render_fails_the_sweep_once(
    operator, custom, batch, namespace, kube_client
):
    """The check at apply renders the first trial's Job; a template that fails only for
    another trial's parameters is found as that trial is created. The sweep fails, says so
    once, and stays failed (the other trials' events keep waking it)."""
    quick = {"lorasweep.io/sim-duration": "1s", "lorasweep.io/sim-result": RESULT}
    spec = sim_spec(3, 3, quick)
    failing = "{%- if params.lora_rank == 2 %}{{ params.no_such_parameter }}{% endif %}\n"
    spec["trainer"]["jobTemplate"] = failing + builtin_template()
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("unrendered", spec)
    )
    status = wait_for_phase(custom, namespace, "unrendered", ("Failed",), 60)["status"]
    assert "no_such_parameter" in status["message"]
    [condition] = [c for c in status["conditions"] if c["type"] == "Failed"]
    wait_for(
        lambda: all(
            job.status.succeeded == 1 for job in trial_jobs(batch, namespace, "unrendered")
        ),
        60,
        "the trials that rendered to succeed",
    )
    status = get_sweep(custom, namespace, "unrendered")["status"]
    assert status["phase"] == "Failed"
    # Unchanged since it failed: it did not go back to Running in between.
    assert [c for c in status["conditions"] if c["type"] == "Failed"] == [condition]
    assert len(sweep_events(kube_client, namespace, "unrendered", "InvalidTemplate")) == 1
    names = {job.metadata.name for job in trial_jobs(batch, namespace, "unrendered")}
    assert "unrendered-0000" in names and "unrendered-0001" not in names
