"""The requester side: expert requests in flight and the replies that answer them.

An inference opens a `CallGroup`, registers one `Call` per REQUEST (before publishing it, so no
reply can arrive first) and waits until every call is answered or its deadline passes. The
`ReplyRouter` receives every frame on `reply/{me}/+` and hands it to its call when the correlation
id is one in flight and the reply's expert id is the one asked; anything else (malformed,
unknown, late, duplicate, from the wrong expert) is dropped and counted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from device_agent.wire.events import Counters
from device_agent.wire.protocol import (
    ErrorResponse,
    ExpertRequest,
    ExpertResponse,
    ProtocolError,
    decode,
)

Reply = ExpertResponse | ErrorResponse


@dataclass
class Call:
    """One REQUEST: which expert and rows it asked for, and its reply once it came."""

    expert: int
    rows: np.ndarray  # indices into the inference's batch
    device: str  # the peer expected to answer
    sent_at: float  # time.perf_counter()
    reply: Reply | None = None
    round_trip_s: float | None = None
    reply_bytes: int = 0


class CallGroup:
    """The calls of one inference."""

    def __init__(self) -> None:
        self.calls: dict[bytes, Call] = {}
        self._cond = threading.Condition()
        self._unanswered = 0

    def add(self, cid: bytes, call: Call) -> None:
        """Expect a reply for `cid`."""
        with self._cond:
            self.calls[cid] = call
            self._unanswered += 1

    def answer(self, cid: bytes, reply: Reply, nbytes: int) -> bool:
        """Record the first reply to `cid`; False for a duplicate."""
        with self._cond:
            call = self.calls[cid]
            if call.reply is not None:
                return False
            call.reply, call.reply_bytes = reply, nbytes
            call.round_trip_s = time.perf_counter() - call.sent_at
            self._unanswered -= 1
            if self._unanswered == 0:
                self._cond.notify_all()
        return True

    def wait(self, until: float) -> None:
        """Block until every call is answered or time.monotonic() reaches `until`."""
        with self._cond:
            while self._unanswered:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)


class ReplyRouter:
    """Matches reply frames to the calls in flight."""

    def __init__(self) -> None:
        self.counters = Counters()
        self._lock = threading.Lock()
        self._groups: dict[bytes, CallGroup] = {}

    def track(self, group: CallGroup, cid: bytes, call: Call) -> None:
        """Register a call before its request is published."""
        group.add(cid, call)
        with self._lock:
            self._groups[cid] = group
        self.counters.add("sent")

    def forget(self, group: CallGroup) -> None:
        """Stop matching the group's calls: their late replies are dropped from now on."""
        with self._lock:
            for cid, call in group.calls.items():
                self._groups.pop(cid, None)
                if call.reply is None:
                    self.counters.add("timed_out")

    def deliver(self, payload: bytes, nbytes: int) -> None:
        """Handle one frame from `reply/{me}/+` (`nbytes`: its size on the wire)."""
        self.counters.add("received")
        try:
            reply = decode(payload)
        except ProtocolError:
            self.counters.add("dropped_malformed")
            return
        if isinstance(reply, ExpertRequest):
            self.counters.add("dropped_not_reply")
            return
        with self._lock:
            group = self._groups.get(reply.correlation_id)
        if group is None:
            self.counters.add("dropped_unexpected")  # unknown or late
            return
        if group.calls[reply.correlation_id].expert != reply.expert_id:
            self.counters.add("dropped_wrong_expert")
            return
        if not group.answer(reply.correlation_id, reply, nbytes):
            self.counters.add("dropped_duplicate")
            return
        self.counters.add("responses" if isinstance(reply, ExpertResponse) else f"error_{reply.code.name.lower()}")
