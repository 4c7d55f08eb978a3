"""The one exception type for problems the user can fix (bad params, missing data, wrong checkpoint).

The CLI prints a `UserError` as a short message without a traceback (unless `--debug`) and exits 2.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = 2
