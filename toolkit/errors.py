"""Errors that are the user's to fix (printed as one line by the CLI, no traceback)."""


class RunDirConflict(ValueError):
    """The run dir already holds a run of a different config."""


class NoQuorumError(RuntimeError):
    """A federated round (or a stage that needs every device) did not get enough results after its
    retries; the message names the failures (e.g. non-finite updates: learning rate too high).
    The checkpoints keep every completed round: the same command resumes there."""
