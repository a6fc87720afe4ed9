"""Fixtures for the e2e tests: the CRD applied as a user would, and the operator process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from kubernetes import client

import devcluster
from devcluster import REPO
from devcluster.operator_process import OperatorProcess, release_sweeps
from tests.support import wait_for

CRD = REPO / "crds" / "hyperparametersweeps.lorasweep.io.yaml"


@pytest.fixture(scope="session")
def sweep_crd(cluster, kube_client) -> None:
    """The CRD from crds/, applied as a user would, and established."""
    devcluster.apply_crds(cluster)
    ext = client.ApiextensionsV1Api(kube_client)
    name = yaml.safe_load(CRD.read_text())["metadata"]["name"]

    def established():
        crd = ext.read_custom_resource_definition(name)
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_for(established, 30, f"CRD {name} to be established")


@pytest.fixture
def operator(sweep_crd, namespace, kube_client, tmp_path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(namespace, tmp_path / "operator.log")
    process.start()
    yield process
    process.stop()
    release_sweeps(kube_client, namespace)


@pytest.fixture
def custom(kube_client) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_client)


@pytest.fixture
def batch(kube_client) -> client.BatchV1Api:
    return client.BatchV1Api(kube_client)
