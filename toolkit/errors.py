"""Errors that are the user's to fix (printed as one line by the CLI, no traceback)."""


class RunDirConflict(ValueError):
    """The run dir already holds a run of a different config."""


class DivergedError(RuntimeError):
    """A client's update holds NaN or infinity (learning rate too high, or a bad client)."""
