"""The trial driver's own MQTT connection: it watches presence, sends inference requests, matches answers.

It is an app in the protocol's sense (docs/protocol.md §1): it publishes raw images on
`infer/{device}/req` with its inbox `reply/operator` (the `operator` account of `nmoe broker --auth`)
and reads the combined probabilities on `reply/operator/{device}`. Pixels travel as fp16, which
holds every integer 0..255 exactly in half the bytes of fp32.
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
    decode,
    decode_presence,
    encode,
    new_correlation_id,
)
from device_agent.wire.transport import ConnectionEvent, Transport, publish_packet_size

POLL_S = 0.1  # how often a wait looks at a requested stop
OPERATOR = "operator"  # the driver's inbox and, with --auth, its broker account


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
    give_up: float = 0.0  # monotonic time after which it counts as failed
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
        self.counters = Counters()
        self.requests: list[Request] = []
        self.t0 = time.monotonic()
        self._pending: dict[bytes, Request] = {}
        self._presence: dict[str, Presence] = {}
        self._changes: list[tuple[float, str, str]] = []  # (monotonic time, device, status)
        self._cond = threading.Condition()
        self._connection: tuple[ConnectionEvent, str] | None = None
        self._connected_at = float("-inf")  # monotonic time of the latest (re)connection
        self._stop_requested = False

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
        """Publish one image (uint8 [C, H, W]) to `device`; the agent must start it within
        `deadline_ms`, and the driver waits `wait_s` for its answer."""
        cid = new_correlation_id()
        topic = self.topics.infer_request(device)
        payload = encode(ExpertRequest(cid, expert, now_ms() + deadline_ms, self.model_version, self.inbox,
                                       image[None].astype(np.float32), "fp16"))
        request = Request(device, index, label, self.elapsed(), cid.hex(), time.monotonic() + wait_s,
                          publish_packet_size(topic, payload))
        with self._cond:
            self._pending[cid] = request
            self.requests.append(request)
        self.events.emit("request", device=device, index=index, id=request.id, bytes=request.request_bytes)
        assert self.transport is not None, "connect() first"
        self.transport.publish(topic, payload)
        return request

    def skip(self, device: str, label: int, index: int, at_s: float) -> None:
        """A sample of a killed device: recorded as not served, never sent."""
        with self._cond:
            self.requests.append(Request(device, index, label, at_s, status=RequestStatus.NOT_SERVED))
        self.events.emit(RequestStatus.NOT_SERVED, device=device, index=index)

    def expire(self) -> None:
        """Pending requests past their wait count as failed (timeout)."""
        now = time.monotonic()
        self._settle(lambda r: now > r.give_up, RequestStatus.TIMEOUT)

    def abandon(self, status: RequestStatus, device: str | None = None) -> None:
        """Every pending request (of `device`, or of all) gets `status`: not served, interrupted."""
        self._settle(lambda r: device is None or r.device == device, status)

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def done(self) -> int:
        """Requests settled so far (answered, failed, not served)."""
        with self._cond:
            return len(self.requests) - len(self._pending)

    def _settle(self, which: Callable[[Request], bool], status: RequestStatus) -> None:
        with self._cond:
            settled = [(cid, r) for cid, r in self._pending.items() if which(r)]
            for cid, r in settled:
                del self._pending[cid]
                r.status = status
        for _, r in settled:
            self.events.emit(status, device=r.device, index=r.index, id=r.id)

    # transport callbacks (the transport's thread) ---------------------------------------------

    def _on_connection(self, event: ConnectionEvent, detail: str) -> None:
        with self._cond:
            self._connection = (event, detail)
            if event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
                self._connected_at = time.monotonic()
            self._cond.notify_all()
        self.events.emit(f"driver_{event.value}", detail=detail)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            kind, target, sender = self.topics.parse(topic)
            if kind == TopicKind.PRESENCE:
                self._on_presence(str(target), payload)
            elif kind == TopicKind.REPLY and target == OPERATOR:
                self._on_reply(str(sender), decode(payload), publish_packet_size(topic, payload))
        except ProtocolError:
            self.counters.add("malformed")

    def _on_presence(self, device: str, payload: bytes) -> None:
        if not payload:
            return
        presence = decode_presence(payload)
        with self._cond:
            self._presence[device] = presence
            self._changes.append((time.monotonic(), device, presence.status))
            self._cond.notify_all()
        self.events.emit("presence", device=device, status=presence.status, expert=presence.expert)

    def _on_reply(self, sender: str, reply: object, size: int) -> None:
        if not isinstance(reply, ExpertResponse | ErrorResponse):
            self.counters.add("not_a_reply")
            return
        with self._cond:
            request = self._pending.get(reply.correlation_id)
            if request is not None and request.device != sender:  # only the device asked may answer
                self.counters.add("wrong_sender")
                return
            if request is not None:
                del self._pending[reply.correlation_id]
                _record_reply(request, reply, round(1000 * (self.elapsed() - request.sent_s), 3), size)
        if request is None:
            self.counters.add("late_or_unknown_replies")
        elif isinstance(reply, ErrorResponse):
            self.events.emit(RequestStatus.ERROR, device=request.device, index=request.index, id=request.id,
                             code=request.detail, message=reply.message)
        else:
            self.events.emit("answer", device=request.device, index=request.index, id=request.id,
                             predicted=request.predicted, label=request.label, rtt_ms=request.rtt_ms)


def _record_reply(request: Request, reply: ExpertResponse | ErrorResponse, rtt_ms: float, size: int) -> None:
    """Fill in what the answer says: the prediction, or the error code."""
    request.rtt_ms, request.reply_bytes = rtt_ms, size
    if isinstance(reply, ErrorResponse):
        request.status, request.detail = RequestStatus.ERROR, reply.code.name.lower()
        return
    request.status, request.probs = RequestStatus.ANSWERED, reply.probs[0]
    request.predicted = int(reply.probs[0].argmax())
