"""A trial's numbers: `summarize` turns a `TrialRecord` into a `TrialSummary`, which is trial.json.

`summarize` joins the driver's requests with the agents' `inference` events (matched by the
request's correlation id) and the in-process `LocalNMoE` predictions. A request's **path** is
`local` when only the device's own expert was combined for it and `remote` when at least one
peer expert answered.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from device_agent.nmoe_local import Prediction
from toolkit.fleet.trial_driver import Request, RequestStatus
from toolkit.fleet.trial_record import BrokerRestart, TrialRecord, options_json

T = TypeVar("T")
TRIAL_JSON_VERSION = 2  # docs/trial.md; the first, unversioned trial.json counts as 1


class RequestPath(StrEnum):
    """Which experts answered a request."""

    LOCAL = "local"  # only the device's own expert was combined
    REMOTE = "remote"  # at least one peer expert answered
    UNKNOWN = "unknown"  # no agent event names the request


PATHS = (RequestPath.LOCAL, RequestPath.REMOTE)


@dataclass(frozen=True)
class ByPath(Generic[T]):
    """One measure for the local path, the remote path and every request."""

    local: T
    remote: T
    all: T

    def items(self) -> list[tuple[str, T]]:
        return [("local", self.local), ("remote", self.remote), ("all", self.all)]


@dataclass(frozen=True)
class Stats:
    """Count, mean and percentiles of some values (None without values)."""

    n: int
    mean: float | None
    median: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        v = np.asarray(list(values), dtype=float)
        if not len(v):
            return cls(0, None, None, None, None)
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return cls(len(v), _r(v.mean()), _r(p50), _r(p95), _r(p99))


@dataclass(frozen=True)
class FleetSummary:
    """What ran: the fleet, the broker, the models, the processes, the options."""

    devices: dict[str, int]  # device -> expert
    num_experts: int
    broker: str | None
    auth: bool
    runtime: str
    precision: str
    latent_encoding: str
    deadline_ms: int
    samples: int
    rate: float
    run_dir: str
    method: str
    model_version: str
    pids: dict[str, int]
    broker_pids: list[int]
    remote: bool  # the agents ran already (nmoe trial --remote): the trial started none
    absent: dict[str, str]  # a remote fleet's devices that could not take part -> why (their samples not sent)
    arm64_devices: dict[str, str]  # device -> the CPU emulated for its aarch64 agent (qemu-user)
    options: dict[str, Any]  # every option of the trial


@dataclass(frozen=True)
class Kill:
    """A device the trial killed, and when the fleet heard of it."""

    device: str
    at_s: float
    offline_after_ms: float | None  # until the driver received its offline presence (the broker's will)


@dataclass(frozen=True)
class Timing:
    agents_online_s: float | None
    feeding_s: float | None
    kills: list[Kill]
    broker_restarts: list[BrokerRestart]
    interrupted: bool


@dataclass(frozen=True)
class Counts:
    """What became of the planned requests."""

    planned: int
    sent: int
    answered: int
    failed: int  # errors and timeouts of live devices
    not_served: int  # the device had been killed
    interrupted: int  # in flight when the trial was stopped
    not_sent: int  # planned after the trial was stopped
    failures_by_reason: dict[str, int]  # error code or "timeout" -> failed requests


@dataclass(frozen=True)
class Accuracy:
    """Accuracy (%) over MQTT on the answered samples, in-process on the same ones and on all planned ones."""

    answered: int
    samples: int
    accuracy: float | None
    in_process_accuracy: float | None
    in_process_accuracy_all: float | None


@dataclass(frozen=True)
class AccuracySummary:
    overall: Accuracy
    per_device: dict[str, Accuracy]


@dataclass(frozen=True)
class ExactnessCounts:
    """Answered predictions compared with LocalNMoE's."""

    compared: int
    mismatches: int
    mismatches_intact: int  # among the inputs whose chosen experts all answered
    degraded: int  # answered inputs with an expert re-routed, missing or replaced by the own one
    max_abs_prob_diff: float | None
    unverified: int  # answered inputs no agent event describes (a remote fleet's: its event logs are not here)
    mismatches_unverified: int  # among those: counted as failures, since they may be intact


@dataclass(frozen=True)
class Exactness(ExactnessCounts):
    exact: bool  # no mismatch among the inputs not known to be degraded (what fp32 latents must give)
    per_device: dict[str, ExactnessCounts]


@dataclass(frozen=True)
class Latency:
    """Milliseconds per answered request, by path."""

    end_to_end: ByPath[Stats]  # the driver's round trip
    agent: ByPath[Stats]  # the agent's own time for the inference that served it


@dataclass(frozen=True)
class Bytes:
    """Bytes of MQTT packets."""

    raw_input: int  # one raw image, C*H*W uint8
    between_agents_per_inference: ByPath[float | None]  # expert requests + replies, mean per input
    app_request: float | None  # the driver's request (the image: uint8 to protocol-2 devices, else fp16), mean
    app_reply: float | None  # the combined answer, mean


@dataclass(frozen=True)
class Routing:
    experts: list[int]
    matrix: dict[str, list[int]]  # [device][expert]: answered requests that expert's output was combined into


@dataclass(frozen=True)
class Reroutes:
    """How routing differed from the gate's choice over the whole fleet, and the peers not asked."""

    inputs_rerouted: int  # re-routed before sending (a chosen expert was offline, suspect or incompatible)
    per_device: dict[str, int]
    experts_missing: dict[str, int]  # why a chosen expert was left out (timeout, busy...) -> times
    fallback_rows: int  # inputs answered by the own expert alone (every chosen expert lost)
    zero_weight_skipped: int  # (input, peer expert) pairs not asked: the gate weight was exactly 0
    zero_weight_skipped_per_device: dict[str, int]
    avoided: dict[str, int]  # expert -> inferences that left it out of routing because its device was suspect


@dataclass(frozen=True)
class Failure:
    device: str
    index: int
    status: RequestStatus
    detail: str
    sent_s: float


@dataclass(frozen=True)
class AgentSummary:
    expert: int
    exit_status: int | None
    inferences: int
    counters: dict[str, Any] | None  # the agent's counters at exit, as its event log has them (None: none)


@dataclass(frozen=True)
class RequestRow:
    """One request and what became of it."""

    device: str
    index: int  # the sample's index in the device's personalized test split
    label: int
    status: RequestStatus
    detail: str  # the error code of an error answer
    predicted: int | None
    expected: int  # LocalNMoE's prediction
    prob_diff: float | None  # max |probabilities - LocalNMoE's|
    path: RequestPath
    answered: list[int] | None  # experts combined for it (None: no agent event names it)
    intact: bool | None  # every chosen expert answered (nothing re-routed, missing or replaced); None: no agent
    # event describes its inference
    sent_s: float
    rtt_ms: float | None
    agent_ms: float | None
    request_bytes: int
    reply_bytes: int
    id: str  # correlation id in hex ("" when it was never sent)


@dataclass(frozen=True)
class TrialSummary:
    """Every number of a trial; `to_json()` is trial.json (docs/trial.md)."""

    fleet: FleetSummary
    timing: Timing
    counts: Counts
    accuracy: AccuracySummary
    exactness: Exactness
    latency_ms: Latency
    bytes: Bytes
    routing: Routing
    reroutes: Reroutes
    failures: list[Failure]
    agents: dict[str, AgentSummary]
    driver: dict[str, int]  # the driver's counters
    telemetry: dict[str, Any]  # every telemetry report per device over time, and its cost (telemetry_report)
    requests: list[RequestRow]

    def to_json(self) -> dict[str, Any]:
        return {"version": TRIAL_JSON_VERSION, **asdict(self)}


@dataclass(frozen=True)
class Inference:
    """An agent's `inference` event (docs/agent.md): what one inference combined."""

    inputs: int
    answered: list[int]  # experts whose outputs were combined
    missing: dict[str, str]  # expert -> why it was left out
    rerouted: dict[str, int]  # expert -> inputs re-routed away from it before sending
    fallback_rows: int
    zero_weight_skipped: int  # (input, peer expert) pairs not asked: the gate weight was exactly 0
    avoided: list[int]  # live experts left out of routing: their device was suspect
    total_ms: float
    bytes_sent: int
    bytes_received: int
    requests: dict[str, list[int]]  # correlation id (hex) of an inference request -> experts combined for it

    @classmethod
    def of(cls, event: dict[str, Any]) -> Inference:
        """An event of `nmoe agent` or of another implementation (the web device) that neither skips zero-weight
        peers nor avoids suspect ones, and so writes neither key."""
        return cls(event["inputs"], event["answered"], event["missing"], event["rerouted"], event["fallback_rows"],
                   event.get("zero_weight_skipped", 0), event.get("avoided", []), event["latency_ms"]["total"],
                   event["bytes_sent"], event["bytes_received"], event.get("requests", {}))

    @property
    def intact(self) -> bool:
        """Every chosen expert answered."""
        return not (self.missing or self.rerouted or self.fallback_rows)


# numbers -------------------------------------------------------------------------------------------


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an agent's event file ([] when it wrote none); a torn last line is skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # an agent killed while writing
            continue
    return events


def path_of(answered: list[int] | None, own: int, num_experts: int) -> RequestPath:
    """local: only the own expert (and a shared expert, index >= num_experts, which every device runs
    itself) was combined; remote: a peer answered too; unknown: no agent event."""
    if answered is None:
        return RequestPath.UNKNOWN
    return RequestPath.LOCAL if all(e == own or e >= num_experts for e in answered) else RequestPath.REMOTE


def request_row(r: Request, inference: Inference | None, own: int, num_experts: int,
                expected: Prediction) -> RequestRow:
    """One request as trial.json lists it."""
    answered = None if inference is None else inference.requests[r.id]
    diff = None if r.probs is None else _r(float(np.abs(r.probs - expected.probs[r.index]).max()), 9)
    return RequestRow(r.device, r.index, r.label, r.status, r.detail, r.predicted, int(expected.labels[r.index]),
                      diff, path_of(answered, own, num_experts), answered, None if inference is None else inference.intact,
                      _r(r.sent_s, 6), r.rtt_ms, None if inference is None else inference.total_ms,
                      r.request_bytes, r.reply_bytes, r.id)


def summarize(record: TrialRecord) -> TrialSummary:
    """Every number of the trial."""
    events = {d: read_events(record.events_dir / f"{d}.jsonl") for d in record.devices}
    inferences = {d: [Inference.of(e) for e in evs if e.get("event") == "inference"] for d, evs in events.items()}
    served = {cid: i for infs in inferences.values() for i in infs for cid in i.requests}
    rows = [request_row(r, served.get(r.id), record.devices[r.device], record.num_experts, record.expected[r.device])
            for r in record.requests]
    return TrialSummary(
        fleet=_fleet(record),
        timing=_timing(record),
        counts=_counts(record, rows),
        accuracy=_accuracy(record, rows),
        exactness=_exactness(record, rows),
        latency_ms=_latency(rows),
        bytes=_bytes(record, rows, inferences),
        routing=_routing(record, rows),
        reroutes=_reroutes(inferences),
        failures=[Failure(r.device, r.index, r.status, r.detail, r.sent_s) for r in rows if r.status.failed],
        agents=_agents(record, events, inferences),
        driver=record.driver_counters,
        telemetry=record.facts.telemetry,
        requests=rows,
    )


def _fleet(record: TrialRecord) -> FleetSummary:
    f, o = record.facts, record.options
    return FleetSummary(record.devices, record.num_experts, f.broker, o.auth, o.runtime, record.precision,
                        o.latent_encoding, o.deadline_ms, o.samples, o.rate, str(record.run_dir), record.method,
                        record.model_version, f.pids, f.broker_pids, o.remote, f.absent, f.emulated, options_json(o))


def _timing(record: TrialRecord) -> Timing:
    f = record.facts
    kills = []
    for device, at_s in f.killed.items():
        offline = [p.at_s for p in record.presence if p.device == device and p.status == "offline" and p.at_s >= at_s]
        kills.append(Kill(device, at_s, _r(1000 * (min(offline) - at_s)) if offline else None))
    return Timing(f.online_s, f.feeding_s, kills, f.broker_restarts, f.interrupted)


def _counts(record: TrialRecord, rows: list[RequestRow]) -> Counts:
    status = Counter(r.status for r in rows)
    failures = Counter(r.detail or r.status for r in rows if r.status.failed)
    planned = record.facts.planned
    return Counts(planned, sum(1 for r in rows if r.id), status[RequestStatus.ANSWERED],
                  status[RequestStatus.ERROR] + status[RequestStatus.TIMEOUT], status[RequestStatus.NOT_SERVED],
                  status[RequestStatus.INTERRUPTED], planned - len(rows), dict(failures))


def _accuracy(record: TrialRecord, rows: list[RequestRow]) -> AccuracySummary:
    devices = list(record.devices)
    per_device = {d: _accuracy_of([r for r in rows if r.device == d], record.labels[d], record.expected[d].labels)
                  for d in devices}
    overall = _accuracy_of(rows, np.concatenate([record.labels[d] for d in devices]),
                           np.concatenate([record.expected[d].labels for d in devices]))
    return AccuracySummary(overall, per_device)


def _accuracy_of(rows: list[RequestRow], labels: np.ndarray, expected: np.ndarray) -> Accuracy:
    answered = [r for r in rows if r.status == RequestStatus.ANSWERED]
    return Accuracy(len(answered), len(labels), _pct(sum(r.predicted == r.label for r in answered), len(answered)),
                    _pct(sum(r.expected == r.label for r in answered), len(answered)),
                    _pct(int((expected == labels).sum()), len(labels)))


def _exactness_of(rows: list[RequestRow]) -> ExactnessCounts:
    answered = [r for r in rows if r.status == RequestStatus.ANSWERED]
    diffs = [r.prob_diff for r in answered if r.prob_diff is not None]
    mismatched = [r for r in answered if r.predicted != r.expected]
    return ExactnessCounts(len(answered), len(mismatched), sum(r.intact is True for r in mismatched),
                           sum(r.intact is False for r in answered), max(diffs, default=None),
                           sum(r.intact is None for r in answered), sum(r.intact is None for r in mismatched))


def _exactness(record: TrialRecord, rows: list[RequestRow]) -> Exactness:
    total = _exactness_of(rows)
    return Exactness(**asdict(total), exact=total.mismatches_intact == total.mismatches_unverified == 0,
                     per_device={d: _exactness_of([r for r in rows if r.device == d]) for d in record.devices})


def _latency(rows: list[RequestRow]) -> Latency:
    answered = [r for r in rows if r.status == RequestStatus.ANSWERED]
    return Latency(_by_path([(r.path, r.rtt_ms) for r in answered if r.rtt_ms is not None], Stats.of),
                   _by_path([(r.path, r.agent_ms) for r in answered if r.agent_ms is not None], Stats.of))


def _by_path(pairs: list[tuple[RequestPath, float]], measure: Callable[[Iterable[float]], T]) -> ByPath[T]:
    """`measure` of the values of the local path, the remote path and all."""
    local, remote = (measure(v for q, v in pairs if q == p) for p in PATHS)
    return ByPath(local, remote, measure(v for _, v in pairs))


def _bytes(record: TrialRecord, rows: list[RequestRow], inferences: dict[str, list[Inference]]) -> Bytes:
    """Bytes on the wire between agents (expert requests + replies) per inference, vs the raw input."""
    per_input = [(path_of(i.answered, record.devices[d], record.num_experts), (i.bytes_sent + i.bytes_received) / i.inputs)
                 for d, infs in inferences.items() for i in infs if i.requests]
    return Bytes(record.input_bytes, _by_path(per_input, _mean), _mean(r.request_bytes for r in rows if r.id),
                 _mean(r.reply_bytes for r in rows if r.status == RequestStatus.ANSWERED))


def _routing(record: TrialRecord, rows: list[RequestRow]) -> Routing:
    width = max([record.num_experts - 1, *(e for r in rows for e in r.answered or [])]) + 1  # + a shared expert
    matrix = {d: [0] * width for d in record.devices}
    for r in rows:
        for e in r.answered or []:
            matrix[r.device][e] += 1
    return Routing(list(range(width)), matrix)


def _reroutes(inferences: dict[str, list[Inference]]) -> Reroutes:
    per_device = {d: sum(n for i in infs for n in i.rerouted.values()) for d, infs in inferences.items()}
    missing = Counter(why for infs in inferences.values() for i in infs for why in i.missing.values())
    skipped = {d: sum(i.zero_weight_skipped for i in infs) for d, infs in inferences.items()}
    avoided = Counter(str(e) for infs in inferences.values() for i in infs for e in i.avoided)
    return Reroutes(sum(per_device.values()), per_device, dict(missing),
                    sum(i.fallback_rows for infs in inferences.values() for i in infs), sum(skipped.values()), skipped,
                    dict(sorted(avoided.items(), key=lambda kv: int(kv[0]))))


def _agents(record: TrialRecord, events: dict[str, list[dict[str, Any]]],
            inferences: dict[str, list[Inference]]) -> dict[str, AgentSummary]:
    counters = {d: next((e["counters"] for e in reversed(evs) if e.get("event") == "counters"), None)
                for d, evs in events.items()}
    return {d: AgentSummary(e, record.facts.exit_status.get(d), len(inferences[d]), counters[d])
            for d, e in record.devices.items()}


def _pct(n: int, total: int) -> float | None:
    return _r(100 * n / total, 2) if total else None


def _mean(values: Iterable[float]) -> float | None:
    v = list(values)
    return _r(sum(v) / len(v), 1) if v else None


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)
