"""Deterministic names: trial Jobs, the trials' Service, the model download Job and its
directory, label values, MLflow experiments.

A trial's name is a pure function of (sweep name, index). After a restart the operator
recomputes the same names, and the apiserver's name uniqueness makes a second create of the
same trial fail with AlreadyExists instead of running it twice.
"""

from __future__ import annotations

import hashlib
import re

# The Job controller names pods `<job>-<5 random chars>` and copies the Job name into the
# `job-name` / `batch.kubernetes.io/job-name` labels (63 chars at most). 52 leaves room for
# both, and for the CronJob-style suffixes some tools add.
MAX_TRIAL_NAME = 52
MAX_LABEL_VALUE = 63
HASH_CHARS = 8
MAX_SERVICE_NAME = 63
SERVICE_SUFFIX = "-trials"
MODEL_FETCH_SUFFIX = "-model"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _shorten(name: str, limit: int) -> str:
    """`name` if it is a DNS label within `limit`, else a truncated form plus a hash of it."""
    if len(name) <= limit and _DNS_LABEL.match(name):
        return name
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower())
    prefix = cleaned[: limit - HASH_CHARS - 1].strip("-")
    return f"{prefix}-{_hash(name)}" if prefix else _hash(name)


def trial_name(sweep: str, index: int) -> str:
    """Job name of trial `index`: `<sweep>-<index:04d>`, hashed when too long.

    When the sweep name does not fit (or contains dots, which a DNS label may not), it is
    truncated and followed by a hash of the full name, so two long sweeps sharing a prefix
    still get distinct trial names.
    """
    if index < 0:
        raise ValueError(f"trial index must be >= 0, got {index}")
    suffix = f"-{index:04d}"
    return _shorten(sweep, MAX_TRIAL_NAME - len(suffix)) + suffix


def service_name(sweep: str) -> str:
    """The headless Service of a sweep's multi-node trials: `<sweep>-trials`, hashed when too
    long. A Service name is a DNS-1035 label, which must start with a letter; a sweep name
    need not, so one that does not is prefixed with `s-`."""
    base = sweep if re.match("[a-z]", sweep) else f"s-{sweep}"
    return _shorten(base, MAX_SERVICE_NAME - len(SERVICE_SUFFIX)) + SERVICE_SUFFIX


def model_fetch_name(sweep: str) -> str:
    """The Job that downloads a sweep's model into spec.trainer.modelCache: `<sweep>-model`,
    hashed when too long. It never clashes with a trial, whose name ends in digits."""
    return _shorten(sweep, MAX_TRIAL_NAME - len(MODEL_FETCH_SUFFIX)) + MODEL_FETCH_SUFFIX


def model_cache_dir(model: str) -> str:
    """The directory of hub model `model` on the model cache claim: `org/name` -> `org--name`.
    The hub forbids "--" in a name, so two models never share a directory."""
    return model.replace("/", "--")


def label_value(name: str) -> str:
    """A label value for `name` (sweep names may exceed the 63 characters of a label value)."""
    return _shorten(name, MAX_LABEL_VALUE)


def experiment_name(namespace: str, sweep: str, configured: str | None = None) -> str:
    """The MLflow experiment of a sweep: spec.mlflow.experimentName or `<namespace>/<sweep>`."""
    return configured or f"{namespace}/{sweep}"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    """An experiment's page in the MLflow UI."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI."""
    return f"{experiment_url(tracking_uri, experiment_id)}/runs/{run_id}"
