"""Long C calls run so that SIGINT/SIGTERM still stop the process within a fraction of a second.

Python runs signal handlers only in the main thread, between bytecodes: during one long C call a stop
signal waits until the call returns (a symmetric eigendecomposition of a 2048 x 2048 FID covariance takes
tens of seconds on a loaded CPU). `interruptible` runs the call in a worker thread and waits for it in short
slices, so the waiting thread keeps running handlers. The call must release the GIL (numpy's LAPACK and
matrix products do; scipy's `sqrtm` does not). A plain `join()` would not do: the kernel may deliver the
signal to another thread, which does not wake a thread blocked on a lock without a time-out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_SLICE_S = 0.1  # how long the waiting thread blocks between looks at pending signals


def interruptible(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, computed in a daemon thread while this thread waits in `_SLICE_S` slices.

    An exception raised here while waiting (a signal handler's `Interrupted`) leaves the worker to finish
    on its own; as a daemon it does not keep the process alive. `fn`'s own exception is re-raised here.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread, which re-raises it
            box["error"] = err

    worker = threading.Thread(target=work, name=f"interruptible-{getattr(fn, '__name__', 'call')}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(_SLICE_S)
    if "error" in box:
        raise box["error"]
    return box["result"]
