"""Session fixtures: the real test cluster (started on demand, reused when already up)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster import devcluster
from tests.support import wait_for


@pytest.fixture(scope="session")
def cluster() -> Iterator[devcluster.Cluster]:
    """The dev cluster of `make cluster-up`; started for this session if it is not running."""
    # Several sessions may share one cluster (a developer's, helpers', CI's steps); the one
    # that started it stops it when the last of them is done.
    user = str(os.getpid())
    yield devcluster.use(user, start=True)
    devcluster.release(user)


@pytest.fixture(scope="session")
def kube_client(cluster: devcluster.Cluster):
    from kubernetes import config

    return config.new_client_from_config(str(devcluster.KUBECONFIG))


@pytest.fixture(scope="session")
def mlflow_uri(cluster: devcluster.Cluster) -> str:
    return cluster.mlflow_url


@pytest.fixture
def namespace(kube_client) -> Iterator[str]:
    """A fresh namespace per test, deleted (with everything in it) afterwards."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube_client)
    core.create_namespace({"metadata": {"name": name, "labels": {"lorasweep.io/test": "true"}}})
    wait_for(
        lambda: devcluster.has_default_service_account(core, name),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    core.delete_namespace(name)
