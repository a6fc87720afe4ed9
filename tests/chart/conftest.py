"""The e2e tests' CRD fixture, shared (a fixture imported into a conftest is available to its
folder's tests)."""

from tests.e2e.conftest import sweep_crd

__all__ = ["sweep_crd"]
