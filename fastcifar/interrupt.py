"""Ctrl-C and SIGTERM during training: finish the current step, save, and exit with a resume hint.

While `StopSignals` is active, the first SIGINT/SIGTERM only sets a flag that the training loop polls
after each step (so no step is left half done and the FFCV loaders are shut down normally); a second
signal aborts at once with KeyboardInterrupt. Outside the main thread (where Python cannot install signal
handlers) it does nothing and the flag stays false.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

from fastcifar.errors import FastCifarError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(FastCifarError):
    """Training stopped on a signal after saving a checkpoint; exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        """Whether a stop was requested."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: the user means it
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
