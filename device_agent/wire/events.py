"""What the agent tells the outside: thread-safe counters and an optional JSON-lines event log.

Each event-log line is one JSON object with at least `ts` (unix seconds) and `event`
(connect, reconnect, disconnect, connect_refused, connect_failed, presence, inference, error,
malformed, counters, stop).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any


class Counters:
    """Named integer counters, incremented from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        """counts[name] += n."""
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter (only those ever incremented), sorted by name."""
        with self._lock:
            return dict(sorted(self._counts.items()))


ECHOED = ("connect", "reconnect", "disconnect", "connect_refused", "connect_failed", "error", "malformed")
MALFORMED_INTERVAL_S = 5.0  # at most one `malformed` event per kind of payload in this time


class EventLog:
    """Appends one JSON object per line to a file (flushed per event); a no-op without a path.

    With `echo`, connection events, errors and (rate-limited) malformed payloads are also written
    there as one readable line each.
    """

    def __init__(self, path: Path | None = None, echo: IO[str] | None = None,
                 malformed_interval_s: float = MALFORMED_INTERVAL_S) -> None:
        self._lock = threading.Lock()
        self._file: IO[str] | None = None if path is None else path.open("a", encoding="utf-8")
        self._echo = echo
        self._interval = malformed_interval_s
        self._last: dict[str, float] = {}  # where -> time.monotonic() of its last malformed event
        self._suppressed: Counter[str] = Counter()

    def malformed(self, where: str, reason: str, source: str = "") -> None:
        """A payload that did not decode (docs/protocol.md §10), on a `where` topic (expert, infer,
        reply, presence, topic) from `source` (a topic or device): an event at most once per
        `malformed_interval_s` per `where`, counting the ones suppressed since the last."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(where, -self._interval) < self._interval:
                self._suppressed[where] += 1
                return
            self._last[where] = now
            suppressed = self._suppressed.pop(where, 0)
        self.emit("malformed", where=where, reason=reason[:200], source=source[:100], suppressed=suppressed)

    def emit(self, event: str, **fields: Any) -> None:
        """Write {"ts": now, "event": event, **fields}."""
        if self._echo is not None and event in ECHOED:
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"nmoe agent: {event} {details}", file=self._echo, flush=True)
        if self._file is None:
            return
        line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields},
                          separators=(",", ":"), default=_jsonable)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        """Close the file; later events are ignored."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays (and anything with tolist) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
