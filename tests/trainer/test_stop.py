"""A stopped trial's result reaches its termination message even when MLflow hangs: the kubelet
reads the message however the process ends, so it must be written before anything can block."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pytest

from tests.support import wait_for
from tests.trainer.helpers import start_until_step


class HangingProxy:
    """A TCP proxy to MLflow that, once `hang()` is called, accepts and never answers, as a
    tracking server stuck behind a load balancer does."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.hung = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self.hung.set()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            if self.hung.is_set():
                continue  # kept open by the backlog, never read: the client waits
            upstream = socket.create_connection(self.upstream)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        while data := source.recv(65536):
            if self.hung.is_set():
                return  # what was in flight is never answered
            target.sendall(data)


def test_the_result_is_written_before_a_hung_mlflow_is_closed(
    mlflow_uri: str, base_settings: list[str], trial_env: dict[str, str]
) -> None:
    host, port = mlflow_uri.removeprefix("http://").split(":")
    proxy = HangingProxy((host, int(port)))
    env = trial_env | {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.port}",
        "MLFLOW_EXPERIMENT_NAME": "hanging-mlflow",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "600",  # a hang, not an error
    }
    settings = [
        *base_settings,
        "max_steps=100000",
        "logging_steps=1",
        "gradient_accumulation_steps=4",
    ]
    result = Path(env["LORASWEEP_RESULT_PATH"])
    process, lines = start_until_step(settings, env, 2)
    try:
        proxy.hang()
        process.send_signal(signal.SIGTERM)
        # A second signal while the trainer stops and cleans up must not cut the result short.
        process.send_signal(signal.SIGTERM)
        wait_for(result.exists, 120, "the result", interval=0.5)
        written = json.loads(result.read_text())
        # Written while the trainer still waits on MLflow to close the run.
        assert process.poll() is None, "".join(lines[-30:])
    finally:
        process.kill()
    assert "stopped by signal" in written["error"]
    assert written["metrics"]["train_steps"] >= 2


def test_a_second_signal_stops_at_once_but_never_while_the_result_is_written() -> None:
    from lora_trainer.stopping import StopFlag, Stopped

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    flag, recorded = StopFlag(), []
    flag.on_signal = lambda: recorded.append(flag.signal_number)
    flag.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert flag.is_set and recorded == [signal.SIGTERM]
        with pytest.raises(Stopped):  # while training: at once
            signal.raise_signal(signal.SIGTERM)
        flag.finishing()
        signal.raise_signal(signal.SIGTERM)  # noted, not raised
        assert recorded == [signal.SIGTERM] and flag.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
