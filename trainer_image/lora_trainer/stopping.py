"""Graceful stop on SIGTERM: Kubernetes sends it when the operator prunes a trial."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("lora_trainer")


class Stopped(Exception):
    """Training was stopped by a signal; carries the metrics known so far."""

    def __init__(self, metrics: dict[str, float] | None = None) -> None:
        super().__init__("stopped by signal")
        self.metrics = metrics or {}


class StopFlag:
    """Set by the first SIGTERM/SIGINT and read at step boundaries; a second signal stops at
    once, for a user who does not want to wait for the current step, unless the run is
    already finishing: then nothing may cut short the writing of its result."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._finishing = False
        self.signal_number = 0
        # Run on the first signal, in the signal handler: it may interrupt a call blocked on the
        # network, which the rest of the stop would otherwise wait for.
        self.on_signal: Callable[[], None] | None = None

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self.is_set:
            raise Stopped

    def finishing(self) -> None:
        """From now on signals are noted, never raised: the run is writing its result."""
        self._finishing = True

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self._finishing:
            log.warning("%s received while finishing", signal.Signals(signal_number).name)
            return
        if self.is_set:
            raise Stopped
        self.signal_number = signal_number
        self._event.set()
        log.warning(
            "%s received: stopping after the current step", signal.Signals(signal_number).name
        )
        if self.on_signal is not None:
            try:
                self.on_signal()
            except Exception:
                log.exception("could not record the stop")

    def install(self) -> None:
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, self._handle)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or signal.SIGTERM)
