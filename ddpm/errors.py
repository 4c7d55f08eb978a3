"""The one exception type for problems the user can fix (bad params, missing data, wrong checkpoint).

The CLI prints a `UserError` as a short message without a traceback (unless `--debug`) and exits 2.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the stage stopped (training checkpointed first). Exit 128 + signal number.

    A BaseException like KeyboardInterrupt, so `except Exception` (retries, cleanup) never swallows it.
    """

    def __init__(self, signum: int, detail: str = "run again to continue"):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}; {detail}")
        self.signum = signum
