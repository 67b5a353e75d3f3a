"""What `python -m bench.agent` measured, and the page it writes (docs/results/agent.md).

One dataclass per phase; `page()` assembles one section per phase from small writers, each of
which says what was measured, a table, and the verdicts that depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.common import pctl, verdict
from device_agent.wire.tensor_codec import ENCODINGS, Encoding


@dataclass(frozen=True)
class Setup:
    """How the benchmark ran and on what."""

    command: str
    quick: bool
    machine: dict[str, str]
    load_start: str
    load_end: str
    fleet: str  # where the main fleet came from
    scaling_fleet: str  # where the scaling fleet came from
    test_note: str  # which test images the encodings phase classified
    batch: int  # rows per inference in the encodings phase
    wall_s: float
    setup_s: float


@dataclass(frozen=True)
class RoundTrip:
    """Closed-loop round trips (ms): a raw echo and an agent's expert, plus the expert's compute."""

    device: str
    expert: int
    request_bytes: int
    response_bytes: int
    trips: int
    raw: list[float]
    agent: list[float]
    compute: list[float]  # the RESPONSEs' compute_us, in ms
    back_to_back: list[float]  # the same model call in a tight loop, ms

    @property
    def ratio(self) -> float:
        return pctl(self.agent, 50) / (pctl(self.raw, 50) + pctl(self.compute, 50))

    @property
    def warm_ratio(self) -> float:
        return pctl(self.agent, 50) / (pctl(self.raw, 50) + pctl(self.back_to_back, 50))


@dataclass(frozen=True)
class Throughput:
    """One expert server under a flood of batch-1 requests."""

    microbatch: bool
    window: int
    seconds: float
    answered: int
    errors: int
    mean_batch: float
    server_cpu_us: float  # per answered request

    @property
    def rps(self) -> float:
        return self.answered / self.seconds


@dataclass(frozen=True)
class Scaling:
    """N agent processes, one inference in flight per device."""

    n: int
    startup_s: float
    seconds: float
    answered: int
    errors: int
    latencies_ms: list[float]
    experts_missing: int
    lost: int
    agents_cpu_ms: float  # per answered inference

    @property
    def ips(self) -> float:
        return self.answered / self.seconds


@dataclass(frozen=True)
class EncodingRun:
    """In-process agents classifying their test sets with one latent encoding."""

    accuracy: float
    mean_device_accuracy: float
    samples: int
    labels: dict[int, np.ndarray]
    missing: int
    latent_bytes: int  # one row's tensor data (+5 B for int8)
    frame_bytes: int  # a REQUEST frame for one row
    wire_bytes_per_request: float  # MQTT packets per request actually sent
    agreement: float = 100.0  # % same label as with fp32


@dataclass(frozen=True)
class FrozenPeer:
    """One device classifies a stream of inputs while a peer it uses is SIGSTOPped halfway."""

    asker: str
    frozen: str
    frozen_expert: int
    deadline_ms: int
    rate: float  # requests per second
    seconds: float  # per phase
    normal: list[float]  # ms, inputs that do not need the frozen expert, before the freeze
    unrelated: list[float]  # ms, the same kind of inputs during the freeze
    needing: list[float]  # ms, inputs that chose the frozen expert, during the freeze
    avoided: int  # the asker's inferences that ran while the frozen peer was suspect (left out of routing)
    failed: int  # requests without a RESPONSE

    @property
    def ratio(self) -> float:
        """p95 of the unrelated inputs, frozen / normal."""
        return pctl(self.unrelated, 95) / pctl(self.normal, 95)


@dataclass(frozen=True)
class Results:
    setup: Setup
    round_trip: RoundTrip
    throughput: list[Throughput]  # micro-batching on, then off
    scaling: list[Scaling]
    encodings: dict[Encoding, EncodingRun]
    frozen: FrozenPeer


def page(r: Results) -> str:
    """The whole Markdown page."""
    on, off = r.throughput
    sections = [header(r.setup), round_trip_section(r.round_trip), throughput_section(on, off, r.round_trip),
                scaling_section(r.scaling, r.setup), encodings_section(r.encodings, r.setup),
                frozen_section(r.frozen), targets_section(r)]
    return "\n".join(line for section in sections for line in [*section, ""])


def table(header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> list[str]:
    """A Markdown table; the first `left` columns left-aligned, the others right-aligned."""
    align = ["---" if i < left else "---:" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|",
            *(f"| {' | '.join(str(c) for c in row)} |" for row in rows)]


def header(s: Setup) -> list[str]:
    m = s.machine
    smoke = ", a smoke run: short phases, small fleets" if s.quick else ""
    return [
        "# Device agent benchmark", "",
        (f"Command: `{s.command}` (wrote this file after {s.wall_s:.0f} s of wall time, {s.setup_s:.0f} s of it "
        f"training/exporting fleets not yet on disk{smoke})."), "",
        (f"Machine: {m['processor']}, {m['cpus']} cores, {m['platform']}, Python {m['python']}; {m['mosquitto']}; "
        f"paho-mqtt {m['paho']}; onnxruntime {m['onnxruntime']}."), "",
        f"Load: at start {s.load_start}. At end {s.load_end}.", "",
        ("Emulation: everything runs on loopback on this one machine: mosquitto (started by `broker/process.py`, "
        "`set_tcp_nodelay true`), the agent processes (`python -m toolkit.cli agent` through "
        "`toolkit.fleet.agent_processes`, ONNX Runtime with the bundles' fp32 models, or int8 where a bundle has "
        "only int8, 1 intra-op thread each) and the benchmark's clients (the agent's own transport and "
        "`Requester`, paho-mqtt with TCP_NODELAY) all share the same cores; no network latency or bandwidth "
        "limit is emulated, so these are the software costs of the broker, paho and the agent, not of a radio "
        "link."), "",
        f"Fleet for 1, 2, 4 and 5: {s.fleet}.",
    ]


def round_trip_section(rt: RoundTrip) -> list[str]:
    raw, agent, compute, warm = (pctl(rt.raw, 50), pctl(rt.agent, 50), pctl(rt.compute, 50),
                                 pctl(rt.back_to_back, 50))
    rows = [(name, f"{pctl(v, 50):.3f}", f"{pctl(v, 99):.3f}") for name, v in (
        ("raw paho/mosquitto echo", rt.raw), ("expert compute (`compute_us`)", rt.compute),
        ("expert compute back to back", rt.back_to_back), ("agent remote expert", rt.agent))]
    return [
        "## 1. Remote-expert round trip vs raw mosquitto", "",
        (f"Requester in the benchmark process, closed loop (one message in flight), {rt.trips} trips after 100 "
        f"warm-up trips each, timed from the publish to the reply's arrival on the requester's connection. Raw: a "
        f"paho client in its own process echoes every {rt.request_bytes} B payload (the size of a batch-1 fp32 "
        f"REQUEST frame) with a {rt.response_bytes} B one (the size of the RESPONSE) through the broker, QoS 0. "
        f"Agent: `nmoe agent` of {rt.device} (own process) answers a REQUEST for its expert {rt.expert} (decode "
        "and checks, queue, worker, ONNX Runtime, RESPONSE encode), sent and matched by the `Requester`. Compute: "
        "the RESPONSE's `compute_us` (the expert's model call in the agent during these trips). Back to back: the "
        "same call (runtime + softmax) in a tight loop in the benchmark process."), "",
        *table(("path", "median ms", "p99 ms"), rows), "",
        (f"Agent median / (raw median + compute median) = {agent:.3f} / ({raw:.3f} + {compute:.3f}) = "
        f"**{rt.ratio:.2f}x**."), "",
        (f"The model call takes {compute / warm:.1f}x longer in the round trips than back to back: between two trips "
        "the core idles for a fraction of a millisecond, and a call right after an idle gap runs on cold caches "
        "(and, in this VM, a vCPU that was descheduled). Counting only the back-to-back time, the ratio is "
        f"{agent:.3f} / ({raw:.3f} + {warm:.3f}) = {rt.warm_ratio:.2f}x."),
    ]


def batching_costs(on: Throughput, off: Throughput) -> tuple[float, float]:
    """(p, b): wall us per request = p + b / mean batch, solved for the two runs."""
    t_on, t_off, n = 1e6 / on.rps, 1e6 / off.rps, on.mean_batch
    per_batch = (t_off - t_on) / (1 - 1 / n)
    return t_off - per_batch, per_batch


def throughput_section(on: Throughput, off: Throughput, rt: RoundTrip) -> list[str]:
    p, b = batching_costs(on, off)
    rows = [("micro-batching" if t.microbatch else "`--no-microbatch`", f"{t.rps:.0f}", t.answered, t.errors,
             f"{t.mean_batch:.2f}", f"{1e6 / t.rps:.0f}", f"{t.server_cpu_us:.0f}",
             f"{t.server_cpu_us * t.rps / 1e6:.2f}") for t in (on, off)]
    return [
        "## 2. Expert server throughput, micro-batching on vs off", "",
        (f"One `nmoe agent` process serves its expert (max batch 32, queue 64); one requester keeps {on.window} "
        "batch-1 fp32 requests in flight (a new one is sent for each answer; `bench/lean_mqtt.py`, a minimal MQTT "
        "3.1.1 client on a raw socket that sends pre-encoded packets and parses replies from bulk reads, so that "
        "it needs a fraction of the server's CPU per request and the server, not the requester, is the "
        f"bottleneck), {on.seconds:.1f} s measured after a warm-up. Mean batch: requests per model call, from the "
        "agent's counters at exit (whole phase, warm-up included). Server CPU: user + system time of the agent "
        "process over the measured seconds, per answered request."), "",
        *table(("server", "answered req/s", "answered", "errors (BUSY, deadline)", "mean batch",
                "wall us per request", "server CPU us per request", "server cores busy"), rows), "",
        f"Speed-up: {on.rps:.0f} / {off.rps:.0f} = **{on.rps / off.rps:.2f}x**.", "",
        (f"Where the time goes: fitting wall time per request = p + b / (mean batch) to the two runs gives p = "
        f"{p:.0f} us that every request costs however it is batched (paho's receive path, decoding and checking, "
        f"encoding and publishing its RESPONSE) and b = {b:.0f} us per model call (the model call, "
        f"{1000 * pctl(rt.back_to_back, 50):.0f} us back to back, plus waking the worker thread and handing the GIL "
        "between it and paho's network thread). Micro-batching only divides b, so with batches of any size the "
        f"speed-up could not exceed (p + b) / p = {(p + b) / p:.1f}x on this machine."),
    ]


def scaling_section(scaling: list[Scaling], s: Setup) -> list[str]:
    rows = [(x.n, f"{x.startup_s:.1f}", f"{x.ips:.0f}", f"{pctl(x.latencies_ms, 50):.2f}",
             f"{pctl(x.latencies_ms, 95):.2f}", x.answered, x.errors, x.experts_missing, x.lost,
             f"{x.agents_cpu_ms:.2f}") for x in scaling]
    return [
        "## 3. Fleet scaling", "",
        ("All N processes, mosquitto and the driver share the machine's cores, so inferences/s stops growing once "
        "the cores are saturated (a few agents) and latency then grows with N: this measures how the software "
        "degrades when oversubscribed, not how a fleet of N real devices (one CPU each) scales."), "",
        (f"Fleet: {s.scaling_fleet}. N agent processes, each holding a distinct expert; the driver (one client in the "
        "benchmark process) keeps one inference request in flight per device (one raw image per request on "
        "`infer/{device}/req`, as a uint8 tensor: protocol version 2, since the agents' presence lists it) and "
        "sends the next as soon as the answer arrives, so N requests are in flight at once. Latency: send to "
        "RESPONSE at the driver (extractor, gate, own expert and the remote expert(s) over MQTT, combine). Peer "
        "deadline 2000 ms. Agents' CPU: user + system time of all N agent processes over the measured seconds, per "
        "answered inference (it grows with N when processes contend for the cores)."), "",
        *table(("agent processes", "start-up s", "inferences/s", "median ms", "p95 ms", "answered", "errors",
                "experts missing", "lost", "agents' CPU ms per inference"), rows, left=0),
    ]


def encodings_section(enc: dict[Encoding, EncodingRun], s: Setup) -> list[str]:
    f = enc["fp32"]
    rows = [(name, f"{r.accuracy:.2f}", f"{r.mean_device_accuracy:.2f}", f"{r.agreement:.2f}", r.latent_bytes,
             f"{r.latent_bytes / f.latent_bytes:.3f}", r.frame_bytes, f"{r.frame_bytes / f.frame_bytes:.3f}",
             f"{r.wire_bytes_per_request:.0f}", r.missing) for name, r in ((n, enc[n]) for n in ENCODINGS)]
    return [
        "## 4. Latent encodings", "",
        (f"In-process agents (one per device of the fleet, each with its own MQTT connection, remote experts over "
        f"the broker), each classifying {s.test_note} in batches of {s.batch}; accuracy over all {f.samples} "
        "samples; agreement: same label as with fp32 latents. Bytes: the latent tensor's data (+5 B scale and zero "
        "point for int8), the whole REQUEST frame for one latent, and the MQTT packets per request actually sent "
        "during the run (batches of several rows; a peer whose gate weight is exactly 0 for a row is not asked for "
        "it)."), "",
        *table(("encoding", "accuracy %", "mean per device %", "agreement with fp32 %", "latent B (1 row)",
                "vs fp32", "REQUEST frame B", "vs fp32", "packet B per request (run)", "experts missing"), rows),
    ]


def frozen_section(fz: FrozenPeer) -> list[str]:
    rows = [(name, len(v), f"{pctl(v, 50):.2f}", f"{pctl(v, 95):.2f}", f"{max(v, default=float('nan')):.2f}")
            for name, v in (("do not need it, before the freeze", fz.normal),
                            ("do not need it, during the freeze", fz.unrelated),
                            (f"chose expert {fz.frozen_expert}, during the freeze", fz.needing))]
    waited = sum(ms >= 0.9 * fz.deadline_ms for ms in fz.needing)
    return [
        "## 5. A frozen peer", "",
        (f"The fleet's agent processes; {fz.asker} classifies a stream of its test images ({fz.rate:.0f} requests/s, "
        f"one image each, sent whether or not earlier ones were answered) for {fz.seconds:.0f} s; then "
        f"{fz.frozen} (expert {fz.frozen_expert}, the peer {fz.asker}'s gate chooses most) is SIGSTOPped: it stays "
        f"\"online\" (its keep-alive has not run out) but answers nothing, and the stream goes on for "
        f"{fz.seconds:.0f} s. Peer deadline {fz.deadline_ms} ms. Latency: send to RESPONSE at the driver, by whether "
        f"the input's route (as `LocalNMoE` computes it) includes expert {fz.frozen_expert}."), "",
        *table(("inputs", "answered", "median ms", "p95 ms", "max ms"), rows), "",
        (f"p95 of the inputs that do not need the frozen peer, frozen / before: **{fz.ratio:.2f}x** (an inference "
        "waits only for the experts it asked). Of the inputs that chose it during the freeze, "
        f"{waited} waited out the deadline (sent before {fz.frozen} was suspect, or after a back-off ran out); "
        f"{fz.avoided} of {fz.asker}'s inferences ran while {fz.frozen} was suspect and left out of routing "
        f"(inputs that chose it were re-routed before sending); {fz.failed} requests got no RESPONSE."),
    ]


def targets_section(r: Results) -> list[str]:
    rt, (on, off), enc = r.round_trip, r.throughput, r.encodings
    f, f16, i8 = enc["fp32"], enc["fp16"], enc["int8"]
    d16, d8 = f16.accuracy - f.accuracy, i8.accuracy - f.accuracy
    b16, b8 = f16.latent_bytes / f.latent_bytes, i8.latent_bytes / f.latent_bytes
    v8 = (i8.latent_bytes - 5) / f.latent_bytes
    values = f.latent_bytes // 4
    speedup = on.rps / off.rps
    p, _ = batching_costs(on, off)
    raw, agent, compute = pctl(rt.raw, 50), pctl(rt.agent, 50), pctl(rt.compute, 50)
    lines = [
        "## Targets", "",
        (f"- remote-expert round trip at most 2x (raw mosquitto round trip + compute): {agent:.3f} ms vs "
        f"{raw:.3f} + {compute:.3f} ms = {rt.ratio:.2f}x: {verdict(rt.ratio <= 2)}"),
        (f"- micro-batching at least 5x the requests/s of `--no-microbatch`: {on.rps:.0f} vs {off.rps:.0f} req/s = "
        f"{speedup:.2f}x: {verdict(speedup >= 5)}"),
        (f"- fp16 latents within 0.1 points of fp32 at half the latent bytes: {d16:+.2f} points, {100 * b16:.1f}% of "
        f"the bytes: {verdict(abs(d16) <= 0.1 and b16 <= 0.5)}"),
        (f"- int8 latents within 0.5 points of fp32 at a quarter of the latent bytes: {d8:+.2f} points, "
        f"{100 * v8:.1f}% of the latent's value bytes: {verdict(abs(d8) <= 0.5 and v8 <= 0.25)}; with the 5 B "
        f"scale and zero point every tensor carries, a batch-1 latent of {values} values is {100 * b8:.1f}% of fp32 "
        f"(a quarter only as the batch grows: {100 * (32 + 5 / values) / 128:.1f}% at 32 rows)"),
        (f"- a frozen peer does not delay inferences that do not need it (issue 9): p95 {r.frozen.ratio:.2f}x of "
        f"before the freeze (at most 2x): {verdict(r.frozen.ratio <= 2)}"),
        "- fleet scaling: no target; see the table.", ""]
    if rt.ratio > 2:
        lines += [
            (f"Why the round trip exceeds 2x: beyond the raw echo, the agent path spends {agent - raw - compute:.3f} "
            "ms (median) in Python outside the model call: decoding and checking the REQUEST on paho's thread, "
            "handing it to the server's worker thread (a condition-variable wake-up, with the GIL shared by paho's "
            "thread), encoding the RESPONSE and queueing it back to paho's thread; with an expert this small (a "
            f"{compute * 1000:.0f} us model call) that fixed cost is larger than the compute it wraps."), ""]
    if speedup < 5:
        lines += [
            (f"Why micro-batching misses 5x here: it divides only the per-call cost b (section 2), and the "
            f"per-request cost p = {p:.0f} us of Python messaging (paho's one-packet-per-select receive loop, frame "
            "checks, one RESPONSE publish per request) is as large as that; the model call itself is "
            f"{1000 * pctl(rt.back_to_back, 50):.0f} us. 5x needs p below a fifth of p + b: an expert whose call "
            "costs several times the messaging (a larger model, or a slower device where the model call grows but "
            "the messaging does not grow as much), or a server whose messaging is not Python."), ""]
    return lines[:-1]
