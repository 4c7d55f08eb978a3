"""SIGINT and SIGTERM as `Interrupted`, delivered even when Python drops the first one.

Python runs a signal handler in the main thread between two bytecodes of whatever Python code runs there,
finalizers included: a weakref callback, a `__del__`, a GC callback. An exception raised there cannot
propagate; Python prints "Exception ignored in ..." and carries on. The stage then went on working as if the
signal had never come (issue 20: the handler ran inside `WeakValueDictionary`'s removal callback while the
evaluate stage was starting its guidance sweep, and the process sampled on for minutes). So `StopSignals`
raises `Interrupted` and, until it sees that exception being handled, raises it again every `REDELIVER_S`
seconds (an interval timer, SIGALRM: no thread, nothing to join).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ddpm.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_S = 0.5  # how soon a dropped `Interrupted` is raised again


class StopSignals:
    """While entered (`with StopSignals(detail):`), SIGINT/SIGTERM raise `Interrupted(signum, detail)`.

    Only the main thread can install handlers; elsewhere it does nothing. Leaving restores the previous
    handlers, so guards nest (the CLI's around the whole stage, a `Tracker`'s around its run).
    Inside `deferred()` a signal is only recorded (`received`), for cleanup that must complete.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        self.received: int | None = None  # the first stop signal that arrived
        self._old: dict[int, Any] = {}
        self._deferring = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread() and not self._old:
            self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
            self._old[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._redeliver)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Stop raising again and put the previous handlers back (idempotent)."""
        if not self._old:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old = {}

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a stop signal is recorded, not raised, and a pending one is not raised again: for cleanup
        that must complete (ending the MLflow run). The caller checks `received` afterwards."""
        self._deferring = True
        signal.setitimer(signal.ITIMER_REAL, 0)  # the `Interrupted` reached the cleanup: it was delivered
        try:
            yield
        finally:
            self._deferring = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        if self._deferring:
            return
        signal.setitimer(signal.ITIMER_REAL, REDELIVER_S, REDELIVER_S)  # until `deferred` or `release`
        raise Interrupted(signum, self.detail)

    def _redeliver(self, signum: int, frame: Any) -> None:
        """The timer: raise again unless the first `Interrupted` is being handled (an `except`, a `finally`
        or an `__exit__` it passes through)."""
        if self._deferring or self.received is None or isinstance(sys.exc_info()[1], Interrupted):
            return
        raise Interrupted(self.received, self.detail)
