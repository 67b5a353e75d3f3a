"""The device agent: serves its expert and local inference, and classifies with the whole fleet.

`Agent.infer(images)`: preprocess -> extractor -> gate (or random routing) -> top-k among the live
experts (suspect peers left out) -> its own expert (and a bundle's shared expert, which is always live)
in-process while the other chosen experts are asked concurrently over the transport (one REQUEST per expert, at most max_batch rows each) ->
combine with the gate weights, renormalized over the experts that answered before the deadline.
A row whose chosen experts all failed is answered by the device's own expert, so an inference
never fails while the device itself works. `begin` + `finish` are the two halves of `infer`
around the wait for the peers.

Threads: the transport's thread handles every incoming message (presence, requests are only
checked and queued, replies are matched by the `Requester`); one worker per `RequestServer` runs
the models; `infer` runs on the caller's thread. For `infer/{me}/req` the infer server's worker
runs `begin` and parks the inference (a `Deferred`) until its peers have answered or its deadline
passed, serving the next requests meanwhile: an inference waits only for the experts it asked.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from device_agent.bundle import Bundle
from device_agent.device_models import RUNTIME_NAMES, DeviceModels, model_version
from device_agent.nmoe_local import combine, preprocess, softmax
from device_agent.routing import Route, Suspects, gate_route, random_live_route, with_fallback
from device_agent.sample_check import check_against_samples
from device_agent.serving import Deferred, RequestServer, Served, ServerLimits
from device_agent.wire.clock import now_ms
from device_agent.wire.events import Counters, EventLog
from device_agent.wire.fleet_view import FleetView
from device_agent.wire.protocol import (
    PROTOCOL_VERSIONS,
    Caps,
    ExpertRequest,
    ExpertResponse,
    Presence,
    ProtocolError,
    RawInput,
    TopicKind,
    Topics,
    encode,
    encode_presence,
    raw_input_error,
)
from device_agent.wire.requester import Call, Fate, Requester
from device_agent.wire.tensor_codec import ENCODINGS, TENSOR_ENCODINGS, Encoding
from device_agent.wire.transport import ConnectionEvent, Publication, Transport, publish_packet_size


@dataclass(frozen=True)
class AgentConfig:
    """Fleet namespace and the knobs of serving and requesting."""

    prefix: str = "nmoe"
    fleet: str = "default"
    latent_encoding: Encoding = "fp32"  # sent to peers that accept it (fp32 otherwise)
    deadline_ms: int = 1000  # how long an inference waits for peer experts
    limits: ServerLimits = field(default_factory=ServerLimits)
    seed: int = 0  # random routing: the generator is seeded [seed, expert_id], as in LocalNMoE
    suspect_ms: int = 2000  # a peer that missed a deadline is avoided this long (doubling per miss, max 30 s)
    busy_backoff_ms: int = 250  # a peer that answered BUSY is avoided this long
    check_samples: bool = True  # refuse to start (BundleError) when the models do not reproduce samples.npz


@dataclass(frozen=True)
class InferenceResult:
    """One `Agent.infer`: the prediction and how the fleet produced it."""

    id: str
    labels: np.ndarray  # [N] int64
    probs: np.ndarray  # [N, C] float32
    experts: np.ndarray  # [N, k] chosen after re-routing; fallback rows have the own expert first
    weights: np.ndarray  # [N, k] float32, as combined (0 for an expert that did not answer)
    answered: tuple[int, ...]  # experts whose outputs were combined (own included)
    missing: dict[int, str]  # chosen expert -> why it is not combined (timeout, busy, offline...)
    rerouted: dict[int, int]  # unavailable expert -> inputs routed elsewhere before sending
    avoided: tuple[int, ...]  # live experts left out of routing because their device is suspect
    zero_weight_skipped: int  # (input, peer expert) pairs not asked: the gate weight was exactly 0
    fallback_rows: int  # inputs that lost every chosen expert and got the own expert alone
    latency_ms: dict[str, float]  # extract, route, send, own_expert, peers (send to last reply), total
    remote_ms: dict[int, float]  # round trip per peer expert that answered
    bytes_sent: int  # MQTT packets of this inference's requests
    bytes_received: int  # MQTT packets of the replies matched to them


@dataclass(frozen=True)
class Installed:
    """The models a device infers and serves with, at one model version (swapped as a whole)."""

    bundle: Bundle
    models: DeviceModels
    version: str


UNTRAINED = "untrained"  # the presence's model while a device has no models yet (never a real version)


@dataclass
class PendingInference:
    """An inference between `begin` and `finish`: what was computed and asked so far."""

    inst: Installed  # the models it began with (a version switch does not change them midway)
    requests: Sequence[ExpertRequest]
    z: np.ndarray  # latents [N, D]
    route: Route
    idx: np.ndarray  # [N, k] experts; `finish` puts the own expert first in fallback rows
    weights: np.ndarray  # [N, k]; renormalized by `finish` over the answers
    avoided: tuple[int, ...]
    outputs: dict[int, np.ndarray]  # expert -> probs [N, C] (rows it was asked for)
    have: dict[int, np.ndarray]  # expert -> [N] bool: rows whose output is in
    missing: dict[int, str]
    skipped: np.ndarray  # [N, k] bool: peer choices not asked because their weight is exactly 0
    calls: list[Call[np.ndarray]]  # context: the rows each call asked for
    until: float  # time.monotonic() when the peers' deadline passes
    bytes_sent: int
    marks: dict[str, float]  # time.perf_counter() at start, extracted, routed, sent, own_done

    def calls_for(self, rows: slice) -> list[Call[np.ndarray]]:
        """The calls that asked for any of `rows`."""
        a, b, _ = rows.indices(len(self.z))
        return [c for c in self.calls if ((c.context >= a) & (c.context < b)).any()]

    def ready(self, rows: slice = slice(None)) -> bool:
        """Every peer asked for `rows` has answered (or failed)."""
        return all(c.fate is not None for c in self.calls_for(rows))


class Agent:
    """One device: its bundle's models, a transport, and the fleet it sees through presence.

    BundleError at construction when its models do not reproduce the bundle's samples.npz
    (`sample_check`; off with `AgentConfig(check_samples=False)`). A device that takes part in
    federated training may start without a bundle (`bundle=None`, `device` and `expert` given): it
    serves nothing until `install` gives it models (its presence says model "untrained").
    """

    def __init__(self, bundle: Bundle | None, transport: Transport, models: DeviceModels | None,
                 config: AgentConfig | None = None, events: EventLog | None = None,
                 device: str | None = None, expert: int | None = None) -> None:
        self.transport = transport
        self.config = config or AgentConfig()
        self.events = events or EventLog()
        self._installed: Installed | None = None
        if bundle is not None and models is not None:
            if self.config.check_samples:
                check_against_samples(bundle, models)
            self._installed = Installed(bundle, models, model_version(bundle))
            self.me, self.expert_id = bundle.manifest.device_id, bundle.manifest.expert_id
        elif device is not None and expert is not None:
            self.me, self.expert_id = device, expert
        else:
            raise ValueError("an agent needs a bundle and its models, or a device id and expert id")
        self.training: Callable[[str, bytes], None] | None = None  # handler of train/{me}/cmd
        self.topics = Topics(self.config.prefix, self.config.fleet)
        self.inbox = self.topics.reply(self.me)  # ProtocolError for a device id the protocol refuses
        self.fleet = FleetView(self.me, self.events)
        self.requester: Requester[np.ndarray] = Requester(self._publish, self.events)
        self.suspects = Suspects(self.config.suspect_ms / 1000, self.config.busy_backoff_ms / 1000)
        self.counters = Counters()
        self.connected = threading.Event()
        self._rng = np.random.default_rng([self.config.seed, self.expert_id])
        self._rng_lock = threading.Lock()
        self._ids = itertools.count()
        limits = self.config.limits
        self.expert_server = RequestServer(None, limits, self.topics, self.me, self._publish, self.events, "expert")
        self.infer_server = RequestServer(None, limits, self.topics, self.me, self._publish, self.events, "infer")
        if self._installed is not None:
            self._serve(self._installed)

    # the models ----------------------------------------------------------------------------------

    @property
    def bundle(self) -> Bundle:
        return self._require().bundle

    @property
    def models(self) -> DeviceModels:
        return self._require().models

    @property
    def model_version(self) -> str:
        """The installed models' version ("untrained" before any)."""
        return self._installed.version if self._installed is not None else UNTRAINED

    def _require(self) -> Installed:
        if self._installed is None:
            raise RuntimeError(f"{self.me} has no models yet (it is waiting for federated training)")
        return self._installed

    def _serve(self, inst: Installed) -> None:
        m = inst.bundle.manifest
        self.expert_server.install(Served("expert", self.expert_id, inst.version, (m.latent_dim,), ENCODINGS,
                                          lambda z, _requests: softmax(inst.models.expert.run(z))))
        self.infer_server.install(Served("infer", self.expert_id, inst.version, tuple(m.input.shape),
                                         TENSOR_ENCODINGS, self._serve_inference, to_input=_pixels))

    def install(self, bundle: Bundle, models: DeviceModels) -> None:
        """Switch to new models (a model version commit): serve the new version, stop serving the old
        one, announce the new presence. Inferences already begun finish with the models they began with."""
        if bundle.manifest.expert_id != self.expert_id or bundle.manifest.device_id != self.me:
            raise ValueError(f"bundle of {bundle.manifest.device_id}/expert {bundle.manifest.expert_id} "
                             f"is not this device's ({self.me}/expert {self.expert_id})")
        old, new = self._installed, Installed(bundle, models, model_version(bundle))
        self._serve(new)
        self._installed = new
        if old is not None and old.version != new.version:
            self.expert_server.retire(old.version)
            self.infer_server.retire(old.version)
        self.events.emit("install", device=self.me, model=new.version, previous=old.version if old else None)
        if self.connected.is_set():
            self._publish_presence()

    def serve_expert_version(self, version: str, latent_dim: int,
                             compute: Callable[[np.ndarray], np.ndarray]) -> None:
        """Also answer expert requests of `version` with `compute(latents) -> probs` (federated
        training: the expert just trained, before any bundle holds it)."""
        self.expert_server.install(Served("expert", self.expert_id, version, (latent_dim,), ENCODINGS,
                                          lambda z, _requests: compute(z)))

    def retire_version(self, version: str) -> None:
        """Stop answering expert requests of `version` (not the installed models' version)."""
        if version != self.model_version:
            self.expert_server.retire(version)

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving and connect (in the background; `wait_connected` waits for it)."""
        self.expert_server.start()
        self.infer_server.start()
        self.transport.subscribe(self.topics.presence_filter(), qos=1)
        self.transport.subscribe(self.topics.expert_request(self.expert_id))
        self.transport.subscribe(self.topics.infer_request(self.me))
        self.transport.subscribe(self.topics.reply_filter(self.me))
        if self.training is not None:
            self.transport.subscribe(self.topics.train_command(self.me), qos=1)
        offline = encode_presence(Presence.offline(self.me, self.expert_id))
        self.transport.connect(Publication(self.topics.presence(self.me), offline, qos=1, retain=True),
                               self._on_message, self._on_connection)

    def stop(self) -> None:
        """Publish the offline presence, disconnect, stop the servers, log the counters."""
        offline = encode_presence(Presence.offline(self.me, self.expert_id))
        self.transport.close(Publication(self.topics.presence(self.me), offline, qos=1, retain=True))
        self.connected.clear()
        self.expert_server.stop()
        self.infer_server.stop()
        self.events.emit("counters", device=self.me, counters=self.stats())
        self.events.emit("stop", device=self.me)

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the transport is connected; False on timeout."""
        return self.connected.wait(timeout_s)

    def wait_for_experts(self, experts: set[int], timeout_s: float, version: str | None = None) -> bool:
        """Wait until every expert in `experts` other than our own has a usable peer (at `version`,
        by default the installed models')."""
        return self.fleet.wait_for(experts - {self.expert_id}, version or self.model_version, timeout_s)

    def stats(self) -> dict[str, dict[str, int | float]]:
        """Every counter: the agent's, both servers', the requester's and the presence view's."""
        return {"agent": dict(self.counters.snapshot()), "expert_server": self.expert_server.stats(),
                "infer_server": self.infer_server.stats(), "replies": dict(self.requester.counters.snapshot()),
                "presence": dict(self.fleet.counters.snapshot())}

    def presence(self) -> Presence:
        """This device's birth presence, stamped now."""
        inst = self._installed
        runtime = RUNTIME_NAMES["onnx"] if inst is None else RUNTIME_NAMES.get(inst.models.format, inst.models.format)
        caps = Caps((runtime,), ENCODINGS, self.config.limits.max_batch)
        spec = None if inst is None else inst.bundle.manifest.input
        raw = RawInput(tuple(spec.shape)) if spec is not None and spec.dtype == "uint8" else None
        return Presence(self.me, self.expert_id, "online", self.model_version, caps, time.time(),
                        PROTOCOL_VERSIONS, raw)

    # inference -------------------------------------------------------------------------------

    def infer(self, images: np.ndarray, requests: Sequence[ExpertRequest] = ()) -> InferenceResult:
        """Classify uint8 images [N, C, H, W] with the fleet (see the module docstring).

        `requests`: the inference requests from the wire whose rows `images` are, in order; the
        event log names them by correlation id, with the experts combined for their rows.
        """
        pending = self.begin(images, requests)
        self.requester.wait(pending.calls, pending.until)
        return self.finish(pending)

    def begin(self, images: np.ndarray, requests: Sequence[ExpertRequest] = (),
              wake: Callable[[], None] | None = None) -> PendingInference:
        """Extract, route, ask the peers and run the own expert; `wake()` runs whenever a peer's call
        ends (on the thread that ended it). `finish` completes it."""
        inst = self._require()
        marks = {"start": time.perf_counter()}
        deadline_ms = now_ms() + self.config.deadline_ms
        until = time.monotonic() + self.config.deadline_ms / 1000
        z = inst.models.extractor.run(preprocess(images, inst.bundle.manifest.input))
        marks["extracted"] = time.perf_counter()
        route, avoided = self._route(inst, z)
        idx, weights = route.experts.copy(), route.weights.copy()
        marks["routed"] = time.perf_counter()
        local = np.isin(idx, list(inst.models.local_experts(inst.bundle.manifest)))
        skipped = (weights == 0) & ~local  # contributes exactly 0: not worth asking
        calls, missing, bytes_sent = self._send(inst.version, z, np.where(skipped | local, -1, idx), deadline_ms,
                                                self.config.deadline_ms / 1000, wake)
        marks["sent"] = time.perf_counter()
        outputs = {int(e): np.zeros((len(z), inst.bundle.manifest.num_classes), np.float32)
                   for e in np.unique(idx)}
        have = {e: np.zeros(len(z), bool) for e in outputs}
        for e in inst.models.local_experts(inst.bundle.manifest):
            if e in outputs:
                self._run_local(inst, e, z, np.nonzero(idx == e)[0], outputs, have)
        marks["own_done"] = time.perf_counter()
        return PendingInference(inst, requests, z, route, idx, weights, avoided, outputs, have, missing, skipped, calls,
                                until, bytes_sent, marks)

    def finish(self, p: PendingInference, rows: slice = slice(None)) -> InferenceResult:
        """Combine what the peers answered for `rows` (all by default: a contiguous part, e.g. one wire
        request of a micro-batch, can finish before the others); their calls still unanswered time out now."""
        a, b, _ = rows.indices(len(p.z))
        calls = p.calls_for(rows)
        self.requester.give_up(calls)
        waited = time.perf_counter()
        remote_ms, missing = self._collect(p, calls)
        missing |= {e: why for e, why in p.missing.items() if (p.idx[rows] == e).any()}
        z, idx, weights = p.z[rows], p.idx[rows], p.weights[rows]  # views: fallback rows are written back
        outputs = {e: out[rows] for e, out in p.outputs.items()}
        have = {e: h[rows] for e, h in p.have.items()}
        fallback = self._renormalize(p.inst, z, idx, weights, outputs, have, p.skipped[rows])
        experts = {e: (lambda _z, e=e: outputs[e][np.nonzero(idx == e)[0]]) for e in outputs}
        probs = combine(z, idx, weights, experts, p.inst.bundle.manifest.num_classes)
        owned = [c for c in p.calls if a <= c.context[0] < b]  # each call's bytes count in one part
        m = p.marks
        result = InferenceResult(
            id=f"{self.me}-{next(self._ids)}", labels=probs.argmax(axis=1), probs=probs, experts=idx,
            weights=weights, answered=tuple(sorted(e for e in outputs if have[e].any())),
            missing={e: missing[e] for e in sorted(missing)}, rerouted=p.route.rerouted(rows),
            avoided=p.avoided, zero_weight_skipped=int(p.skipped[rows].sum()), fallback_rows=fallback,
            latency_ms={"extract": _ms(m["start"], m["extracted"]), "route": _ms(m["extracted"], m["routed"]),
                        "send": _ms(m["routed"], m["sent"]), "own_expert": _ms(m["sent"], m["own_done"]),
                        "peers": _ms(m["routed"], waited), "total": _ms(m["start"], time.perf_counter())},
            remote_ms=remote_ms, bytes_sent=sum(c.request_bytes for c in owned),
            bytes_received=sum(c.reply_bytes for c in owned))
        self._record(result, _answered_per_request(p.requests, p.have, a, b))
        return result

    def _serve_inference(self, images: np.ndarray, requests: Sequence[ExpertRequest]) -> np.ndarray | list[Deferred]:
        """The infer server's computation: one batch begun at once, each request answered as soon as the
        peers its own rows asked have answered (or at the deadline)."""
        pending = self.begin(images, requests, self.infer_server.wake)
        if pending.ready():
            return self.finish(pending).probs
        bounds = np.cumsum([0, *(len(q.latent) for q in requests)])
        return [self._deferred(pending, slice(int(a), int(b))) for a, b in itertools.pairwise(bounds)]

    def _deferred(self, p: PendingInference, rows: slice) -> Deferred:
        return Deferred(p.until, lambda: p.ready(rows), lambda: self.finish(p, rows).probs)

    def _route(self, inst: Installed, z: np.ndarray) -> tuple[Route, tuple[int, ...]]:
        """The chosen experts among those usable right now (only our own while disconnected), and the
        live experts left out because their device is suspect."""
        m = inst.bundle.manifest
        live, avoided = set(inst.models.local_experts(m)), set()
        if self.connected.is_set():
            usable = {e for e in self.fleet.live_experts(inst.version) if e < m.num_experts}
            live |= {e for e in self.fleet.live_experts(inst.version, self.suspects.avoided())
                     if e < m.num_experts}
            avoided = usable - live
        if inst.models.gate is not None:
            logits = inst.models.gate.run(z)
            route = gate_route(logits, m.top_k, {e for e in live if e < logits.shape[1]})
            if inst.models.ood is not None and m.shared_expert is not None:  # mode "fallback"
                route = with_fallback(route, inst.models.ood(z), m.shared_expert.index)
            return route, tuple(sorted(avoided))
        with self._rng_lock:
            return random_live_route(len(z), m.num_experts, m.top_k, live, self._rng), tuple(sorted(avoided))

    def _send(self, version: str, z: np.ndarray, idx: np.ndarray, deadline_ms: int, wait_s: float,
              wake: Callable[[], None] | None) -> tuple[list[Call[np.ndarray]], dict[int, str], int]:
        """One REQUEST per peer expert (per max_batch rows; `idx` -1: not asked): the calls, experts not
        asked, bytes sent."""
        calls: list[Call[np.ndarray]] = []
        missing: dict[int, str] = {}

        def settled(call: Call[np.ndarray]) -> None:
            self._peer_call_ended(call)
            if wake is not None:
                wake()

        for e in (int(e) for e in np.unique(idx) if e not in (self.expert_id, -1)):
            peer = self.fleet.peer(e, version, self.suspects.avoided())
            if peer is None:  # went away (or became suspect) since routing
                missing[e] = "offline"
                continue
            encoding = self.config.latent_encoding
            if encoding not in peer.caps.latent_encodings:
                encoding = "fp32"
            rows = np.nonzero(idx == e)[0]
            for chunk in np.array_split(rows, math.ceil(len(rows) / peer.caps.max_batch)):
                calls.append(self.requester.send(
                    self.topics.expert_request(e), peer.device, e,
                    partial(self._request, expert=e, version=version, deadline_ms=deadline_ms, latent=z[chunk],
                            encoding=encoding),
                    wait_s, chunk, settled))
        return calls, missing, sum(c.request_bytes for c in calls)

    def _peer_call_ended(self, call: Call[np.ndarray]) -> None:
        """Suspicion and compatibility from how a peer's call ended (any thread)."""
        if call.fate == Fate.ANSWERED:
            self.suspects.answered(call.server)
        elif call.fate == Fate.TIMEOUT:
            self.suspects.missed(call.server, call.sent_at)
        elif call.detail == "busy":
            self.suspects.busy(call.server)
        elif call.detail == "wrong_model_version":
            self.fleet.mark_incompatible(call.server)

    def _request(self, cid: bytes, expert: int, version: str, deadline_ms: int, latent: np.ndarray,
                 encoding: Encoding) -> bytes:
        """The REQUEST frame; fp32 when the latent does not fit `encoding` (fp16 beyond +-65504)."""
        def frame(enc: Encoding) -> bytes:
            return encode(ExpertRequest(cid, expert, deadline_ms, version, self.inbox, latent, enc))

        try:
            return frame(encoding)
        except ProtocolError:
            return frame("fp32")

    def _run_local(self, inst: Installed, expert: int, z: np.ndarray, rows: np.ndarray,
                   outputs: dict[int, np.ndarray], have: dict[int, np.ndarray]) -> None:
        """A local expert (the own one, or the shared expert) on `rows`."""
        outputs[expert][rows] = softmax(inst.models.local_experts(inst.bundle.manifest)[expert].run(z[rows]))
        have[expert][rows] = True

    def _collect(self, p: PendingInference, calls: list[Call[np.ndarray]]) -> tuple[dict[int, float], dict[int, str]]:
        """The answers of `calls` into `p.outputs`/`p.have`: round trip per expert that answered, and why
        the others did not."""
        remote_ms: dict[int, float] = {}
        missing: dict[int, str] = {}
        for call in calls:
            reply, rows = call.reply, call.context
            out = p.outputs[call.expert]
            if isinstance(reply, ExpertResponse) and reply.probs.shape == (len(rows), out.shape[1]):
                out[rows] = reply.probs
                p.have[call.expert][rows] = True
                remote_ms[call.expert] = max(remote_ms.get(call.expert, 0.0), 1000 * (call.round_trip_s or 0.0))
                continue
            missing[call.expert] = "bad_response" if call.fate == Fate.ANSWERED else call.detail or str(call.fate)
        return remote_ms, missing

    def _renormalize(self, inst: Installed, z: np.ndarray, idx: np.ndarray, weights: np.ndarray,
                     outputs: dict[int, np.ndarray], have: dict[int, np.ndarray], skipped: np.ndarray) -> int:
        """Weights over the answers each row got (rows with every answer keep theirs bit for bit; a
        zero-weight choice that was skipped counts as answered with 0); a row without any answer gets
        the own expert alone. Returns how many rows fell back."""
        answered = skipped.copy()
        for e in outputs:
            r, s = np.nonzero(idx == e)
            answered[r, s] |= have[e][r]
        lost = ~answered.all(axis=1)
        if not lost.any():
            return 0
        kept = np.where(answered, weights, 0.0).astype(np.float32)
        total = kept.sum(axis=1)
        partial = lost & (total > 0)
        weights[partial] = kept[partial] / total[partial, None]
        orphans = np.nonzero(total == 0)[0]
        if len(orphans):
            weights[orphans] = 0.0
            idx[orphans, 0] = self.expert_id
            weights[orphans, 0] = 1.0
            outputs.setdefault(self.expert_id, np.zeros_like(next(iter(outputs.values()))))
            have.setdefault(self.expert_id, np.zeros(len(z), bool))
            self._run_local(inst, self.expert_id, z, orphans, outputs, have)
        return len(orphans)

    def _record(self, r: InferenceResult, requests: dict[str, list[int]]) -> None:
        self.counters.add("inferences")
        self.counters.add("inputs", len(r.labels))
        self.counters.add("inputs_rerouted", sum(r.rerouted.values()))
        self.counters.add("experts_missing", len(r.missing))
        self.counters.add("experts_avoided", len(r.avoided))
        self.counters.add("zero_weight_skipped", r.zero_weight_skipped)
        self.counters.add("fallback_rows", r.fallback_rows)
        self.events.emit("inference", id=r.id, inputs=len(r.labels),
                         chosen=sorted({int(e) for e in np.unique(r.experts)}), answered=list(r.answered),
                         missing={str(e): why for e, why in r.missing.items()},
                         rerouted={str(e): n for e, n in r.rerouted.items()}, avoided=list(r.avoided),
                         zero_weight_skipped=r.zero_weight_skipped, fallback_rows=r.fallback_rows,
                         latency_ms=r.latency_ms, remote_ms={str(e): ms for e, ms in r.remote_ms.items()},
                         bytes_sent=r.bytes_sent, bytes_received=r.bytes_received,
                         requests=requests)

    # transport callbacks (the transport's thread) -----------------------------------------------

    def _publish(self, topic: str, payload: bytes) -> None:
        self.transport.publish(topic, payload)

    def _publish_presence(self) -> None:
        self.transport.publish(self.topics.presence(self.me), encode_presence(self.presence()), qos=1, retain=True)

    def _on_connection(self, event: ConnectionEvent, detail: str) -> None:
        if event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
            self._publish_presence()
            self.connected.set()
        elif event == ConnectionEvent.DISCONNECTED:
            self.connected.clear()
            self.fleet.clear()
        self.events.emit(event.value, device=self.me, detail=detail)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self._dispatch(topic, payload)
        except Exception as e:  # noqa: BLE001 -- a handler must never take the transport's thread down
            self.counters.add("handler_errors")
            self.events.emit("error", where="message handler", topic=topic[:100], error=f"{type(e).__name__}: {e}")

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            kind, target, sender = self.topics.parse(topic)
        except ProtocolError as e:
            self.counters.add("dropped_topic")
            self.events.malformed("topic", str(e), topic)
            return
        if kind == TopicKind.PRESENCE:
            status = self.fleet.update(str(target), payload)
            if status is not None:
                self.events.emit("presence", device=target, status=status)
        elif kind == TopicKind.EXPERT_REQUEST and target == self.expert_id:
            self.expert_server.submit(payload)
        elif kind == TopicKind.INFER_REQUEST and target == self.me:
            self.infer_server.submit(payload)
        elif kind == TopicKind.REPLY and target == self.me and sender is not None:
            self.requester.deliver(sender, payload, publish_packet_size(topic, payload))
        elif kind == TopicKind.TRAIN_COMMAND and target == self.me and self.training is not None:
            self.training(topic, payload)
        else:
            self.counters.add("dropped_topic")


def _pixels(request: ExpertRequest) -> np.ndarray:
    """An inference request's tensor as uint8 pixels; ValueError unless it is a raw input (protocol §6.3)."""
    error = raw_input_error(request.latent, request.encoding)
    if error is not None:
        raise ValueError(error)
    return request.latent.astype(np.uint8)


def _answered_per_request(requests: Sequence[ExpertRequest], have: dict[int, np.ndarray], start: int,
                          stop: int) -> dict[str, list[int]]:
    """Correlation id (hex) of each wire request whose rows lie in [start, stop) -> the experts combined
    for its rows (a peer whose gate weight is exactly 0 was not asked and is not listed)."""
    bounds = np.cumsum([0, *(len(q.latent) for q in requests)])
    return {q.correlation_id.hex(): sorted(e for e, rows in have.items() if rows[a:b].any())
            for q, a, b in zip(requests, bounds[:-1], bounds[1:], strict=True) if start <= a and b <= stop}


def _ms(a: float, b: float) -> float:
    return round(1000 * (b - a), 3)
