"""The chart grants the operator exactly what it uses: nothing missing, nothing unused.

What it uses: over the e2e suite, the kube-apiserver audits every request of the operator's
identity (devcluster.AUDIT_POLICY), the user `lorasweep-operator` that every e2e test's
operator authenticates as (the CN of .cluster/operator.kubeconfig's client certificate; the
tests themselves are `lorasweep-admin`). Its group is system:masters, so RBAC refuses it
nothing: the log shows what the operator does, not what the chart happens to allow. What the
chart grants: the rules of the roles its bindings give the operator's ServiceAccount, in every
layout the chart renders. This module runs last in a session (tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import devcluster
from tests.chart.chart_support import documents, template
from tests.e2e.conftest import E2E_SUITE

OPERATOR_USER = "lorasweep-operator"

# (API group, resource or resource/subresource, verb): one permission, as RBAC rules name it.
Permission = tuple[str, str, str]

# Values that between them render every rule the chart may give the operator: all namespaces
# or a list of them (a Role in each), standalone or with peering.
LAYOUTS: list[dict[str, Any]] = [
    {},
    {"watchNamespaces": ["team-a"]},
    {"replicas": 2},
    {"replicas": 2, "watchNamespaces": ["team-a"]},
]

PEERING = (
    "kopf peering, only with replicas > 1: kopf watches its peering object (list, then "
    "watch) and merge-patches its keep-alive into it; every e2e operator runs --standalone"
)
# Granted although no e2e test makes the operator use it, each with why it stays.
NOT_REACHED: dict[Permission, str] = {
    ("kopf.dev", "clusterkopfpeerings", "list"): PEERING,
    ("kopf.dev", "clusterkopfpeerings", "watch"): PEERING,
    ("kopf.dev", "clusterkopfpeerings", "patch"): PEERING,
    ("kopf.dev", "kopfpeerings", "list"): PEERING,
    ("kopf.dev", "kopfpeerings", "watch"): PEERING,
    ("kopf.dev", "kopfpeerings", "patch"): PEERING,
}


def audit_files() -> list[Path]:
    """The audit log and the files the apiserver rotated it into (audit-<time>.log)."""
    log = devcluster.AUDIT_LOG
    return [*sorted(log.parent.glob(f"{log.stem}-*{log.suffix}")), log]


def events(files: list[Path]) -> Iterator[dict[str, Any]]:
    """The audit events of these files, oldest first; read as they go (up to 400 MB)."""
    for path in files:
        if path.exists():
            with path.open() as lines:
                yield from (json.loads(line) for line in lines)


def received(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["requestReceivedTimestamp"])


def used(audit: Iterable[dict[str, Any]], user: str, since: datetime) -> set[Permission]:
    """The permissions `user`'s requests since `since` needed."""
    permissions = set()
    for event in audit:
        ref = event.get("objectRef")
        # A request for no resource (/api, /apis, /version: discovery) is every authenticated
        # user's (the built-in system:discovery role), not the chart's to grant.
        if event["user"]["username"] != user or ref is None:
            continue
        if received(event) < since:
            continue
        resource = ref["resource"]
        if ref.get("subresource"):
            resource += f"/{ref['subresource']}"
        permissions.add((ref.get("apiGroup", ""), resource, event["verb"]))
    return permissions


def granted(stream: str) -> set[Permission]:
    """The permissions of the roles a rendered chart binds to its ServiceAccount."""
    docs = documents(stream)
    account = {
        "kind": "ServiceAccount",
        "name": next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"),
    }
    bound = {
        (d["roleRef"]["kind"], d["roleRef"]["name"])
        for d in docs
        if d["kind"] in ("ClusterRoleBinding", "RoleBinding")
        and any(account.items() <= subject.items() for subject in d["subjects"])
    }
    return {
        (group, resource, verb)
        for d in docs
        if (d["kind"], d["metadata"]["name"]) in bound
        for rule in d["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def differences(
    used: set[Permission], granted: set[Permission], not_reached: dict[Permission, str]
) -> list[str]:
    """What is wrong between the two, one line each; nothing when the chart is right."""
    problems = [f"used, not granted: {p}" for p in sorted(used - granted)]
    problems += [f"granted, never used: {p}" for p in sorted(granted - used - not_reached.keys())]
    problems += [f"in NOT_REACHED, but used now: {p}" for p in sorted(not_reached.keys() & used)]
    problems += [f"in NOT_REACHED, not granted: {p}" for p in sorted(not_reached.keys() - granted)]
    return problems


def test_the_chart_grants_what_the_operator_uses_and_nothing_else(
    request: pytest.FixtureRequest, tmp_path: Path
):
    suite = request.config.stash[E2E_SUITE]
    if not suite.whole or suite.pending:
        pytest.skip("compares with what the whole e2e suite did: run it with tests/e2e")
    files = audit_files()
    rotated = len(files) - 1
    oldest = next(events(files), None)
    # The apiserver deletes the oldest rotated file beyond AUDIT_LOG_BACKUPS: then this
    # session's first requests may be gone, and a verb only they used would seem unused.
    assert rotated < devcluster.AUDIT_LOG_BACKUPS or (
        oldest is not None and received(oldest) < suite.started
    ), f"the audit log rotated part of this session away ({rotated} files); raise the limit"
    operator_used = used(events(files), OPERATOR_USER, suite.started)
    granted_anywhere = set().union(*(granted(template(values, tmp_path)) for values in LAYOUTS))
    problems = differences(operator_used, granted_anywhere, NOT_REACHED)
    assert not problems, (
        "the chart's RBAC (charts/lorasweep/templates/) and what the operator did over the e2e "
        "suite differ:\n" + "\n".join(problems)
    )


def audit_event(user: str, verb: str, ref: dict[str, str] | None, at: datetime) -> dict:
    return {
        "user": {"username": user, "groups": ["system:masters"]},
        "verb": verb,
        "requestReceivedTimestamp": at.isoformat().replace("+00:00", "Z"),
        **({"objectRef": ref} if ref else {}),
    }


def test_the_comparison_reports_a_missing_and_an_unused_permission(tmp_path: Path):
    """The check can fail: it reads the audit log as the apiserver writes it, and reports a
    verb used and not granted, and one granted and not used."""
    since = datetime.now(UTC)
    later = since + timedelta(seconds=1)
    jobs = {"resource": "jobs", "apiGroup": "batch", "namespace": "t", "apiVersion": "v1"}
    status = {"resource": "hyperparametersweeps", "subresource": "status", "apiGroup": "x.io"}
    lines = [
        audit_event(OPERATOR_USER, "create", jobs, later),
        audit_event(OPERATOR_USER, "patch", status, later),
        audit_event(OPERATOR_USER, "get", None, later),  # discovery
        audit_event(OPERATOR_USER, "delete", jobs, since - timedelta(seconds=1)),  # before
        audit_event("lorasweep-admin", "list", {"resource": "secrets"}, later),
    ]
    (tmp_path / "audit.log").write_text("".join(json.dumps(e) + "\n" for e in lines))
    seen = used(events([tmp_path / "audit.log"]), OPERATOR_USER, since)
    assert seen == {("batch", "jobs", "create"), ("x.io", "hyperparametersweeps/status", "patch")}

    rules = {("batch", "jobs", "create"), ("batch", "jobs", "delete")}
    assert differences(seen, rules, {}) == [
        "used, not granted: ('x.io', 'hyperparametersweeps/status', 'patch')",
        "granted, never used: ('batch', 'jobs', 'delete')",
    ]
    excused = {("batch", "jobs", "delete"): "a rare path"}
    assert differences(seen, rules, excused) == [
        "used, not granted: ('x.io', 'hyperparametersweeps/status', 'patch')"
    ]
    assert differences(seen | set(excused), rules, excused)[-1] == (
        "in NOT_REACHED, but used now: ('batch', 'jobs', 'delete')"
    )


def test_only_the_operators_roles_count_as_granted(tmp_path: Path):
    """The users' sweep-editor role may delete sweeps; the operator may not."""
    operator = granted(template({}, tmp_path))
    assert ("batch", "jobs", "create") in operator
    assert ("lorasweep.io", "hyperparametersweeps", "delete") not in operator
