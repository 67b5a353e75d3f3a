"""Errors that are the user's to fix (printed as one line by the CLI, no traceback)."""


class RunDirConflict(ValueError):
    """The run dir already holds a run of a different config."""


class NoQuorumError(RuntimeError):
    """A federated round (or a stage that needs every device) did not get enough results after its
    retries; the message names the failures (e.g. non-finite updates: learning rate too high).
    The checkpoints keep every completed round: the same command resumes there."""


class DamagedFile(ValueError):
    """A file the tools read is unreadable, truncated or not what was expected (the message names it)."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for error lines."""
    return (str(e).splitlines() or [""])[0] or type(e).__name__
