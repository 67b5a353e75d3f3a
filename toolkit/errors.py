"""Errors that are the user's to fix (printed as one line by the CLI, no traceback)."""


class RunDirConflict(ValueError):
    """The run dir already holds a run of a different config."""


class DivergedError(RuntimeError):
    """A client's update holds NaN or infinity (learning rate too high, or a bad client)."""


class DamagedFile(ValueError):
    """A file the tools read is unreadable, truncated or not what was expected (the message names it)."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for error lines."""
    return (str(e).splitlines() or [""])[0] or type(e).__name__
