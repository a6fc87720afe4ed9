"""Small helpers shared by the cluster tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

from devcluster import process_alive

__all__ = ["free_port", "process_alive", "wait_for"]

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Polls `check` until it returns something truthy, which it returns; fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
