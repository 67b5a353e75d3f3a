"""The one exception of the broker package."""


class BrokerError(RuntimeError):
    """The broker cannot be configured or started (the message says why and what to do)."""
