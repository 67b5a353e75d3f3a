"""The trial driver's own MQTT connection: it watches presence, sends inference requests, matches answers.

It is an app in the protocol's sense (docs/protocol.md §1): it publishes raw images on
`infer/{device}/req` with its inbox `reply/operator` (the `operator` account of `nmoe broker --auth`)
and reads the combined probabilities on `reply/operator/{device}`. Pixels travel as uint8 to a
device whose presence lists protocol 2, as fp16 (which holds every integer 0..255 exactly) to a
version-1 device (docs/protocol.md §6.3). The wire layer's `Requester` keeps the requests in flight
and matches the replies; a `Request` is the trial's record of one of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from device_agent.wire.clock import now_ms
from device_agent.wire.events import Counters, EventLog
from device_agent.wire.protocol import (
    ErrorResponse,
    ExpertRequest,
    ExpertResponse,
    Presence,
    ProtocolError,
    TopicKind,
    Topics,
    decode_presence,
    encode,
    raw_input_encoding,
)
from device_agent.wire.requester import Call, Fate, Requester
from device_agent.wire.transport import ConnectionEvent, Transport, publish_packet_size

POLL_S = 0.1  # how often a wait looks at a requested stop
OPERATOR = "operator"  # the driver's inbox and, with --auth, its broker account
DROPPED = {  # the Requester's counters of dropped replies -> the driver's (trial.json `driver`, docs/trial.md)
    "dropped_malformed": "malformed", "dropped_not_reply": "not_a_reply", "dropped_wrong_sender": "wrong_sender",
    "dropped_wrong_expert": "wrong_expert", "dropped_unknown": "late_or_unknown_replies",
    "dropped_late": "late_or_unknown_replies", "dropped_duplicate": "late_or_unknown_replies"}


class RequestStatus(StrEnum):
    """What became of a request (the values are trial.json's and the driver's event names)."""

    PENDING = "pending"  # sent, no answer yet
    ANSWERED = "answered"  # the combined probabilities came back
    ERROR = "error"  # the agent answered with an error code
    TIMEOUT = "timeout"  # no answer within the driver's wait
    NOT_SERVED = "not_served"  # the device was killed (never sent, or in flight then) or is absent
    INTERRUPTED = "interrupted"  # the trial was stopped while it was in flight

    @property
    def failed(self) -> bool:
        """A failure of the fleet: a live device did not answer properly."""
        return self in (RequestStatus.ERROR, RequestStatus.TIMEOUT)


class TrialError(ValueError):
    """The trial cannot run as asked (printed as one line, exit status 2)."""


@dataclass
class Request:
    """One inference request (one image) and what became of it."""

    device: str
    index: int  # the sample's index in the device's personalized test split
    label: int
    sent_s: float  # seconds after the feeding started
    id: str = ""  # correlation id in hex ("" when it was never sent)
    request_bytes: int = 0  # the MQTT packet with the image
    status: RequestStatus = RequestStatus.PENDING
    detail: str = ""  # the error code of an ERROR answer
    predicted: int | None = None
    rtt_ms: float | None = None
    reply_bytes: int = 0
    probs: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PresenceChange:
    """A presence the driver received."""

    at_s: float  # seconds after the feeding started (negative: before it)
    device: str
    status: str  # online / offline


class TrialDriver:
    """Sends the trial's requests over one `Transport` and keeps every request's fate."""

    def __init__(self, topics: Topics, model_version: str, events: EventLog) -> None:
        self.topics, self.model_version, self.events = topics, model_version, events
        self.transport: Transport | None = None
        self.inbox = topics.reply(OPERATOR)
        self.requester: Requester[Request] = Requester(self._publish, events)
        self.requests: list[Request] = []
        self.t0 = time.monotonic()
        self._own_counters = Counters()  # what the driver drops besides replies: malformed presence or topics
        self._in_flight = 0  # sent requests whose Request is not settled yet (the Requester's call may be)
        self._presence: dict[str, Presence] = {}
        self._changes: list[tuple[float, str, str]] = []  # (monotonic time, device, status)
        self._cond = threading.Condition()
        self._connection: tuple[ConnectionEvent, str] | None = None
        self._connected_at = float("-inf")  # monotonic time of the latest (re)connection
        self._stop_requested = False

    @property
    def counters(self) -> Counters:
        """What the driver dropped: the Requester's dropped replies under the driver's names (DROPPED), and
        malformed presence or topics."""
        counters = Counters()
        for name, n in self.requester.counters.snapshot().items():
            if name in DROPPED:
                counters.add(DROPPED[name], n)
        for name, n in self._own_counters.snapshot().items():
            counters.add(name, n)
        return counters

    # connection and presence ---------------------------------------------------------------------

    def connect(self, transport: Transport, timeout_s: float) -> None:
        """Connect (no will) and subscribe to presence and the inbox; TrialError if refused, unreachable or
        too slow."""
        self.transport = transport
        self.transport.subscribe(self.topics.presence_filter(), qos=1)
        self.transport.subscribe(self.topics.reply_filter(OPERATOR))
        self.transport.connect(None, self._on_message, self._on_connection)
        self._wait_for(lambda: self._connection is not None, timeout_s)
        with self._cond:
            state = self._connection
        if state is None:
            raise TrialError("the trial driver cannot connect to the broker (no answer)")
        if state[0] == ConnectionEvent.REFUSED:
            raise TrialError(f"the trial driver cannot connect to the broker (refused: {state[1]})")
        if state[0] == ConnectionEvent.UNREACHABLE:
            raise TrialError(f"the trial driver cannot reach the broker ({state[1]}); is it running?")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def wait_reconnected(self, since: float, timeout_s: float) -> float:
        """Wait until the transport (which reconnects by itself, with backoff) has connected again after
        monotonic time `since`; the seconds from `since` to that connection. TrialError on timeout."""
        if not self._wait_for(lambda: self._connected_at > since, timeout_s):
            raise TrialError(f"the trial driver did not reconnect to the broker within {timeout_s:.0f} s")
        with self._cond:
            return self._connected_at - since

    def wait_online(self, devices: set[str], since: float, timeout_s: float, check: Callable[[], None]) -> None:
        """Wait until each device has published an online presence at or after unix time `since`;
        `check()` runs every 0.1 s (it raises when an agent died). TrialError on timeout."""
        if not self._wait_for(lambda: devices <= self.online(since), timeout_s, check):
            missing = devices - self.online(since)
            raise TrialError(f"{', '.join(sorted(missing))} did not come online within {timeout_s:.0f} s "
                             "(see the agents' logs)")

    def wait_present(self, devices: set[str], timeout_s: float) -> dict[str, Presence | None]:
        """Wait until each device's latest presence (a retained one counts) is online, at most `timeout_s`;
        then each device's latest presence (None: none received)."""
        self._wait_for(lambda: devices <= self.online(0.0), timeout_s)
        with self._cond:
            return {d: self._presence.get(d) for d in sorted(devices)}

    def _wait_for(self, ready: Callable[[], bool], timeout_s: float, check: Callable[[], None] = lambda: None) -> bool:
        """Wait until `ready()` (checked under the lock) or the timeout, running `check()` every POLL_S;
        a requested stop raises."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while not ready():
                self.raise_if_stopped()
                check()
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(POLL_S, left))
        return True

    # stopping --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """For the SIGINT/SIGTERM handler: the main thread's next wait raises KeyboardInterrupt. It only
        sets a flag: a handler that raised, or took a lock, could leave a lock held halfway through an update."""
        self._stop_requested = True

    def raise_if_stopped(self) -> None:
        """KeyboardInterrupt when a stop was requested; called where the main thread waits."""
        if self._stop_requested:
            raise KeyboardInterrupt

    def online(self, since: float) -> set[str]:
        """Devices whose latest presence is online and was published at or after `since`."""
        with self._cond:
            return {d for d, p in self._presence.items() if p.status == "online" and (p.ts or 0) >= since}

    def presence_changes(self) -> list[PresenceChange]:
        """Every presence received, in order."""
        with self._cond:
            return [PresenceChange(round(t - self.t0, 6), d, status) for t, d, status in self._changes]

    # requests --------------------------------------------------------------------------------

    def start_clock(self) -> None:
        """The feeding starts now: `sent_s` counts from here."""
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def send(self, device: str, expert: int, image: np.ndarray, label: int, index: int,
             deadline_ms: int, wait_s: float) -> Request:
        """Publish one image (uint8 [C, H, W]) to `device` (uint8 or fp16 on the wire: `raw_input_encoding` of
        its presence); the agent must start it within `deadline_ms`, and the driver waits `wait_s` for its
        answer."""
        assert self.transport is not None, "connect() first"
        topic = self.topics.infer_request(device)
        with self._cond:
            encoding = raw_input_encoding(self._presence.get(device))
        request = Request(device, index, label, self.elapsed())

        def frame(cid: bytes) -> bytes:  # the Requester calls it before it registers the call and publishes
            payload = encode(ExpertRequest(cid, expert, now_ms() + deadline_ms, self.model_version, self.inbox,
                                           image[None], encoding))
            request.id, request.request_bytes = cid.hex(), publish_packet_size(topic, payload)
            with self._cond:
                self.requests.append(request)
                self._in_flight += 1
            self.events.emit("request", device=device, index=index, id=request.id, bytes=request.request_bytes)
            return payload

        self.requester.send(topic, device, expert, frame, wait_s, request, self._settled)
        return request

    def skip(self, device: str, label: int, index: int, at_s: float) -> None:
        """A sample of a killed device: recorded as not served, never sent."""
        with self._cond:
            self.requests.append(Request(device, index, label, at_s, status=RequestStatus.NOT_SERVED))
        self.events.emit(RequestStatus.NOT_SERVED, device=device, index=index)

    def expire(self) -> None:
        """Pending requests past their wait count as failed (timeout)."""
        self.requester.expire()

    def abandon(self, status: RequestStatus, device: str | None = None) -> None:
        """Every pending request (of `device`, or of all) gets `status`: not served, interrupted."""
        calls = [c for c in self.requester.pending() if device is None or c.context.device == device]
        self.requester.give_up(calls, Fate.CANCELLED, status.value)

    def pending(self) -> int:
        with self._cond:
            return self._in_flight

    def done(self) -> int:
        """Requests settled so far (answered, failed, not served)."""
        with self._cond:
            return len(self.requests) - self._in_flight

    def _settled(self, call: Call[Request]) -> None:
        """Record what became of a request (the transport's thread for a reply, the caller's otherwise)."""
        r, reply = call.context, call.reply
        assert call.fate is not None, "the Requester calls back settled calls only"
        with self._cond:
            # answered, error and timeout are the Fate's values; a cancelled call's detail is its status
            r.status = RequestStatus(call.detail if call.fate == Fate.CANCELLED else call.fate)
            if call.round_trip_s is not None:
                r.rtt_ms, r.reply_bytes = round(1000 * call.round_trip_s, 3), call.reply_bytes
            if isinstance(reply, ErrorResponse):
                r.detail = call.detail
            elif isinstance(reply, ExpertResponse):
                r.probs = reply.probs[0]
                r.predicted = int(r.probs.argmax())
            self._in_flight -= 1
        if isinstance(reply, ErrorResponse):
            self.events.emit(RequestStatus.ERROR, device=r.device, index=r.index, id=r.id, code=r.detail,
                             message=reply.message)
        elif isinstance(reply, ExpertResponse):
            self.events.emit("answer", device=r.device, index=r.index, id=r.id, predicted=r.predicted,
                             label=r.label, rtt_ms=r.rtt_ms)
        else:
            self.events.emit(r.status, device=r.device, index=r.index, id=r.id)

    # transport callbacks (the transport's thread) ---------------------------------------------

    def _on_connection(self, event: ConnectionEvent, detail: str) -> None:
        with self._cond:
            self._connection = (event, detail)
            if event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
                self._connected_at = time.monotonic()
            self._cond.notify_all()
        self.events.emit(f"driver_{event.value}", detail=detail)

    def _publish(self, topic: str, payload: bytes) -> None:
        assert self.transport is not None, "connect() first"
        self.transport.publish(topic, payload)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            kind, target, sender = self.topics.parse(topic)
            if kind == TopicKind.PRESENCE:
                self._on_presence(str(target), payload)
            elif kind == TopicKind.REPLY and target == OPERATOR:
                self.requester.deliver(str(sender), payload, publish_packet_size(topic, payload))
        except ProtocolError:
            self._own_counters.add("malformed")

    def _on_presence(self, device: str, payload: bytes) -> None:
        if not payload:
            return
        presence = decode_presence(payload)
        with self._cond:
            self._presence[device] = presence
            self._changes.append((time.monotonic(), device, presence.status))
            self._cond.notify_all()
        self.events.emit("presence", device=device, status=presence.status, expert=presence.expert)
