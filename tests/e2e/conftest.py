"""Fixtures for the e2e tests: the CRD applied as a user would, and the operator process; and
what the RBAC check (test_rbac.py) needs: to run last, and to know whether the whole e2e suite
ran before it in this session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from kubernetes import client

import devcluster
from devcluster import REPO
from devcluster.operator_process import OperatorProcess, release_sweeps
from tests.support import wait_for

CRD = REPO / "crds" / "hyperparametersweeps.lorasweep.io.yaml"
HERE = Path(__file__).parent
RBAC_CHECK = HERE / "test_rbac.py"


@dataclass
class E2ESuite:
    """The e2e tests of this session, as the RBAC check sees them: it compares what their
    operators did with the chart's RBAC, so it means something only after all of them."""

    started: datetime
    # Every e2e module was collected and none of its tests deselected (-k, -m, --lf).
    whole: bool
    # Selected e2e tests that have not run (or been skipped) yet.
    pending: set[str]


E2E_SUITE = pytest.StashKey[E2ESuite]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: before the deselecting plugins, whose removals pytest_deselected reports.
    e2e = [item for item in items if item.path.parent == HERE and item.path != RBAC_CHECK]
    modules = set(HERE.glob("test_*.py")) - {RBAC_CHECK}
    config.stash[E2E_SUITE] = E2ESuite(
        started=datetime.now(UTC),
        whole={item.path for item in e2e} == modules,
        pending={item.nodeid for item in e2e},
    )
    # The check after every test, wherever pytest collected it (a stable sort keeps the rest).
    items.sort(key=lambda item: item.path == RBAC_CHECK)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items and E2E_SUITE in items[0].config.stash:
        suite = items[0].config.stash[E2E_SUITE]
        if any(item.nodeid in suite.pending for item in items):
            suite.whole = False


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.when == "setup" and E2E_SUITE in item.config.stash:
        item.config.stash[E2E_SUITE].pending.discard(item.nodeid)


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
