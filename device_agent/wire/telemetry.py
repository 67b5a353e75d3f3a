"""The operator's channel: device telemetry (device -> operator) and the drain command (operator -> device).

Both are JSON objects like the presence (docs/protocol.md §15): UTF-8, canonical form when sent,
strictly validated when received (duplicate keys, NaN/Infinity, a byte-order mark, wrong types and
out-of-range values are rejected; unknown keys are ignored), bounded in size. Every decoder here
raises only `ProtocolError`. The golden vectors are in tests/vectors/operator/.

    {prefix}/{fleet}/telemetry/{device}   Telemetry, QoS 0, not retained: published by the device
    {prefix}/{fleet}/drain/{device}       Drain, QoS 1, not retained: published by the operator
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from device_agent.wire.frames import check_text, check_uint
from device_agent.wire.protocol import MAX_TOPIC, ErrorCode, Topics, _check_id
from device_agent.wire.strict_json import load_json
from device_agent.wire.tensor_codec import ProtocolError

TELEMETRY_VERSION = 1
DRAIN_VERSION = 1
MAX_TELEMETRY = 4096  # bytes of one telemetry payload
MAX_DRAIN = 512  # bytes of one drain command
MAX_ROUTING = 64  # experts listed in `routing` (a publisher keeps the most used)
MAX_DRAIN_S = 86_400.0  # a drain lasts at most a day
MAX_COUNT = (1 << 53) - 1  # counters stay exact in a JavaScript number
STATUSES = ("serving", "drained")
# error codes as the counters name them; `timeout` (no reply before the deadline) only in `received`
ERROR_NAMES = tuple(code.name.lower() for code in ErrorCode)
RECEIVED_ERROR_NAMES = (*ERROR_NAMES, "timeout")
_MAX_SHORT_TEXT = 255


# topics ------------------------------------------------------------------------------------------


def telemetry_topic(topics: Topics, device: str) -> str:
    """Where `device` publishes its telemetry."""
    return _topic(topics, "telemetry", device)


def drain_topic(topics: Topics, device: str) -> str:
    """Where the operator sends `device` a drain command."""
    return _topic(topics, "drain", device)


def telemetry_filter(topics: Topics) -> str:
    """The operator's subscription to every device's telemetry."""
    return f"{topics.base}/telemetry/+"


def drain_filter(topics: Topics) -> str:
    """What the operator may publish drain commands on (the broker's ACL)."""
    return f"{topics.base}/drain/+"


def telemetry_device(topics: Topics, topic: str) -> str | None:
    """The device of a telemetry topic of this fleet, or None for any other topic."""
    head = f"{topics.base}/telemetry/"
    if not topic.startswith(head):
        return None
    try:
        return _check_id(topic[len(head):], "device")
    except ProtocolError:
        return None


def _topic(topics: Topics, kind: str, device: str) -> str:
    topic = f"{topics.base}/{kind}/{_check_id(device, 'device')}"
    if len(topic.encode()) > MAX_TOPIC:
        raise ProtocolError(f"topic longer than {MAX_TOPIC} bytes")
    return topic


# telemetry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyWindow:
    """Inference latency (ms, from the device's start of an inference to its result) over the period."""

    n: int  # inferences in the period; the percentiles are None when 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class OnDeviceEval:
    """The device's own labelled samples classified with the fleet so far (`nmoe agent --eval-samples`)."""

    samples: int
    correct: int


@dataclass(frozen=True)
class Telemetry:
    """One periodic report of a device. Counters are cumulative since the agent started."""

    device: str
    seq: int  # 0, 1, 2... per agent start
    ts: float  # unix seconds when it was published
    period_s: float  # the publisher's period
    uptime_s: float
    model: str  # the model version the device runs
    status: Literal["serving", "drained"]
    served: dict[str, int]  # "expert", "infer" -> requests answered with a RESPONSE
    made: int  # requests sent to peer experts
    inputs: int  # inputs the device classified
    errors_sent: dict[str, int]  # ERROR code name -> errors it answered (only codes > 0)
    errors_received: dict[str, int]  # code name or "timeout" -> of its own requests to peers (only > 0)
    latency_ms: LatencyWindow
    queue: dict[str, int]  # "expert", "infer" -> requests accepted and not answered yet
    cpu_pct: float  # process CPU time / wall time over the period, percent of one core
    rss_bytes: int  # resident memory of the process
    reconnects: int  # broker connections after the first
    bytes_sent: int  # MQTT PUBLISH packets sent, this telemetry's predecessors included
    bytes_received: int  # MQTT PUBLISH packets received
    routing: dict[int, int] = field(default_factory=dict)  # expert -> inputs its output was combined into
    eval: OnDeviceEval | None = None
    final: bool = False  # the last one, published when the agent stops


def encode_telemetry(t: Telemetry) -> bytes:
    """Canonical UTF-8 JSON of `t`; ProtocolError if a field is invalid or it exceeds MAX_TELEMETRY."""
    obj: dict[str, Any] = {
        "v": TELEMETRY_VERSION, "device": t.device, "seq": t.seq, "ts": float(t.ts), "period_s": float(t.period_s),
        "uptime_s": float(t.uptime_s), "model": t.model, "status": t.status, "served": dict(t.served),
        "made": t.made, "inputs": t.inputs, "errors": {"sent": dict(t.errors_sent), "received": dict(t.errors_received)},
        "latency_ms": {k: v for k, v in vars(t.latency_ms).items() if v is not None},
        "queue": dict(t.queue), "cpu_pct": float(t.cpu_pct), "rss_bytes": t.rss_bytes, "reconnects": t.reconnects,
        "bytes": {"sent": t.bytes_sent, "received": t.bytes_received},
        "routing": {str(e): n for e, n in sorted(t.routing.items())},
    }
    if t.eval is not None:
        obj["eval"] = {"samples": t.eval.samples, "correct": t.eval.correct}
    if t.final:
        obj["final"] = True
    if _telemetry_from_obj(obj) != t:
        raise ProtocolError("telemetry does not survive its own encoding (a float that is not finite?)")
    return _dump(obj, MAX_TELEMETRY, "telemetry")


def decode_telemetry(payload: bytes | bytearray | memoryview) -> Telemetry:
    """Parse and validate one telemetry payload; unknown keys are ignored."""
    return _telemetry_from_obj(load_json(payload, MAX_TELEMETRY, "telemetry"))


def _telemetry_from_obj(obj: object) -> Telemetry:
    o = _Obj(obj, "telemetry")
    o.version(TELEMETRY_VERSION)
    status = o.text("status", 16)
    if status not in STATUSES:
        raise ProtocolError(f"telemetry status must be one of {', '.join(STATUSES)}")
    errors = o.child("errors")
    latency = o.child("latency_ms")
    n = latency.integer("n")
    if n:
        window = LatencyWindow(n, latency.number("p50"), latency.number("p95"), latency.number("p99"))
    else:
        latency.absent("p50", "p95", "p99")
        window = LatencyWindow(0)
    routing = o.child("routing").counts(None, MAX_ROUTING)
    eval_ = None
    if "eval" in o.raw:
        e = o.child("eval")
        eval_ = OnDeviceEval(e.integer("samples"), e.integer("correct"))
        if eval_.correct > eval_.samples:
            raise ProtocolError("telemetry eval.correct must be at most eval.samples")
    final = o.raw.get("final", False)
    if final is not False and final is not True:
        raise ProtocolError("telemetry key 'final' must be true or false")
    bytes_ = o.child("bytes")
    return Telemetry(
        device=_check_id(o.text("device", 64), "device"), seq=o.integer("seq"), ts=o.number("ts"),
        period_s=o.number("period_s", positive=True), uptime_s=o.number("uptime_s"),
        model=o.text("model", _MAX_SHORT_TEXT), status=status,  # type: ignore[arg-type]
        served=o.child("served").fixed(("expert", "infer")), made=o.integer("made"), inputs=o.integer("inputs"),
        errors_sent=errors.child("sent").counts(ERROR_NAMES), errors_received=errors.child("received").counts(
            RECEIVED_ERROR_NAMES), latency_ms=window,
        queue=o.child("queue").fixed(("expert", "infer")), cpu_pct=o.number("cpu_pct"), rss_bytes=o.integer("rss_bytes"),
        reconnects=o.integer("reconnects"), bytes_sent=bytes_.integer("sent"), bytes_received=bytes_.integer("received"),
        routing={int(e): c for e, c in routing.items()}, eval=eval_, final=final)


# drain -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drain:
    """Ask `device` to stop serving for `for_s` seconds (0: serve again now)."""

    device: str
    for_s: float
    ts: float  # unix seconds when the operator sent it


def encode_drain(d: Drain) -> bytes:
    """Canonical UTF-8 JSON of `d`; ProtocolError if invalid."""
    obj = {"v": DRAIN_VERSION, "device": d.device, "for_s": float(d.for_s), "ts": float(d.ts)}
    _drain_from_obj(obj)
    return _dump(obj, MAX_DRAIN, "drain")


def decode_drain(payload: bytes | bytearray | memoryview) -> Drain:
    """Parse and validate one drain command; unknown keys are ignored."""
    return _drain_from_obj(load_json(payload, MAX_DRAIN, "drain"))


def _drain_from_obj(obj: object) -> Drain:
    o = _Obj(obj, "drain")
    o.version(DRAIN_VERSION)
    for_s = o.number("for_s")
    if for_s > MAX_DRAIN_S:
        raise ProtocolError(f"drain for_s must be at most {MAX_DRAIN_S:g}")
    return Drain(_check_id(o.text("device", 64), "device"), for_s, o.number("ts"))


# strict JSON -------------------------------------------------------------------------------------


class _Obj:
    """A parsed JSON object whose keys are read with type and range checks (`what` names it in errors)."""

    def __init__(self, raw: object, what: str) -> None:
        if not isinstance(raw, dict):
            raise ProtocolError(f"{what} must be a JSON object")
        self.raw: dict[str, object] = raw
        self.what = what

    def _get(self, key: str) -> object:
        if key not in self.raw:
            raise ProtocolError(f"{self.what} missing key {key!r}")
        return self.raw[key]

    def version(self, expected: int) -> None:
        """Key `v` must be `expected`."""
        v = self.integer("v", 255)
        if v != expected:
            raise ProtocolError(f"unsupported {self.what} version {v}")

    def integer(self, key: str, limit: int = MAX_COUNT) -> int:
        return check_uint(self._get(key), limit, f"{self.what} key {key!r}")

    def number(self, key: str, positive: bool = False) -> float:
        value = self._get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT:
            value = math.inf  # a float would round it
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ProtocolError(f"{self.what} key {key!r} must be a finite number >= 0")
        if positive and value == 0:
            raise ProtocolError(f"{self.what} key {key!r} must be > 0")
        return float(value)

    def text(self, key: str, max_bytes: int) -> str:
        return check_text(self._get(key), f"{self.what} key {key!r}", max_bytes)

    def child(self, key: str) -> _Obj:
        return _Obj(self._get(key), f"{self.what}.{key}")

    def absent(self, *keys: str) -> None:
        for key in keys:
            if key in self.raw:
                raise ProtocolError(f"{self.what} has {key!r} without values")

    def fixed(self, keys: tuple[str, ...]) -> dict[str, int]:
        """Exactly these counters (other keys are ignored)."""
        return {k: self.integer(k) for k in keys}

    def counts(self, names: tuple[str, ...] | None, max_keys: int = 64) -> dict[str, int]:
        """Counters > 0 named from `names` (None: expert ids 0..65535 in decimal), at most `max_keys`."""
        if len(self.raw) > max_keys:
            raise ProtocolError(f"{self.what} has more than {max_keys} keys")
        for key in self.raw:
            if (key not in names) if names is not None else not _is_expert_id(key):
                raise ProtocolError(f"{self.what} has an unknown key {key[:40]!r}")
        counts = {k: self.integer(k) for k in self.raw}
        if 0 in counts.values():
            raise ProtocolError(f"{self.what} lists a zero count")
        return counts


def _is_expert_id(key: str) -> bool:
    return key.isascii() and key.isdigit() and (key == "0" or not key.startswith("0")) and int(key) <= 0xFFFF


def _dump(obj: dict[str, Any], limit: int, what: str) -> bytes:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(data) > limit:
        raise ProtocolError(f"{what} larger than {limit} bytes")
    return data

