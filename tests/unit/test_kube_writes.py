"""The operator's writes reuse their connections to the apiserver."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from kubernetes import client

from sweep_operator.kube_writes import SweepWriter


class _Created(BaseHTTPRequestHandler):
    """Answers every request 201 on a kept-alive connection and notes the client's port (one
    per connection)."""

    protocol_version = "HTTP/1.1"
    ports: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.ports.append(self.client_address[1])
        body = b'{"kind": "Job", "metadata": {"name": "made"}}'
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    _Created.ports = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Created)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def test_creating_jobs_one_after_another_reuses_one_connection(server):
    """An unread reply holds its connection: each Job then cost a new connection (a TLS
    handshake against a real apiserver)."""
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    writer = SweepWriter(client.ApiClient(configuration))
    for index in range(20):
        assert writer.create_job("team-a", {"metadata": {"name": f"trial-{index}"}})
    assert len(_Created.ports) == 20
    assert len(set(_Created.ports)) == 1
