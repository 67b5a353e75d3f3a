"""The requester side of the protocol: requests in flight and the replies that settle them.

One `Requester` per connection (an agent's, a trial driver's, a benchmark's). `send` builds a
request for a new correlation id, registers its `Call` (the device expected to answer, the expert
asked, a give-up time) and only then publishes it, so no reply can arrive first. `deliver` takes
every frame from the connection's reply inbox `reply/{me}/+` with the topic's server segment: a
reply settles its call only when the correlation id is in flight, the topic names the device that
was asked and the reply names the expert that was asked (docs/protocol.md §8). Anything else is
dropped and counted: malformed, a REQUEST, an unknown id, a late reply (its call timed out or was
given up), a duplicate (already answered), the wrong sender, the wrong expert.

A call ends exactly once, with a `Fate`: ANSWERED (a RESPONSE), ERROR (an ERROR frame), TIMEOUT
(nothing before its give-up time) or CANCELLED (given up with a reason). A caller either waits
(`wait(calls, until)`, then `give_up(calls)` settles the rest as timed out) or is called back per
call (`on_settled`, on the thread that settled it: the transport's for a reply, the caller's for
`expire` and `give_up`). Nothing here blocks the transport's thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from device_agent.wire.events import Counters, EventLog
from device_agent.wire.protocol import (
    ErrorResponse,
    ExpertResponse,
    ProtocolError,
    decode,
    new_correlation_id,
)
from device_agent.wire.transport import publish_packet_size

T = TypeVar("T")
Reply = ExpertResponse | ErrorResponse
Publish = Callable[[str, bytes], None]  # (topic, payload): QoS 0, not retained
RECENT = 4096  # settled correlation ids remembered to tell late and duplicate replies from unknown ones


class Fate(StrEnum):
    """How a call ended."""

    ANSWERED = "answered"  # a RESPONSE
    ERROR = "error"  # an ERROR frame; Call.detail is its code in lower case (busy, internal...)
    TIMEOUT = "timeout"  # no reply before Call.until
    CANCELLED = "cancelled"  # the caller gave up; Call.detail says why


@dataclass(eq=False)
class Call(Generic[T]):
    """One REQUEST in flight and, once settled, what became of it."""

    correlation_id: bytes
    server: str  # the device expected to answer (the last segment of the reply's topic)
    expert: int  # the expert asked (the reply's expert_id must match)
    until: float  # time.monotonic() after which it times out
    context: T  # the caller's (an inference's rows, a trial's request record...)
    sent_at: float  # time.monotonic() just before it was published
    request_bytes: int  # the MQTT PUBLISH packet of the request
    on_settled: Callable[[Call[T]], None] | None = field(default=None, repr=False)
    fate: Fate | None = None  # None while in flight
    reply: Reply | None = None
    detail: str = ""
    round_trip_s: float | None = None  # publish to the reply's arrival, before decoding (ANSWERED, ERROR)
    reply_bytes: int = 0  # the MQTT PUBLISH packet of the reply


class Requester(Generic[T]):
    """Correlation ids, give-up times, sender and expert checks; see the module docstring."""

    def __init__(self, publish: Publish, events: EventLog | None = None, recent: int = RECENT) -> None:
        self.counters = Counters()
        self._publish, self._events, self._recent_size = publish, events, recent
        self._cond = threading.Condition()
        self._pending: dict[bytes, Call[T]] = {}
        self._recent: OrderedDict[bytes, Fate] = OrderedDict()

    def send(self, topic: str, server: str, expert: int, frame: Callable[[bytes], bytes], wait_s: float,
             context: T, on_settled: Callable[[Call[T]], None] | None = None) -> Call[T]:
        """Publish `frame(correlation_id)` on `topic`, expecting `server` to answer for `expert` within
        `wait_s` seconds. A ProtocolError from `frame` propagates and nothing is sent."""
        cid = new_correlation_id()
        payload = frame(cid)
        now = time.monotonic()
        call = Call(cid, server, expert, now + wait_s, context, now, publish_packet_size(topic, payload), on_settled)
        with self._cond:
            self._pending[cid] = call
        self.counters.add("sent")
        self._publish(topic, payload)
        return call

    def deliver(self, sender: str, payload: bytes, nbytes: int) -> None:
        """One frame from `reply/{me}/{sender}` (`nbytes`: its PUBLISH packet); the transport's thread."""
        arrived = time.monotonic()
        self.counters.add("received")
        try:
            reply = decode(payload)
        except ProtocolError as e:
            self.counters.add("dropped_malformed")
            if self._events is not None:
                self._events.malformed("reply", str(e), sender)
            return
        if not isinstance(reply, ExpertResponse | ErrorResponse):
            self.counters.add("dropped_not_reply")
            return
        with self._cond:
            call = self._pending.get(reply.correlation_id)
            if call is None:
                past = self._recent.get(reply.correlation_id)
                drop = ("dropped_unknown" if past is None else
                        "dropped_duplicate" if past in (Fate.ANSWERED, Fate.ERROR) else "dropped_late")
            elif sender != call.server:
                drop = "dropped_wrong_sender"
            elif reply.expert_id != call.expert:
                drop = "dropped_wrong_expert"
            else:
                drop = ""
                fate = Fate.ANSWERED if isinstance(reply, ExpertResponse) else Fate.ERROR
                detail = reply.code.name.lower() if isinstance(reply, ErrorResponse) else ""
                self._settle(call, fate, detail, reply, nbytes, arrived)
        if drop:
            self.counters.add(drop)
            return
        assert call is not None
        self.counters.add("responses" if isinstance(reply, ExpertResponse) else f"error_{call.detail}")
        self._notify(call)

    def wait(self, calls: Iterable[Call[T]], until: float) -> bool:
        """Block until every call is settled (True) or time.monotonic() reaches `until` (False)."""
        calls = list(calls)
        with self._cond:
            while any(c.fate is None for c in calls):
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def expire(self, now: float | None = None) -> list[Call[T]]:
        """Settle every call in flight whose give-up time has passed as TIMEOUT; those calls."""
        now = time.monotonic() if now is None else now
        with self._cond:
            overdue = [c for c in self._pending.values() if now > c.until]
        return self.give_up(overdue)

    def give_up(self, calls: Iterable[Call[T]], fate: Fate = Fate.TIMEOUT, detail: str = "") -> list[Call[T]]:
        """Settle those of `calls` still in flight as `fate` (TIMEOUT or CANCELLED, with `detail`); those calls.
        A reply arriving later is dropped as late."""
        settled = []
        with self._cond:
            for call in calls:
                if call.fate is None:
                    self._settle(call, fate, detail, None, 0, None)
                    settled.append(call)
        if settled:
            self.counters.add("timed_out" if fate == Fate.TIMEOUT else "cancelled", len(settled))
        for call in settled:
            self._notify(call)
        return settled

    def pending(self) -> list[Call[T]]:
        """The calls in flight, oldest first."""
        with self._cond:
            return list(self._pending.values())

    def _settle(self, call: Call[T], fate: Fate, detail: str, reply: Reply | None, nbytes: int,
                arrived: float | None) -> None:
        """Record the end of `call` (the lock held)."""
        call.fate, call.detail, call.reply, call.reply_bytes = fate, detail, reply, nbytes
        if arrived is not None:
            call.round_trip_s = arrived - call.sent_at
        del self._pending[call.correlation_id]
        self._recent[call.correlation_id] = fate
        if len(self._recent) > self._recent_size:
            self._recent.popitem(last=False)
        self._cond.notify_all()

    @staticmethod
    def _notify(call: Call[T]) -> None:
        if call.on_settled is not None:
            call.on_settled(call)
