"""An apiserver outage is logged as one line per retry, a bug with its traceback."""

from __future__ import annotations

import urllib3
from kubernetes.client.exceptions import ApiException

from sweep_operator.handlers import unreachable


def test_an_apiserver_that_does_not_answer_is_unreachable():
    refused = urllib3.exceptions.MaxRetryError(
        None, "/apis/batch/v1/namespaces/team-a/jobs", ConnectionRefusedError(111, "refused")
    )
    assert unreachable(refused)
    assert unreachable(urllib3.exceptions.ProtocolError("Connection aborted."))
    assert unreachable(ConnectionResetError(104, "reset"))
    assert unreachable(ApiException(status=503, reason="Service Unavailable"))
    assert unreachable(ApiException(status=504, reason="Gateway Timeout"))
    assert unreachable(ApiException(status=429, reason="Too Many Requests"))


def test_a_refusal_or_a_bug_is_not():
    assert not unreachable(ApiException(status=422, reason="Unprocessable Entity"))
    assert not unreachable(ApiException(status=403, reason="Forbidden"))
    assert not unreachable(KeyError("metadata"))
    assert not unreachable(ValueError("bad"))
