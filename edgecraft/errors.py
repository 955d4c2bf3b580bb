"""The one exception type the CLI turns into a single clear line and a non-zero exit.

Library code raises `UserError` for anything the user can fix (a bad recipe, a missing path, a
damaged file); the CLI prints `error: <message>` and exits with `exit_code`, never a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line; `exit_code` is the process status."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
