"""Answering requests from the wire: admission checks, a bounded queue, one micro-batching worker.

`RequestServer.submit` runs on the transport's thread and never blocks: it decodes and checks a
request (docs/protocol.md sections 7-10) and either answers an ERROR at once (BUSY when the queue
is full) or queues it. The worker takes the oldest request plus as many queued ones as fit in
`max_batch` rows, runs them as ONE model call, and publishes one RESPONSE per request. The same
server serves the expert (`expert/{id}/req`, latents) and local inference (`infer/{me}/req`, pixels).

A computation that waits for something else (an inference waiting for its peer experts) returns
one `Deferred` per request instead of probabilities: the worker parks them and goes on with the
queue, and answers each request when its own part is ready (`wake()` tells the worker) or its
time is up. So one slow or frozen peer delays only the requests that asked it: neither those
queued behind them nor those computed in the same batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.wire.clock import now_ms
from device_agent.wire.events import Counters, EventLog
from device_agent.wire.protocol import (
    MAX_TEXT,
    ErrorCode,
    ErrorResponse,
    ExpertRequest,
    ExpertResponse,
    ProtocolError,
    Topics,
    deadline_error,
    decode,
    encode,
    peek_request_route,
)
from device_agent.wire.tensor_codec import TensorEncoding

Publisher = Callable[[str, bytes], None]  # (topic, payload): QoS 0, not retained
_MAX_U32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class Deferred:
    """Probabilities that are not ready yet: `result()` once `ready()` (or at `until` regardless)."""

    until: float  # time.monotonic() at which it is finished, ready or not
    ready: Callable[[], bool]
    result: Callable[[], np.ndarray]  # float32 probs [n, C]; may block briefly, never on the network


@dataclass(frozen=True)
class Served:
    """What a server computes and which requests it accepts."""

    kind: str  # "expert" or "infer" (thread name, messages)
    expert_id: int
    model_version: str
    row_shape: tuple[int, ...]  # one input without the batch dim
    encodings: tuple[TensorEncoding, ...]
    # (inputs [n, *row_shape] of one batch, the requests they came from, in order) -> float32 probs [n, C],
    # or one Deferred per request (in order) that gives its rows' probabilities later
    compute: Callable[[np.ndarray, Sequence[ExpertRequest]], np.ndarray | list[Deferred]]
    to_input: Callable[[ExpertRequest], np.ndarray] = lambda request: request.latent  # -> compute's
    # input; ValueError means BAD_REQUEST (its text is the reason)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds of a server: rows per request and per model call, queued requests, batching."""

    max_batch: int = 32
    queue_size: int = 64
    microbatch: bool = True  # False: one request per model call (for comparison)


@dataclass(frozen=True)
class _Job:
    request: ExpertRequest
    reply_topic: str  # {inbox}/{me}
    inputs: np.ndarray


@dataclass(frozen=True)
class _Parked:
    jobs: list[_Job]
    deferred: Deferred
    start: float  # time.perf_counter() when its computation began


class RequestServer:
    """Serves one `Served` model on the wire; see the module docstring."""

    def __init__(self, served: Served, limits: ServerLimits, topics: Topics, me: str,
                 publish: Publisher, events: EventLog) -> None:
        self.served, self.limits, self.topics, self.me = served, limits, topics, me
        self.counters = Counters()
        self._publish, self._events = publish, events
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._parked: list[_Parked] = []  # one request each, at most limits.queue_size
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name=f"{served.kind}-server", daemon=True)

    def start(self) -> None:
        """Start the worker."""
        self._worker.start()

    def stop(self) -> None:
        """Stop the worker after its current batch; queued and parked requests are dropped (counted)."""
        with self._cond:
            self._stopping = True
            self.counters.add("abandoned", len(self._queue) + sum(len(p.jobs) for p in self._parked))
            self._queue.clear()
            self._parked.clear()
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join()

    def wake(self) -> None:
        """A parked computation may be ready (any thread; never blocks for long)."""
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict[str, int | float]:
        """Counters plus `dropped` (all reasons) and the mean requests and rows per model call."""
        counts: dict[str, int | float] = dict(self.counters.snapshot())
        counts["dropped"] = sum(v for k, v in counts.items() if k.startswith("dropped_"))
        batches = counts.get("batches", 0)
        counts["mean_batch_size"] = counts.get("batched_requests", 0) / batches if batches else 0.0
        counts["mean_batch_rows"] = counts.get("batched_rows", 0) / batches if batches else 0.0
        return counts

    def submit(self, payload: bytes) -> None:
        """Check one request payload and queue it, or answer an ERROR, or drop it (counted)."""
        self.counters.add("received")
        try:
            msg = decode(payload)
        except ProtocolError as e:
            self._events.malformed(self.served.kind, str(e))
            route = peek_request_route(payload)
            reply_topic = None if route is None else self._reply_topic(route.reply_topic)
            if route is None or reply_topic is None:
                self.counters.add("dropped_malformed" if route is None else "dropped_reply_topic")
                return
            self._error(reply_topic, route.correlation_id, route.expert_id, ErrorCode.BAD_REQUEST, str(e))
            return
        if not isinstance(msg, ExpertRequest):
            self.counters.add("dropped_not_request")  # never answer a reply: no loops
            return
        reply_topic = self._reply_topic(msg.reply_topic)
        if reply_topic is None:
            self.counters.add("dropped_reply_topic")
            return
        refusal = self._refusal(msg)
        if refusal is None:
            try:
                inputs = self.served.to_input(msg)
            except ValueError as e:
                refusal = ErrorCode.BAD_REQUEST, str(e)
        if refusal is not None:
            self._error(reply_topic, msg.correlation_id, msg.expert_id, *refusal)
            return
        with self._cond:
            queued = len(self._queue) < self.limits.queue_size and not self._stopping
            if queued:
                self._queue.append(_Job(msg, reply_topic, inputs))
                self._cond.notify()
        if not queued:
            self._error(reply_topic, msg.correlation_id, msg.expert_id, ErrorCode.BUSY,
                        f"queue full ({self.limits.queue_size} requests)")

    def _reply_topic(self, inbox: str) -> str | None:
        """`{inbox}/{me}` when `inbox` is a reply inbox of this fleet, else None."""
        try:
            return self.topics.reply_from(self.topics.inbox_owner(inbox), self.me)
        except ProtocolError:
            return None

    def _refusal(self, req: ExpertRequest) -> tuple[ErrorCode, str] | None:
        """Why a well-formed request cannot be served, or None."""
        s, n = self.served, len(req.latent)
        if req.expert_id != s.expert_id:
            return ErrorCode.UNKNOWN_EXPERT, f"this device holds expert {s.expert_id}"
        if req.model_version != s.model_version:
            return ErrorCode.WRONG_MODEL_VERSION, f"this device runs model {s.model_version}"
        late = deadline_error(req.deadline_ms, now_ms())
        if late is not None:
            return late, ("deadline passed" if late == ErrorCode.DEADLINE_EXCEEDED
                          else "deadline too far in the future")
        if req.encoding not in s.encodings:
            return ErrorCode.BAD_REQUEST, f"encoding {req.encoding} not accepted ({', '.join(s.encodings)})"
        if req.latent.shape[1:] != s.row_shape:
            want = ", ".join(map(str, ("N", *s.row_shape)))
            return ErrorCode.BAD_REQUEST, f"expected a tensor [{want}], got {list(req.latent.shape)}"
        if n > self.limits.max_batch:
            return ErrorCode.BAD_REQUEST, f"N={n} is more than max_batch={self.limits.max_batch}"
        return None

    def _error(self, topic: str, cid: bytes, expert_id: int, code: ErrorCode, message: str) -> None:
        self.counters.add(code.name.lower())
        text = message.encode("utf-8")[:MAX_TEXT].decode("utf-8", "ignore")
        self._publish(topic, encode(ErrorResponse(cid, code, expert_id, text)))

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    done = [p for p in self._parked if now >= p.deferred.until or p.deferred.ready()]
                    take = bool(self._queue) and len(self._parked) < self.limits.queue_size
                    if done or take:
                        break
                    until = min((p.deferred.until for p in self._parked), default=None)
                    self._cond.wait(None if until is None else max(0.0, until - now))
                for parked in done:
                    self._parked.remove(parked)
                batch = self._take_batch() if take else []
            for parked in done:
                self._finish(parked)
            now_wall = now_ms()
            due = [job for job in batch if job.request.deadline_ms >= now_wall]
            for job in batch:
                if job.request.deadline_ms < now_wall:
                    self._error(job.reply_topic, job.request.correlation_id, job.request.expert_id,
                                ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")
            if due:
                self._run(due)

    def _take_batch(self) -> list[_Job]:
        """The oldest job plus, when micro-batching, every next one that fits in max_batch rows."""
        batch = [self._queue.popleft()]
        rows = len(batch[0].inputs)
        while (self.limits.microbatch and self._queue
               and rows + len(self._queue[0].inputs) <= self.limits.max_batch):
            batch.append(self._queue.popleft())
            rows += len(batch[-1].inputs)
        return batch

    def _run(self, jobs: list[_Job]) -> None:
        """One model call for `jobs`, then one RESPONSE (or INTERNAL error) each, now or once parked."""
        start = time.perf_counter()
        self.counters.add("batches")
        self.counters.add("batched_requests", len(jobs))
        self.counters.add("batched_rows", sum(len(job.inputs) for job in jobs))
        try:
            out = self.served.compute(np.concatenate([job.inputs for job in jobs]), [job.request for job in jobs])
        except Exception as e:  # noqa: BLE001 -- a runtime can raise anything; requesters must still hear
            self._failed(jobs, e)
            return
        if isinstance(out, list):
            with self._cond:
                self._parked += [_Parked([job], deferred, start) for job, deferred in zip(jobs, out, strict=True)]
            return
        self._answer(jobs, out, start)

    def _finish(self, parked: _Parked) -> None:
        try:
            probs = parked.deferred.result()
        except Exception as e:  # noqa: BLE001 -- as in _run
            self._failed(parked.jobs, e)
            return
        self._answer(parked.jobs, probs, parked.start)

    def _answer(self, jobs: list[_Job], probs: np.ndarray, start: float) -> None:
        """One RESPONSE per job (`compute_us` from `start`), or INTERNAL if they cannot be encoded."""
        compute_us = min(round((time.perf_counter() - start) * 1e6), _MAX_U32)
        try:
            sizes = [len(job.inputs) for job in jobs]
            frames = [encode(ExpertResponse(job.request.correlation_id, self.served.expert_id, compute_us, p))
                      for job, p in zip(jobs, np.split(probs, np.cumsum(sizes)[:-1]), strict=True)]
        except Exception as e:  # noqa: BLE001 -- a bad output shape or value must still be answered
            self._failed(jobs, e)
            return
        for job, frame in zip(jobs, frames, strict=True):
            self._publish(job.reply_topic, frame)
        self.counters.add("answered", len(jobs))

    def _failed(self, jobs: list[_Job], e: Exception) -> None:
        self._events.emit("error", where=f"{self.served.kind} server", error=f"{type(e).__name__}: {e}")
        for job in jobs:
            self._error(job.reply_topic, job.request.correlation_id, job.request.expert_id,
                        ErrorCode.INTERNAL, f"{self.served.kind} computation failed")
