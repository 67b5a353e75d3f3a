"""The protocol's clock: unix time in milliseconds, as `deadline_ms` counts it."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Unix time in milliseconds, the clock of `deadline_ms`."""
    return time.time_ns() // 1_000_000
