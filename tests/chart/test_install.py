"""The chart on the real dev cluster: README's install, upgrade and uninstall, and a full sweep
run by the operator with nothing but the chart's ServiceAccount identity."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

import devcluster
from devcluster.operator_process import OperatorProcess, release_sweeps
from sweep_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from tests.chart.chart_support import REPO, helm, install_commands
from tests.support import wait_for

KUBE_ENV = {"KUBECONFIG": str(devcluster.KUBECONFIG)}
# The dev cluster's own: keep the operator's pods off local-gpu-0 (whose pods run as local
# processes) and let kwok keep them Running, as a kubelet would.
DEV_CLUSTER_VALUES = [
    "--set-json",
    'nodeSelector={"lorasweep.io/node-mode":"sim"}',
    "--set-json",
    'podAnnotations={"lorasweep.io/sim-duration":"1h"}',
]
PEERING_CRDS = ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]
# A trial program: its objective is 1/x, so the best of x in [1, 2] is x=2 with 0.5.
TRIAL_PROGRAM = (
    "import json, os; x = json.loads(os.environ['LORASWEEP_PARAMS'])['x']; "
    "open(os.environ['LORASWEEP_RESULT_PATH'], 'w').write("
    "json.dumps({'metrics': {'eval_loss': 1.0 / x}}))"
)


def readme_command(words: list[str], release: str, namespace: str) -> list[str]:
    """A README command for this test: its release and namespace replaced by unique ones (the
    cluster is shared), `helm` dropped (the test's helm runs it)."""
    assert words[0] == "helm" and words[2] == "lorasweep", words
    replaced = [namespace if w == "lorasweep-system" else w for w in words[3:]]
    replaced = [str(REPO / w) if w == "charts/lorasweep" else w for w in replaced]
    return [words[1], release, *replaced]


def can(api: client.ApiClient, user: str, verb: str, resource: str, namespace: str, **kw) -> bool:
    """SubjectAccessReview (asked as admin) for a ServiceAccount user."""
    review = client.AuthorizationV1Api(api).create_subject_access_review(
        {
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "resourceAttributes": {
                    "verb": verb,
                    "resource": resource,
                    "namespace": namespace,
                    **kw,
                },
            }
        }
    )
    return bool(review.status.allowed)


def test_readme_install_upgrade_uninstall(kube_client, sweep_crd, namespace: str):
    release = f"ls-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-lorasweep"
    sa_user = f"system:serviceaccount:{namespace}:{fullname}"
    install, upgrade, uninstall = (
        readme_command(c, release, namespace) for c in install_commands()
    )
    apps, core = client.AppsV1Api(kube_client), client.CoreV1Api(kube_client)
    rbac = client.RbacAuthorizationV1Api(kube_client)
    try:
        helm(*install, *DEV_CLUSTER_VALUES, env=KUBE_ENV)
        operator = apps.read_namespaced_deployment(fullname, namespace)
        [container] = operator.spec.template.spec.containers
        env = {e.name: e.value for e in container.env}
        mlflow = f"{fullname}-mlflow"
        assert env["LORASWEEP_MLFLOW_TRACKING_URI"] == f"http://{mlflow}.{namespace}.svc:5000"
        assert "LORASWEEP_DEFAULT_TOLERATIONS" in env
        assert "--standalone" in container.args and "--all-namespaces" in container.args
        apps.read_namespaced_deployment(mlflow, namespace)
        core.read_namespaced_service(mlflow, namespace)
        core.read_namespaced_persistent_volume_claim(mlflow, namespace)
        core.read_namespaced_service_account(fullname, namespace)
        # Cluster-wide: Jobs in any namespace, Secrets in none.
        assert can(kube_client, sa_user, "create", "jobs", "default", group="batch")
        assert not can(kube_client, sa_user, "get", "secrets", namespace)
        assert not can(kube_client, sa_user, "list", "secrets", "default")

        helm(*upgrade, env=KUBE_ENV)
        operator = apps.read_namespaced_deployment(fullname, namespace)
        [container] = operator.spec.template.spec.containers
        assert operator.spec.replicas == 2
        assert f"--peering={fullname}" in container.args and "--standalone" not in container.args
        # --reuse-values kept the install's values.
        assert {e.name for e in container.env} >= {"LORASWEEP_DEFAULT_TRAINER_IMAGE"}
        assert operator.spec.template.spec.node_selector == {"lorasweep.io/node-mode": "sim"}
        custom = client.CustomObjectsApi(kube_client)
        custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", fullname)
        assert can(kube_client, sa_user, "patch", "clusterkopfpeerings", "", group="kopf.dev")
    finally:
        helm(*uninstall, env=KUBE_ENV, check=False)

    with pytest.raises(ApiException) as gone:
        apps.read_namespaced_deployment(fullname, namespace)
    assert gone.value.status == 404
    with pytest.raises(ApiException) as gone:
        rbac.read_cluster_role(fullname)
    assert gone.value.status == 404
    # Helm keeps CRDs (and so the users' sweeps) and, by the chart's resource policy, the
    # MLflow PVC with the runs.
    ext = client.ApiextensionsV1Api(kube_client)
    for crd in [f"{PLURAL}.{GROUP}", *PEERING_CRDS]:
        ext.read_custom_resource_definition(crd)
    core.read_namespaced_persistent_volume_claim(f"{fullname}-mlflow", namespace)


def service_account_kubeconfig(
    api: client.ApiClient, account: str, namespace: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token from the
    TokenRequest API (what the kubelet mounts into the operator's pod)."""
    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            account, namespace, {"spec": {"expirationSeconds": 3600}}
        )
        .status.token
    )
    admin = yaml.safe_load(devcluster.KUBECONFIG.read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "dev", "cluster": cluster}],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "dev", "user": account}}],
                "current-context": "sa",
            }
        )
    )
    return path


@pytest.fixture
def other_namespace(kube_client) -> Iterator[str]:
    core = client.CoreV1Api(kube_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"lorasweep.io/test": "true"}}})
    core.create_namespaced_secret(name, {"metadata": {"name": "token"}, "data": {}})
    yield name
    core.delete_namespace(name)


def sweep_manifest(name: str) -> dict[str, Any]:
    """No image, node selector or tracking URI: they come from the chart's trialDefaults."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "objective": {"metric": "eval_loss", "goal": "minimize"},
            "parameters": {"x": {"values": [1, 2]}},
            "parallelism": 2,
            "trainer": {"command": [sys.executable, "-c", TRIAL_PROGRAM]},
        },
    }


def test_sweep_runs_with_only_the_chart_service_account(
    kube_client, sweep_crd, namespace: str, other_namespace: str, mlflow_uri: str, tmp_path
):
    release = f"ls-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-lorasweep"
    install = [
        "install",
        release,
        str(REPO / "charts" / "lorasweep"),
        "--namespace",
        namespace,
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--set",
        "trialDefaults.image=registry.example.com/lorasweep-trainer:0.1.0",
        "--set-json",
        'trialDefaults.nodeSelector={"lorasweep.io/node-mode":"local"}',
        "--set",
        f"trialDefaults.mlflowTrackingUri={mlflow_uri}",
        *DEV_CLUSTER_VALUES,
    ]
    helm(*install, env=KUBE_ENV)
    operator_process: OperatorProcess | None = None
    try:
        deployment = client.AppsV1Api(kube_client).read_namespaced_deployment(fullname, namespace)
        [container] = deployment.spec.template.spec.containers
        # The operator below runs what the chart's pod runs: these modules and namespaces...
        assert container.args[:4] == [
            "run",
            "--module=sweep_operator.handlers",
            "--standalone",
            f"--namespace={namespace}",
        ]
        # ...with the chart's environment (the trial defaults)...
        env = {e.name: e.value for e in container.env if e.value is not None}
        assert env["LORASWEEP_MLFLOW_TRACKING_URI"] == mlflow_uri
        # ...and the chart's ServiceAccount as its only identity.
        kubeconfig = service_account_kubeconfig(
            kube_client, fullname, namespace, tmp_path / "sa.kubeconfig"
        )
        operator_process = OperatorProcess(
            namespace, tmp_path / "operator.log", env={**env, "KUBECONFIG": str(kubeconfig)}
        )
        operator_process.start()

        custom = client.CustomObjectsApi(kube_client)
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, sweep_manifest("defaults")
        )

        def finished() -> dict | None:
            sweep = custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "defaults"
            )
            status = sweep.get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = wait_for(finished, 90, "the sweep to finish", interval=0.5)
        log = (tmp_path / "operator.log").read_text()
        assert status["phase"] == "Succeeded", (status, log[-3000:])
        assert status["bestTrial"]["parameters"] == {"x": 2}
        assert status["bestTrial"]["value"] == 0.5
        assert status["mlflow"]["parentRunId"]  # the chart's default tracking URI was used
        jobs = client.BatchV1Api(kube_client).list_namespaced_job(namespace).items
        assert len(jobs) == 2
        for job in jobs:
            pod = job.spec.template.spec
            assert pod.node_selector == {"lorasweep.io/node-mode": "local"}
            assert pod.containers[0].image == "registry.example.com/lorasweep-trainer:0.1.0"
        # Every request the operator made was allowed (kopf only warns about refusals). Not a
        # bare "403": the apiserver's random port may hold it (127.0.0.1:54033 did).
        for refusal in ("Forbidden", "Not enough permissions", "status=403"):
            assert refusal not in log, log[-3000:]

        # The same identity, refused: Secrets anywhere, anything in an unwatched namespace.
        sa = config.new_client_from_config(str(kubeconfig))
        core, batch = client.CoreV1Api(sa), client.BatchV1Api(sa)
        sa_custom = client.CustomObjectsApi(sa)
        batch.list_namespaced_job(namespace)  # the control: the token works where it should
        refused = {
            "list secrets (watched)": lambda: core.list_namespaced_secret(namespace),
            "read secret (other)": lambda: core.read_namespaced_secret("token", other_namespace),
            "list secrets (all)": lambda: core.list_secret_for_all_namespaces(),
            "list jobs (other)": lambda: batch.list_namespaced_job(other_namespace),
            "create job (other)": lambda: batch.create_namespaced_job(other_namespace, jobs[0]),
            "list pods (other)": lambda: core.list_namespaced_pod(other_namespace),
            "list sweeps (other)": lambda: sa_custom.list_namespaced_custom_object(
                GROUP, VERSION, other_namespace, PLURAL
            ),
            "list jobs (all)": lambda: batch.list_job_for_all_namespaces(),
            "create namespace": lambda: core.create_namespace(
                {"metadata": {"name": "x-" + release}}
            ),
        }
        for what, call in refused.items():
            with pytest.raises(ApiException) as error:
                call()
            assert error.value.status == 403, what
    finally:
        if operator_process:
            operator_process.stop()
        release_sweeps(kube_client, namespace)
        helm("uninstall", release, "--namespace", namespace, env=KUBE_ENV, check=False)


def wait_until_allowed(
    api: client.ApiClient, namespace: str, account: str, verb: str, group: str, resource: str
) -> None:
    """Until the apiserver allows the ServiceAccount this: RBAC reads bindings (and aggregated
    roles) from a cache, so a binding just created may not be in force yet."""
    user = f"system:serviceaccount:{namespace}:{account}"
    wait_for(
        lambda: can(api, user, verb, resource, namespace, group=group),
        30,
        f"{account} to be allowed to {verb} {resource}",
    )


def sweep_user(api: client.ApiClient, namespace: str, name: str, jobs: bool, path: Path):
    """A ServiceAccount allowed to create and change HyperparameterSweeps in the namespace
    (and, with `jobs`, to create Jobs there), and nothing else; an API client as it."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    rules = [
        {
            "apiGroups": [GROUP],
            "resources": [PLURAL],
            "verbs": ["create", "get", "list", "watch", "patch", "update"],
        }
    ]
    if jobs:
        rules.append({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    )
    wait_until_allowed(api, namespace, name, "create", GROUP, PLURAL)
    if jobs:
        wait_until_allowed(api, namespace, name, "create", "batch", "jobs")
    kubeconfig = service_account_kubeconfig(api, name, namespace, path)
    return client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))


def test_only_a_user_who_may_create_jobs_gets_trials(
    kube_client, sweep_crd, namespace: str, tmp_path
):
    """The chart's sweep access policy on the real apiserver: a user allowed to create sweeps
    but not Jobs is refused at once (no sweep, so no pod), and may not change the spec of a
    sweep someone else may run; a user who may create Jobs gets the sweep's trials."""
    release = f"ls-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-lorasweep"
    result = '{"metrics": {"eval_loss": 0.5}}'
    install = [
        "install",
        release,
        str(REPO / "charts" / "lorasweep"),
        "--namespace",
        namespace,
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--set",
        "trialDefaults.image=registry.example.com/lorasweep-trainer:0.1.0",
        "--set-json",
        'trialDefaults.nodeSelector={"lorasweep.io/node-mode":"sim"}',
        *DEV_CLUSTER_VALUES,
    ]
    helm(*install, env=KUBE_ENV)
    operator_process: OperatorProcess | None = None
    try:
        sweeper = sweep_user(kube_client, namespace, "sweeper", False, tmp_path / "s.kubeconfig")
        trainer = sweep_user(kube_client, namespace, "trainer", True, tmp_path / "t.kubeconfig")
        manifest = sweep_manifest("mine")
        manifest["spec"]["trainer"] = {
            "command": ["train"],
            "podAnnotations": {"lorasweep.io/sim-result": result},
        }

        def refused_to_sweeper() -> ApiException | None:
            # A dry run goes through admission: it tells when the new policy is in force.
            try:
                sweeper.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, manifest, dry_run="All"
                )
            except ApiException as error:
                return error
            return None

        error = wait_for(refused_to_sweeper, 30, "the policy to be in force")
        assert error.status == 403
        message = json.loads(error.body)["message"]
        assert (
            f"user system:serviceaccount:{namespace}:sweeper may not create Jobs in namespace "
            f"{namespace}: a HyperparameterSweep runs its trials as Jobs, so creating one or "
            "changing its spec needs that permission"
        ) in message, message

        kubeconfig = service_account_kubeconfig(
            kube_client, fullname, namespace, tmp_path / "sa.kubeconfig"
        )
        deployment = client.AppsV1Api(kube_client).read_namespaced_deployment(fullname, namespace)
        [container] = deployment.spec.template.spec.containers
        env = {e.name: e.value for e in container.env if e.value is not None}
        operator_process = OperatorProcess(
            namespace, tmp_path / "operator.log", env={**env, "KUBECONFIG": str(kubeconfig)}
        )
        operator_process.start()
        trainer.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        custom = client.CustomObjectsApi(kube_client)

        def finished() -> dict | None:
            sweep = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "mine")
            status = sweep.get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = wait_for(finished, 60, "the sweep to finish", interval=0.5)
        assert status["phase"] == "Succeeded", status
        assert status["trials"]["succeeded"] == 2

        # The sweeper may label the sweep, not change what it runs.
        labels = {"metadata": {"labels": {"team": "nlp"}}}
        sweeper.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "mine", labels)
        with pytest.raises(ApiException) as changed:
            sweeper.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "mine", {"spec": {"parallelism": 1}}
            )
        assert changed.value.status == 403
        assert "may not create Jobs" in json.loads(changed.value.body)["message"]
        jobs = client.BatchV1Api(kube_client).list_namespaced_job(namespace).items
        assert len(jobs) == 2
    finally:
        if operator_process:
            operator_process.stop()
        release_sweeps(kube_client, namespace)
        helm("uninstall", release, "--namespace", namespace, env=KUBE_ENV, check=False)
    assert not [
        p
        for p in client.AdmissionregistrationV1Api(kube_client)
        .list_validating_admission_policy()
        .items
        if p.metadata.name.startswith(fullname)
    ]


def bound_user(
    api: client.ApiClient, namespace: str, name: str, cluster_roles: list[str], path: Path
) -> client.CustomObjectsApi:
    """A ServiceAccount bound in the namespace to these ClusterRoles, and nothing else; an API
    client as it."""
    client.CoreV1Api(api).create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    for role in cluster_roles:
        client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": f"{name}-{role}"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role,
                },
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        )
    wait_until_allowed(api, namespace, name, "get", GROUP, PLURAL)  # what every role here grants
    kubeconfig = service_account_kubeconfig(api, name, namespace, path)
    return client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))


def test_sweep_viewer_and_editor_roles(kube_client, sweep_crd, namespace: str, tmp_path):
    """The chart's user roles on the real apiserver: bound to the viewer role, a user reads
    sweeps but may not create one; bound to the editor role, creates one; and the built-in
    view role gets the viewer's rules by aggregation."""
    release = f"ls-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-lorasweep"
    install = ["install", release, str(REPO / "charts" / "lorasweep"), "--namespace", namespace]
    # Without the sweep access policy, which would also want `create` on Jobs from whoever
    # creates a sweep (test_only_a_user_who_may_create_jobs_gets_trials): the roles alone.
    policy_off = ["--set", "sweepAccessPolicy.enabled=false"]
    watched = ["--set", f"watchNamespaces={{{namespace}}}"]
    helm(*install, *watched, *policy_off, *DEV_CLUSTER_VALUES, env=KUBE_ENV)
    try:
        custom = client.CustomObjectsApi(kube_client)
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, sweep_manifest("existing")
        )
        viewer = bound_user(
            kube_client, namespace, "viewer", [f"{fullname}-sweep-viewer"], tmp_path / "v"
        )
        assert viewer.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "existing")
        [listed] = viewer.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        assert listed["metadata"]["name"] == "existing"
        with pytest.raises(ApiException) as refused:
            viewer.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, sweep_manifest("viewers")
            )
        assert refused.value.status == 403
        message = json.loads(refused.value.body)["message"]
        assert 'cannot create resource "hyperparametersweeps"' in message, message

        editor = bound_user(
            kube_client, namespace, "editor", [f"{fullname}-sweep-editor"], tmp_path / "e"
        )
        editor.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, sweep_manifest("editors")
        )
        assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "editors")

        reader = bound_user(kube_client, namespace, "reader", ["view"], tmp_path / "r")

        def reader_lists() -> bool:
            try:
                reader.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            except ApiException as error:
                assert error.status == 403, error
                return False
            return True

        wait_for(reader_lists, 30, "built-in view to aggregate the sweep viewer's rules")
        rbac = client.RbacAuthorizationV1Api(kube_client)

        def edit_and_admin_create_sweeps() -> bool:
            return all(
                any(
                    PLURAL in (rule.resources or []) and "create" in rule.verbs
                    for rule in rbac.read_cluster_role(builtin).rules
                )
                for builtin in ("edit", "admin")
            )

        wait_for(edit_and_admin_create_sweeps, 30, "edit and admin to aggregate the editor")
    finally:
        helm("uninstall", release, "--namespace", namespace, env=KUBE_ENV, check=False)
