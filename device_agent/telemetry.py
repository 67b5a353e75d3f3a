"""The agent's side of the operator's channel: periodic telemetry, the drain command, on-device accuracy.

`DeviceTelemetry` attaches to an `Agent` whose transport is a `TappedTransport` and whose event log
is a `TelemetryEvents` (`nmoe agent` sets both up); the agent itself knows nothing of it:

- every `period_s` (and at once after a drain starts or ends, and a last time at `stop`) it publishes
  a `Telemetry` (docs/protocol.md §15) on `telemetry/{device}`: the agent's counters, the latency of
  the inferences since the previous one, CPU and memory of the process, the tap's bytes and reconnects;
- a `Drain` on `drain/{device}` makes the device stop serving for a while: it publishes its offline
  presence (peers re-route, an operator stops feeding it), lets the requests already queued finish,
  drops new requests on its request topics, and publishes its online presence again when the time is
  up (or at once for `for_s` 0). A reconnect while drained publishes the offline presence, not the birth;
- with labelled samples (`nmoe agent --eval-samples FILE`) it classifies them with the fleet, one
  input per inference at `eval_rate` per second (not while drained), and reports how many were right.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.wire.events import EventLog
from device_agent.wire.protocol import Presence, ProtocolError, encode_presence
from device_agent.wire.tap import TappedTransport
from device_agent.wire.telemetry import (
    ERROR_NAMES,
    MAX_ROUTING,
    LatencyWindow,
    OnDeviceEval,
    Telemetry,
    decode_drain,
    drain_topic,
    encode_telemetry,
    telemetry_topic,
)
from device_agent.wire.transport import Publication

if TYPE_CHECKING:
    from device_agent.agent import Agent

DEFAULT_PERIOD_S = 10.0  # telemetry is ~500 B: ~50 B/s (docs/results/field.md measures its share)
DEFAULT_EVAL_RATE = 5.0  # inputs per second
PEERS_TIMEOUT_S = 30.0  # on-device evaluation waits this long for the fleet before it starts anyway


class TelemetryEvents(EventLog):
    """An `EventLog` that also keeps what telemetry reports of the `inference` events: the latencies since
    the last `window()`, the inputs each expert's output was combined into, and on-device eval results."""

    def __init__(self, path: Path | None = None, echo: Any = None) -> None:
        super().__init__(path, echo)
        self._observed = threading.Lock()
        self._latencies: list[float] = []
        self.routing: Counter[int] = Counter()

    def emit(self, event: str, **fields: Any) -> None:
        super().emit(event, **fields)
        if event != "inference":
            return
        try:
            latency = float(fields["latency_ms"]["total"])
            requests = fields.get("requests") or {}
            # an inference request counts once per expert combined for it; a direct call once per input
            routing = Counter(int(e) for experts in requests.values() for e in experts)
            if not requests:
                routing.update({int(e): int(fields["inputs"]) for e in fields["answered"]})
        except (KeyError, TypeError, ValueError):  # an event telemetry does not understand: never the agent's problem
            return
        with self._observed:
            self._latencies.append(latency)
            self.routing.update(routing)

    def window(self) -> LatencyWindow:
        """Latency percentiles of the inferences since the previous call."""
        with self._observed:
            values, self._latencies = self._latencies, []
        if not values:
            return LatencyWindow(0)
        p50, p95, p99 = (round(float(x), 3) for x in np.percentile(values, [50, 95, 99]))
        return LatencyWindow(len(values), p50, p95, p99)

    def routing_counts(self) -> dict[int, int]:
        """Expert -> inputs, the MAX_ROUTING most used."""
        with self._observed:
            return dict(sorted(self.routing.most_common(MAX_ROUTING)))


@dataclass(frozen=True)
class EvalSamples:
    """Labelled raw inputs: uint8 `images` [N, *input shape] and `labels` [N]."""

    images: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls, path: Path, input_shape: tuple[int, ...], num_classes: int) -> EvalSamples:
        """An .npz with `images` and `labels` (a bundle's samples.npz is one); OSError naming the file."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                images, labels = npz["images"], npz["labels"]
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise OSError(f"--eval-samples {path}: not an .npz with `images` and `labels` ({e})") from None
        if (images.dtype != np.uint8 or images.shape[1:] != tuple(input_shape) or labels.ndim != 1
                or len(labels) != len(images) or not len(labels) or labels.dtype.kind not in "iu"
                or labels.min() < 0 or labels.max() >= num_classes):
            raise OSError(f"--eval-samples {path}: expected uint8 images [N, {', '.join(map(str, input_shape))}] "
                          f"and N integer labels 0..{num_classes - 1} (N >= 1), got images {images.dtype} "
                          f"{list(images.shape)} and labels {labels.dtype} {list(labels.shape)}")
        return cls(images, labels.astype(np.int64))


class DeviceTelemetry:
    """Telemetry publisher, drain handler and on-device evaluator of one agent (module docstring)."""

    def __init__(self, agent: Agent, tap: TappedTransport, events: TelemetryEvents,
                 period_s: float = DEFAULT_PERIOD_S, eval_samples: EvalSamples | None = None,
                 eval_rate: float = DEFAULT_EVAL_RATE) -> None:
        self.agent, self.tap, self.events, self.period_s = agent, tap, events, period_s
        self.eval_samples, self.eval_rate = eval_samples, eval_rate
        self.topic = telemetry_topic(agent.topics, agent.me)
        self._presence_topic = agent.topics.presence(agent.me)
        self._request_topics = {agent.topics.expert_request(agent.expert_id), agent.topics.infer_request(agent.me)}
        self._cond = threading.Condition()
        self._drained_until: float | None = None  # time.monotonic()
        self._publish_now = False
        self._stopping = False
        self._seq = 0
        self._eval = OnDeviceEval(0, 0) if eval_samples is not None else None
        self._started = time.monotonic()
        self._cpu = (time.monotonic(), time.process_time())
        self._threads = [threading.Thread(target=self._run, name="telemetry", daemon=True)]
        if eval_samples is not None:
            self._threads.append(threading.Thread(target=self._evaluate, name="eval-samples", daemon=True))

    def start(self) -> None:
        """Hook into the transport (before `agent.start()` connects it) and start publishing."""
        self.tap.tap(drain_topic(self.agent.topics, self.agent.me), self._on_drain, qos=1)
        self.tap.on_receive(lambda topic: topic not in self._request_topics or not self.drained)
        self.tap.on_publish(self._while_drained)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Publish the final telemetry (before `agent.stop()` disconnects) and stop the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._publish(final=True)

    @property
    def drained(self) -> bool:
        with self._cond:
            return self._drained_until is not None

    # the publisher thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self.agent.wait_connected(self.period_s)
        next_at = time.monotonic()
        while True:
            with self._cond:
                while not (self._stopping or self._publish_now or time.monotonic() >= next_at
                           or self._resume_due()):
                    until = min(next_at, self._drained_until or next_at)
                    self._cond.wait(max(0.0, until - time.monotonic()))
                if self._stopping:
                    return
                resume, self._publish_now = self._resume_due(), False
                if resume:
                    self._drained_until = None
            if resume:
                self._set_presence(online=True)
                self.events.emit("drain_end", device=self.agent.me)
            self._publish()
            next_at = time.monotonic() + self.period_s

    def _resume_due(self) -> bool:
        return self._drained_until is not None and time.monotonic() >= self._drained_until

    def _publish(self, final: bool = False) -> None:
        try:
            payload = encode_telemetry(self.snapshot(final))
        except Exception as e:  # noqa: BLE001 -- a counter out of range, a bug: say so, never stop the agent
            self.events.emit("error", where="telemetry", error=f"{type(e).__name__}: {e}")
            return
        self.tap.publish(self.topic, payload)

    def snapshot(self, final: bool = False) -> Telemetry:
        """The telemetry to publish now (it takes the latency window and advances `seq`)."""
        stats = self.agent.stats()
        servers = {"expert": stats["expert_server"], "infer": stats["infer_server"]}
        replies = stats["replies"]
        now, cpu = time.monotonic(), time.process_time()
        (was, was_cpu), self._cpu = self._cpu, (now, cpu)
        errors_sent: Counter[str] = Counter()
        for s in servers.values():
            errors_sent.update({n: int(s.get(n, 0)) for n in ERROR_NAMES})
        errors_received = {n: int(replies.get(f"error_{n}", 0)) for n in ERROR_NAMES}
        errors_received["timeout"] = int(replies.get("timed_out", 0))
        with self._cond:
            seq, self._seq = self._seq, self._seq + 1
            eval_ = self._eval
        return Telemetry(
            device=self.agent.me, seq=seq, ts=round(time.time(), 3), period_s=self.period_s,
            uptime_s=round(now - self._started, 3), model=self.agent.model_version,
            status="drained" if self.drained else "serving",
            served={k: int(s.get("answered", 0)) for k, s in servers.items()}, made=int(replies.get("sent", 0)),
            inputs=int(stats["agent"].get("inputs", 0)), errors_sent=_positive(errors_sent),
            errors_received=_positive(errors_received), latency_ms=self.events.window(),
            queue={k: _in_server(s) for k, s in servers.items()},
            cpu_pct=round(100 * (cpu - was_cpu) / max(now - was, 1e-6), 2), rss_bytes=_rss_bytes(),
            reconnects=self.tap.reconnects, bytes_sent=self.tap.bytes_sent, bytes_received=self.tap.bytes_received,
            routing=self.events.routing_counts(), eval=eval_, final=final)

    # drain ----------------------------------------------------------------------------------------

    def _on_drain(self, topic: str, payload: bytes) -> None:
        """A drain command (the transport's thread)."""
        try:
            drain = decode_drain(payload)
            if drain.device != self.agent.me:
                raise ProtocolError(f"drain command for {drain.device} on {self.agent.me}'s topic")
        except ProtocolError as e:
            self.events.malformed("drain", str(e), topic)
            return
        with self._cond:
            self._drained_until = time.monotonic() + drain.for_s if drain.for_s > 0 else None
            self._publish_now = True
            self._cond.notify_all()
        self._set_presence(online=drain.for_s == 0)
        self.events.emit("drain", device=self.agent.me, for_s=drain.for_s)

    def _set_presence(self, online: bool) -> None:
        presence = self.agent.presence() if online else Presence.offline(self.agent.me, self.agent.expert_id)
        self.tap.publish(self._presence_topic, encode_presence(presence), qos=1, retain=True)

    def _while_drained(self, p: Publication) -> Publication | None:
        """While drained, the agent's birth presence (on a reconnect) goes out as the offline one."""
        if p.topic == self._presence_topic and self.drained:
            return Publication(p.topic, encode_presence(Presence.offline(self.agent.me, self.agent.expert_id)),
                               qos=1, retain=True)
        return p

    # on-device evaluation -------------------------------------------------------------------------

    def _evaluate(self) -> None:
        samples = self.eval_samples
        assert samples is not None
        self.agent.wait_for_experts(set(range(self.agent.bundle.manifest.num_experts)), PEERS_TIMEOUT_S)
        for image, label in zip(samples.images, samples.labels, strict=True):
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._drained_until is None)
                if self._cond.wait_for(lambda: self._stopping, 1 / self.eval_rate):
                    return
            result = self.agent.infer(image[None])
            with self._cond:
                assert self._eval is not None
                self._eval = OnDeviceEval(self._eval.samples + 1,
                                          self._eval.correct + int(result.labels[0] == label))


def _in_server(s: dict[str, int | float]) -> int:
    """Requests a server accepted and has not answered yet (queued, being computed, or waiting for peers)."""
    ended = s.get("answered", 0) + sum(s.get(n, 0) for n in ERROR_NAMES) + s.get("dropped", 0) + s.get("abandoned", 0)
    return max(0, int(s.get("received", 0) - ended))


def _positive(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(counts.items()) if v > 0}


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

