"""The coordinator's MQTT connection: who is live, COMMANDs out, RESULTs in (docs/federated.md).

`ask(device, command)` publishes a COMMAND (chunked when large) to `train/{device}/cmd` and blocks
until that device's RESULT with the same task id arrives, or the command's deadline passes
(`TaskTimeout`); `send(device, command)` publishes it and returns the wait as a call of its own, so
that one thread can send a round's COMMANDs, then collect their RESULTs. Results are matched like
replies (wire.requester): by task id, from the device that was asked (the topic's device), for the
same op, job and round; anything else is dropped and counted (unknown or late, wrong sender, stale,
duplicate, malformed). A COMMAND still waiting is published again when its device is born again (it
reconnected: QoS 1 messages to a clean session are lost) and when the coordinator itself reconnects;
a device answers a repeated task id with its stored RESULT, so nothing is computed twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

from device_agent.wire.clock import now_ms
from device_agent.wire.events import Counters, EventLog
from device_agent.wire.fleet_view import FleetView
from device_agent.wire.protocol import Presence, ProtocolError, TopicKind, Topics, decode_presence
from device_agent.wire.training_frames import Command, Result, Status
from device_agent.wire.training_link import COORDINATOR, TrainingInbox, send_training
from device_agent.wire.transport import ConnectionEvent, Transport
from toolkit.federated.executor import Pending


class TaskFailed(RuntimeError):
    """A device answered a COMMAND with `error` or `refused` (the message says why)."""


class TaskTimeout(TimeoutError):
    """No RESULT before the COMMAND's deadline."""


@dataclass
class _Waiting:
    device: str
    command: Command
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None
    sent_bytes: int = 0
    result_bytes: int = 0


@dataclass(frozen=True)
class Traffic:
    """Bytes of PUBLISH packets: commands sent, results received (framing and chunking included)."""

    sent: int
    received: int


class FleetLink:
    """See the module docstring."""

    def __init__(self, topics: Topics, max_message: int, events: EventLog | None = None) -> None:
        self.topics, self.max_message = topics, max_message
        self.events = events or EventLog()
        self.counters = Counters()
        self.fleet = FleetView(COORDINATOR, self.events)
        self.transport: Transport | None = None
        self.inbox = TrainingInbox(self._on_result)
        self._lock = threading.Condition()
        self._waiting: dict[bytes, _Waiting] = {}
        self._born: dict[str, tuple[float, str | None]] = {}  # device -> (ts, model) of its online presence
        self._seen: set[str] = set()  # devices that were online at some point
        self._live: Mapping[int, str] | None = None  # live()'s answer until the next presence arrives
        self._connected = threading.Event()
        self._connection: tuple[ConnectionEvent, str] | None = None
        self._sent = self._received = 0

    # connection -------------------------------------------------------------------------------------

    def connect(self, transport: Transport, timeout_s: float) -> None:
        """Connect (no will), watch presence and every device's results; ConnectionError if that fails."""
        self.transport = transport
        transport.subscribe(self.topics.presence_filter(), qos=1)
        transport.subscribe(self.topics.train_result_filter(), qos=1)
        transport.connect(None, self._on_message, self._on_connection)
        if not self._connected.wait(timeout_s):
            state = self._connection
            detail = f"{state[0].value}: {state[1]}" if state else "no answer"
            raise ConnectionError(f"the coordinator cannot connect to the broker ({detail})")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def traffic(self) -> Traffic:
        with self._lock:
            return Traffic(self._sent, self._received)

    # who is live ------------------------------------------------------------------------------------

    def live(self) -> Mapping[int, str]:
        """Expert (= client) id -> the online device holding it (any model version); read-only, computed
        once per change of presence (a round asks it once per device: O(N) each time made rounds O(N^2))."""
        with self._lock:
            if self._live is None:
                self._live = MappingProxyType({p.expert: p.device for p in self.fleet.online()})
            return self._live

    def wait_live(self, experts: set[int], timeout_s: float, check: Callable[[], None] = lambda: None) -> set[int]:
        """Wait until every expert in `experts` has an online device (or the timeout); those that have."""
        end = time.monotonic() + timeout_s
        while True:
            have = set(self.live()) & experts
            if have == experts or time.monotonic() >= end:
                return have
            check()
            time.sleep(0.1)

    # tasks ----------------------------------------------------------------------------------------

    def ask(self, device: str, command: Command) -> Result:
        """Send `command` to `device` and wait for its RESULT (see the module docstring)."""
        return self.send(device, command)(None)

    def send(self, device: str, command: Command) -> Pending[Result]:
        """Send `command` to `device` now; the call returned waits for its RESULT, until the command's
        deadline or the seconds it is given, whichever comes first (TaskTimeout), and stops waiting then."""
        waiting = _Waiting(device, command)
        with self._lock:
            self._waiting[command.task_id] = waiting
        try:
            self._send(waiting)
        except BaseException:
            self._forget(waiting)
            raise
        return partial(self._result, waiting)

    def _result(self, waiting: _Waiting, timeout: float | None) -> Result:
        command = waiting.command
        end = command.deadline_ms if timeout is None else min(command.deadline_ms, now_ms() + timeout * 1000)
        try:
            while not waiting.done.wait(max(0.0, (end - now_ms()) / 1000)):
                if now_ms() >= end:
                    self.counters.add("timeouts")
                    raise TaskTimeout(f"{waiting.device}: no result for {command.op.value} {command.job} "
                                      f"round {command.round} before its deadline")
        finally:
            self._forget(waiting)
        result = waiting.result
        assert result is not None
        if result.status != Status.OK:
            raise TaskFailed(f"{waiting.device} {result.status.value} {command.op.value} {command.job} round "
                             f"{command.round}: {result.error}")
        return result

    def _forget(self, waiting: _Waiting) -> None:
        with self._lock:
            self._waiting.pop(waiting.command.task_id, None)

    def _send(self, waiting: _Waiting) -> None:
        assert self.transport is not None, "connect() first"
        sent = send_training(self.transport, self.topics.train_command(waiting.device), waiting.command,
                             self.max_message)
        with self._lock:
            waiting.sent_bytes += sent
            self._sent += sent
        self.counters.add(f"bytes_sent_{waiting.command.op.value}", sent)

    def _resend(self, which: Callable[[_Waiting], bool], why: str) -> None:
        with self._lock:
            again = [w for w in self._waiting.values() if not w.done.is_set() and which(w)]
        for w in again:
            self.counters.add("resent")
            self.events.emit("resend", device=w.device, op=w.command.op.value, job=w.command.job,
                             round=w.command.round, why=why)
            self._send(w)

    # incoming (the transport's thread) ----------------------------------------------------------------

    def _on_connection(self, event: ConnectionEvent, detail: str) -> None:
        self._connection = (event, detail)
        if event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
            self._connected.set()
            if event == ConnectionEvent.RECONNECTED:
                threading.Thread(target=self._resend, args=(lambda w: True, "coordinator reconnected"),
                                 daemon=True).start()
        elif event == ConnectionEvent.DISCONNECTED:
            self._connected.clear()
        self.events.emit(f"coordinator_{event.value}", detail=detail)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            kind, target, _ = self.topics.parse(topic)
        except ProtocolError:
            self.counters.add("dropped_topic")
            return
        if kind == TopicKind.PRESENCE:
            self._on_presence(str(target), payload)
        elif kind == TopicKind.TRAIN_RESULT:
            self.inbox.deliver(str(target), topic, payload)

    def _on_presence(self, device: str, payload: bytes) -> None:
        status = self.fleet.update(device, payload)
        with self._lock:
            self._live = None
        if status != "online":
            self._born.pop(device, None)  # offline: its next online presence is a rebirth
            return
        try:
            presence: Presence = decode_presence(payload)
        except ProtocolError:
            return
        previous = self._born.get(device)
        self._born[device] = (presence.ts or 0.0, presence.model)
        # born again (a new connection, same model) or back after being offline: what it was sent may be lost;
        # a new model version alone (a commit) is not a new connection
        again = previous is None and device in self._seen or \
            previous is not None and (presence.ts or 0.0) > previous[0] and presence.model == previous[1]
        self._seen.add(device)
        if again:
            threading.Thread(target=self._resend, args=(lambda w: w.device == device, f"{device} reconnected"),
                             daemon=True).start()

    def _on_result(self, sender: str, msg: Command | Result, nbytes: int) -> None:
        if not isinstance(msg, Result):
            self.counters.add("dropped_not_result")
            return
        with self._lock:
            self._received += nbytes
            waiting = self._waiting.get(msg.task_id)
            if waiting is None:
                self.counters.add("dropped_unknown_or_late")
                return
            c = waiting.command
            if sender != waiting.device:
                self.counters.add("dropped_wrong_sender")
                return
            if (msg.op, msg.run, msg.job, msg.round) != (c.op, c.run, c.job, c.round):
                self.counters.add("dropped_stale")
                return
            if waiting.done.is_set():
                self.counters.add("dropped_duplicate")
                return
            waiting.result, waiting.result_bytes = msg, nbytes
            waiting.done.set()
        self.counters.add("results")
        self.counters.add(f"bytes_received_{msg.op.value}", nbytes)
