"""Device agent benchmark over a real mosquitto on loopback, written to docs/results/agent.md.

    .venv/bin/python -m bench.agent [--bundles DIR] [--run DIR] [--fleet-bundles DIR] [--quick]
                                    [--out docs/results/agent.md]

Measures, in one invocation, every figure of the page (`bench/agent_page.py` writes it):
  1. remote-expert round trip (agent process serving its expert) vs a raw paho echo round trip
     of the same payload size through the same broker, and the expert's compute time;
  2. requests/s one expert server answers under a flood of batch-1 requests, micro-batching on vs
     `--no-microbatch` (`bench/lean_mqtt.py` generates the load);
  3. fleet scaling: 2..32 `nmoe agent` processes, a driver sending inference requests (raw images)
     to every device concurrently: end-to-end latency and inferences/s;
  4. latent encodings fp32/fp16/int8: accuracy of in-process agents over MQTT on the devices'
     personalized test samples, and bytes per request;
  5. a frozen peer: latency of the inferences that do not need a SIGSTOPped peer, before and during
     the freeze (issue 9: an inference waits only for the experts it asked).

Bundles: --bundles DIR (4-ish devices; its run dir from --run or the bundles' provenance, for the
personalized test sets; without one the bundles' self-check samples are used). Default: the
`make demo` fleet (runs/quick-bundles) when present, else configs/tiny.toml trained and exported
here (runs/bench/agent-tiny*). The scaling fleet needs one expert per process: a 32-client run
of configs/tiny.toml is trained and exported here (runs/bench/agent-fleet32*, resumable), unless
--fleet-bundles is given. --quick: fewer trips, shorter phases, fleet sizes 2 and 4 of the main
fleet only (no 32-client training).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from bench.agent_page import (
    EncodingRun,
    FrozenPeer,
    Results,
    RoundTrip,
    Scaling,
    Setup,
    Throughput,
    page,
)
from bench.common import ROOT, cpu_seconds, log, machine, nmoe, other_load
from bench.lean_mqtt import LeanMqtt
from broker.process import BrokerOptions, start_broker
from device_agent.agent import Agent, AgentConfig
from device_agent.bundle import Bundle, load_bundle
from device_agent.device_models import DeviceModels, model_version
from device_agent.nmoe_local import LocalNMoE, softmax
from device_agent.wire.clock import now_ms
from device_agent.wire.fleet_view import FleetView
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import (
    ExpertRequest,
    ExpertResponse,
    ProtocolError,
    TopicKind,
    Topics,
    encode,
    raw_input_encoding,
)
from device_agent.wire.requester import Call, Fate, Requester
from device_agent.wire.tensor_codec import ENCODINGS, Encoding
from device_agent.wire.transport import ConnectionEvent, publish_packet_size
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses

T = TypeVar("T")
TINY_OVERRIDES = ['stage1.methods=["fedce"]', 'gate.methods=["fedgate"]', "baselines.methods=[]"]
FLEET32_OVERRIDES = [*TINY_OVERRIDES, "data.num_clients=32", "data.synthetic_train=3200", "data.synthetic_test=800"]
ECHO = r'''
import socket, sys
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, size = int(sys.argv[1]), int(sys.argv[2])
reply = bytes(size)
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-echo")
c.on_socket_open = lambda cl, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.on_connect = lambda cl, u, f, r, p: cl.subscribe("bench/raw/req", 0)
c.on_subscribe = lambda cl, u, m, r, p: print("ready", flush=True)
c.on_message = lambda cl, u, m: cl.publish("bench/raw/rep", reply, 0)
c.connect("127.0.0.1", port)
c.loop_forever()
'''
Sets = dict[int, tuple[np.ndarray, np.ndarray]]  # expert -> (uint8 images, labels)


def say(msg: str) -> None:
    log("agent", msg)


# --- fleets and the benchmark's clients ------------------------------------------------------------

def load_fleet(path: Path) -> dict[int, Bundle]:
    bundles = [load_bundle(p.parent) for p in sorted(path.glob("*/manifest.json"))]
    if not bundles:
        raise SystemExit(f"bench/agent: no bundles (*/manifest.json) in {path}")
    return {b.manifest.expert_id: b for b in sorted(bundles, key=lambda b: b.manifest.expert_id)}


def train_export(config: str, run: Path, out: Path, overrides: list[str], precision: str) -> None:
    if (out / "device-0" / "manifest.json").exists():
        return
    nmoe("train", str(ROOT / "configs" / config), "--out", str(run), "--quiet",
         *[a for o in overrides for a in ("--set", o)])
    nmoe("export", str(run), "--out", str(out), "--formats", "onnx", "--precision", precision, "--quiet",
         "--max-accuracy-drop", "100")


def main_fleet(args: argparse.Namespace) -> tuple[Path, Path | None, str]:
    """(bundles dir, run dir or None, how they were obtained)."""
    if args.bundles:
        bundles, how = Path(args.bundles), f"`{args.bundles}` (given)"
    elif list((ROOT / "runs/quick-bundles").glob("*/manifest.json")):
        bundles, how = ROOT / "runs/quick-bundles", "`runs/quick-bundles` (the `make demo` / `make arm64-check` fleet)"
    else:
        run_dir, bundles = ROOT / "runs/bench/agent-tiny", ROOT / "runs/bench/agent-tiny-bundles"
        train_export("tiny.toml", run_dir, bundles, TINY_OVERRIDES, "fp32,int8")
        how = "`configs/tiny.toml` trained and exported here (`runs/bench/agent-tiny-bundles`)"
    first = load_bundle(next(iter(sorted(bundles.glob("*/manifest.json")))).parent)
    prov = first.manifest.provenance
    run = Path(args.run) if args.run else None
    if run is None and isinstance(prov.get("run_dir"), str) and (Path(prov["run_dir"]) / "metrics.json").exists():
        run = Path(prov["run_dir"])
    how += (f", method `{prov.get('method', '?')}` of run `{prov.get('run_dir', '?')}`, "
            f"{first.manifest.num_experts} experts, top-{first.manifest.top_k}, latent {first.manifest.latent_dim}, "
            f"input {first.manifest.input.shape}")
    return bundles, run, how


def precision_of(bundle: Bundle) -> str:
    """fp32 when the bundle has ONNX fp32 models (what the benchmark measures), else int8 (`make demo`'s bundles)."""
    return "fp32" if any((e.format, e.precision) == ("onnx", "fp32") for e in bundle.manifest.models) else "int8"


def launch(procs: AgentProcesses, bundle: Bundle, url: str, fleet: str, tmp: Path, *options: str) -> Path:
    """Start `nmoe agent` for `bundle` in `fleet`; its event log."""
    device = bundle.manifest.device_id
    events = tmp / f"{fleet}-{device}.jsonl"
    procs.start(AgentLaunch(device, ("--bundle", str(bundle.path), "--broker", url, "--fleet", fleet,
                                     "--events", str(events), "--precision", precision_of(bundle), *options),
                            tmp / f"{fleet}-{device}.log"))
    return events


def exit_counters(events: Path) -> dict[str, dict[str, float]]:
    """The counters an agent logged when it stopped ({} if it did not)."""
    lines = events.read_text().splitlines() if events.exists() else []
    return next((e["counters"] for e in map(json.loads, reversed(lines)) if e.get("event") == "counters"), {})


def agent_pids(procs: AgentProcesses) -> list[int]:
    return [procs.pid(device) for device in procs.processes]


class FleetClient(Generic[T]):
    """The benchmark's connection: the agent's own transport (TCP_NODELAY), a `Requester` for the replies
    on its inbox, a `FleetView` of the presences, and optionally one raw topic (the echo baseline)."""

    def __init__(self, url: str, topics: Topics, name: str, raw: tuple[str, Callable[[bytes], None]] | None = None
                 ) -> None:
        self.topics, self.name, self._raw = topics, name, raw
        self.transport = MqttTransport(MqttSettings(BrokerUrl.parse(url), f"{topics.fleet}-{name}"))
        self.requester: Requester[T] = Requester(self.transport.publish)
        self.fleet = FleetView(name)
        self.inbox = topics.reply(name)
        for topic_filter in (topics.presence_filter(), topics.reply_filter(name), *([raw[0]] if raw else [])):
            self.transport.subscribe(topic_filter)
        ready = threading.Event()

        def on_connection(event: ConnectionEvent, _detail: str) -> None:
            if event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
                ready.set()

        self.transport.connect(None, self._on_message, on_connection)
        if not ready.wait(10):
            raise SystemExit(f"bench/agent: {name} could not connect to {url}")
        time.sleep(0.2)  # let the SUBSCRIBEs reach the broker

    def wait_online(self, experts: set[int], model: str, timeout_s: float) -> None:
        """Until a device of every expert is online with `model`, then 1 s for the agents to see each other."""
        if not self.fleet.wait_for(experts, model, timeout_s):
            raise SystemExit(f"bench/agent: experts {sorted(experts - self.fleet.live_experts(model))} not online "
                             f"after {timeout_s:.0f} s")
        time.sleep(1.0)

    def infer_frame(self, device: str, expert: int, model: str, image: np.ndarray) -> Callable[[bytes], bytes]:
        """An inference request of one raw image [C, H, W] for `device`, uint8 if its presence lists version 2."""
        peer = self.fleet.peer(expert, model)
        encoding = raw_input_encoding(None if peer is None else peer.presence)
        return lambda cid: encode(ExpertRequest(cid, expert, now_ms() + 10_000, model, self.inbox, image[None],
                                                encoding))

    def close(self) -> None:
        self.transport.close()

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            kind, target, sender = self.topics.parse(topic)
        except ProtocolError:
            if self._raw is not None and topic == self._raw[0]:
                self._raw[1](payload)
            return
        if kind == TopicKind.PRESENCE:
            self.fleet.update(str(target), payload)
        elif kind == TopicKind.REPLY and target == self.name and sender is not None:
            self.requester.deliver(sender, payload, publish_packet_size(topic, payload))


# --- 1. round trip ---------------------------------------------------------------------------------

def measure_round_trip(url: str, port: int, bundles: dict[int, Bundle], tmp: Path, trips: int) -> RoundTrip:
    server = bundles[sorted(bundles)[1 if len(bundles) > 1 else 0]]
    e, version, device = server.manifest.expert_id, model_version(server), server.manifest.device_id
    topics = Topics("nmoe", "rt")
    latent = server.samples()["latent"][:1].astype(np.float32)

    def frame(cid: bytes) -> bytes:
        return encode(ExpertRequest(cid, e, now_ms() + 5000, version, topics.reply("bench-requester"), latent, "fp32"))

    req_size = len(frame(bytes(16)))
    resp_size = len(encode(ExpertResponse(bytes(16), e, 0, np.zeros((1, server.manifest.num_classes), np.float32))))
    say(f"1. round trip: REQUEST {req_size} B, RESPONSE {resp_size} B, {trips} trips each")
    arrived: list[float] = []
    got = threading.Event()

    def echo_reply(_payload: bytes) -> None:
        arrived.append(time.monotonic())
        got.set()

    client: FleetClient[None] = FleetClient(url, topics, "bench-requester", ("bench/raw/rep", echo_reply))
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(port), str(resp_size)], stdout=subprocess.PIPE,
                            text=True)
    raw = []
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        for i in range(100 + trips):
            got.clear()
            sent = time.monotonic()
            client.transport.publish("bench/raw/req", bytes(req_size))
            if not got.wait(5):
                raise SystemExit("bench/agent: no raw echo within 5 s")
            if i >= 100:
                raw.append(1000 * (arrived[-1] - sent))
    finally:
        echo.terminate()
        echo.wait()
    agent, compute = [], []
    with AgentProcesses() as procs:
        launch(procs, server, url, "rt", tmp)
        client.wait_online({e}, version, 60)
        for i in range(100 + trips):
            call = client.requester.send(topics.expert_request(e), device, e, frame, 5.0, None)
            if not client.requester.wait([call], time.monotonic() + 5) or not isinstance(call.reply, ExpertResponse):
                raise SystemExit(f"bench/agent: {device} did not answer a request: {call.fate} {call.reply}")
            if i >= 100:
                agent.append(1000 * (call.round_trip_s or 0.0))
                compute.append(call.reply.compute_us / 1000)
    client.close()
    return RoundTrip(device, e, req_size, resp_size, trips, raw, agent, compute,
                     back_to_back_compute(server, latent, trips))


def back_to_back_compute(bundle: Bundle, latent: np.ndarray, calls: int) -> list[float]:
    """ms per batch-1 expert call as the agent makes it (softmax of the runtime's output), called in a tight
    loop in this process: the model call on a busy core, without the idle gaps of a closed-loop round trip."""
    models = DeviceModels.open(bundle, precision_of(bundle))
    times = []
    for i in range(100 + calls):
        t0 = time.perf_counter()
        softmax(models.expert.run(latent))
        if i >= 100:
            times.append(1000 * (time.perf_counter() - t0))
    return times


# --- 2. throughput ---------------------------------------------------------------------------------

def flood(url: str, bundle: Bundle, fleet: str, tmp: Path, microbatch: bool, window: int, seconds: float,
          warmup_s: float) -> Throughput:
    """One expert server process; one lean requester keeps `window` batch-1 requests in flight."""
    e, version = bundle.manifest.expert_id, model_version(bundle)
    topics = Topics("nmoe", fleet)
    latent = bundle.samples()["latent"][:1].astype(np.float32)
    inbox = topics.reply("bench-flood")
    deadline = now_ms() + int(1000 * (warmup_s + seconds)) + 20_000
    topic = topics.expert_request(e)
    packets = [LeanMqtt.publish_packet(topic, encode(ExpertRequest(os.urandom(16), e, deadline, version, inbox,
                                                                   latent, "fp32"))) for _ in range(4096)]
    ok = errors = 0
    with AgentProcesses() as procs:
        events = launch(procs, bundle, url, fleet, tmp, *([] if microbatch else ["--no-microbatch"]))
        watcher: FleetClient[None] = FleetClient(url, topics, "bench-watcher")
        watcher.wait_online({e}, version, 60)
        watcher.close()
        with LeanMqtt(BrokerUrl.parse(url), f"bench-flood-{fleet}", topics.reply_filter("bench-flood")) as client:
            client.send(b"".join(packets[:window]))
            sent = window
            t0 = time.perf_counter()
            count_from, stop_at = t0 + warmup_s, t0 + warmup_s + seconds
            cpu0: float | None = None
            while (now := time.perf_counter()) < stop_at:
                if cpu0 is None and now >= count_from:
                    cpu0 = cpu_seconds(agent_pids(procs))
                replies = client.read_publishes(1.0)
                if now >= count_from:  # a load generator: replies are counted by kind, not matched
                    answered = sum(1 for r in replies if r[3] == 2)
                    ok, errors = ok + answered, errors + len(replies) - answered
                if replies:
                    client.send(b"".join(packets[(sent + i) % len(packets)] for i in range(len(replies))))
                    sent += len(replies)
            server_cpu = cpu_seconds(agent_pids(procs)) - (cpu0 or 0.0)
            elapsed = time.perf_counter() - count_from
        procs.stop()
    server = exit_counters(events).get("expert_server", {})
    return Throughput(microbatch, window, elapsed, ok, errors, float(server.get("mean_batch_size", float("nan"))),
                      1e6 * server_cpu / max(ok, 1))


# --- 3. fleet scaling ------------------------------------------------------------------------------

def fleet_run(url: str, bundles: list[Bundle], fleet: str, tmp: Path, seconds: float, warmup_s: float) -> Scaling:
    """N agent processes; the driver keeps one inference request in flight per device."""
    topics = Topics("nmoe", fleet)
    model = model_version(bundles[0])
    experts = {b.manifest.device_id: b.manifest.expert_id for b in bundles}
    images = {b.manifest.device_id: b.samples()["images"] for b in bundles}
    lock = threading.Lock()
    latencies: list[float] = []
    counts = Counter[str]()
    state = {"counting": False, "stop": False}
    with AgentProcesses() as procs:
        t_spawn = time.perf_counter()
        logs = [launch(procs, b, url, fleet, tmp, "--deadline-ms", "2000") for b in bundles]
        client: FleetClient[str] = FleetClient(url, topics, "bench-driver")
        client.wait_online(set(experts.values()), model, 180)
        startup = time.perf_counter() - t_spawn

        def send(device: str) -> None:
            with lock:
                counts["sent"] += 1
                image = images[device][counts["sent"] % len(images[device])]
            client.requester.send(topics.infer_request(device), device, experts[device],
                                  client.infer_frame(device, experts[device], model, image), 30.0, device, settled)

        def settled(call: Call[str]) -> None:
            with lock:
                if state["counting"]:
                    counts["answered" if call.fate == Fate.ANSWERED else "errors"] += 1
                    if call.fate == Fate.ANSWERED:
                        latencies.append(1000 * (call.round_trip_s or 0.0))
                stop = state["stop"]
            if not stop:
                send(call.context)

        for device in experts:
            send(device)
        time.sleep(warmup_s)
        with lock:
            state["counting"] = True
        t0, cpu0 = time.perf_counter(), cpu_seconds(agent_pids(procs))
        time.sleep(seconds)
        with lock:
            state["counting"], state["stop"] = False, True
        elapsed, agents_cpu = time.perf_counter() - t0, cpu_seconds(agent_pids(procs)) - cpu0
        time.sleep(0.5)
        lost = len(client.requester.pending())
        client.close()
        procs.stop()
    missing = sum(int(exit_counters(e).get("agent", {}).get("experts_missing", 0)) for e in logs)
    return Scaling(len(bundles), startup, elapsed, counts["answered"], counts["errors"], latencies, missing, lost,
                   1000 * agents_cpu / max(counts["answered"], 1))


# --- 4. latent encodings ---------------------------------------------------------------------------

def test_sets(bundles: dict[int, Bundle], run: Path | None) -> tuple[Sets, str]:
    """Per expert: (uint8 images, labels) of its device's personalized test set (or bundle samples)."""
    if run is not None:
        from export.bundle_writer import best_method
        from toolkit.artifacts import load_nmoe
        from toolkit.federated_data import prepare, raw_images

        data = prepare(load_nmoe(run, best_method(run)).config.data)
        if data.num_clients == len(bundles):
            return ({e: (raw_images(data.personal_test[e].x, b.manifest.input), data.personal_test[e].y.numpy())
                     for e, b in bundles.items()},
                    f"the personalized test sets of `{os.path.relpath(run, ROOT)}`")
    return ({e: (b.samples()["images"], b.samples()["labels"]) for e, b in bundles.items()},
            "the bundles' self-check samples (no run dir)")


def measure_encodings(url: str, bundles: dict[int, Bundle], sets: Sets, batch: int) -> dict[Encoding, EncodingRun]:
    models = {e: DeviceModels.open(b, precision_of(b)) for e, b in bundles.items()}
    runs = {enc: classify_with(url, bundles, models, sets, batch, enc) for enc in ENCODINGS}
    ref = runs["fp32"].labels
    return {enc: replace(r, agreement=100 * float(np.mean(np.concatenate([ref[e] == r.labels[e] for e in ref]))))
            for enc, r in runs.items()}


def classify_with(url: str, bundles: dict[int, Bundle], models: dict[int, DeviceModels], sets: Sets, batch: int,
                  enc: Encoding) -> EncodingRun:
    """Every device classifies its test set with in-process agents sending `enc` latents."""
    fleet = f"enc-{enc}"
    config = AgentConfig(fleet=fleet, latent_encoding=enc, deadline_ms=5000)
    agents = {e: Agent(b, MqttTransport(MqttSettings(BrokerUrl.parse(url), f"{fleet}-{b.manifest.device_id}")),
                       models[e], config) for e, b in bundles.items()}
    for a in agents.values():
        a.start()
    correct = total = missing = sent = requests = 0
    per_device, labels = {}, {}
    try:
        for a in agents.values():
            if not a.wait_for_experts(set(agents), 20):
                raise SystemExit(f"bench/agent: {a.me} does not see the fleet: {a.stats()}")
        for e, agent in agents.items():
            images, y = sets[e]
            pred = []
            for i in range(0, len(images), batch):
                r = agent.infer(images[i:i + batch])
                pred.append(r.labels)
                missing += len(r.missing) + r.fallback_rows
                sent += r.bytes_sent
                requests += len(r.remote_ms) + len(r.missing)
            labels[e] = np.concatenate(pred)
            per_device[e] = 100 * float(np.mean(labels[e] == y))
            correct += int(np.sum(labels[e] == y))
            total += len(y)
    finally:
        for a in agents.values():
            a.stop()
    b = next(iter(bundles.values()))
    latent = b.samples()["latent"][:1].astype(np.float32)
    frame = encode(ExpertRequest(bytes(16), 0, now_ms(), model_version(b), Topics("nmoe", fleet).reply(b.manifest.device_id),
                                 latent, enc))
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1}[enc]
    return EncodingRun(100 * correct / total, statistics.fmean(per_device.values()), total, labels, missing,
                       latent.size * itemsize + (5 if enc == "int8" else 0), len(frame), sent / max(requests, 1))


# --- 5. a frozen peer ------------------------------------------------------------------------------

def frozen_peer(url: str, bundles: dict[int, Bundle], sets: Sets, tmp: Path, seconds: float,
                rate: float = 20.0) -> FrozenPeer:
    """The fleet's agent processes; the first device classifies a stream of its test images; halfway the
    peer its gate chooses most is SIGSTOPped. Latencies by phase and by whether an input needs that peer."""
    asker = bundles[min(bundles)]
    e0, model, device = asker.manifest.expert_id, model_version(asker), asker.manifest.device_id
    images = sets[e0][0]
    local = LocalNMoE(bundles, precision_of(asker))
    chosen = local.route(e0, local.latents(e0, images))[0]
    frozen_e = Counter(int(e) for e in chosen.ravel() if e != e0).most_common(1)[0][0]
    frozen_dev = bundles[frozen_e].manifest.device_id
    needs = (chosen == frozen_e).any(axis=1)
    topics = Topics("nmoe", "frozen")
    latencies: dict[tuple[str, bool], list[float]] = {}
    calls: list[Call[tuple[str, bool]]] = []
    with AgentProcesses() as procs:
        logs = {b.manifest.device_id: launch(procs, b, url, "frozen", tmp) for b in bundles.values()}
        client: FleetClient[tuple[str, bool]] = FleetClient(url, topics, "bench-frozen")
        client.wait_online(set(bundles), model, 180)
        t0 = time.monotonic()
        for i in range(int(2 * seconds * rate)):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            phase = "normal" if i < seconds * rate else "frozen"
            if i == int(seconds * rate):
                os.kill(procs.pid(frozen_dev), signal.SIGSTOP)
            k = i % len(images)
            calls.append(client.requester.send(topics.infer_request(device), device, e0,
                                               client.infer_frame(device, e0, model, images[k]), 10.0,
                                               (phase, bool(needs[k]))))
        client.requester.wait(calls, time.monotonic() + 5)
        os.kill(procs.pid(frozen_dev), signal.SIGCONT)
        client.close()
        procs.stop()
    for call in calls:
        if call.fate == Fate.ANSWERED:
            latencies.setdefault(call.context, []).append(1000 * (call.round_trip_s or 0.0))
    inferences = [json.loads(line) for line in logs[device].read_text().splitlines()]
    avoided = sum(1 for ev in inferences if ev.get("event") == "inference" and frozen_e in ev.get("avoided", []))
    return FrozenPeer(device, frozen_dev, frozen_e, AgentConfig().deadline_ms, rate, seconds,
                      latencies.get(("normal", False), []), latencies.get(("frozen", False), []),
                      latencies.get(("frozen", True), []), avoided,
                      sum(1 for c in calls if c.fate != Fate.ANSWERED))


# --- main ------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", help="fleet for round trip, throughput, encodings and the frozen peer "
                    "(default: see above)")
    ap.add_argument("--run", help="run dir of --bundles for the personalized test sets (default: its provenance)")
    ap.add_argument("--fleet-bundles", help="fleet for scaling, one expert per process (default: a 32-client "
                    "tiny run trained here)")
    ap.add_argument("--sizes", default="2,4,8,16,32", help="fleet sizes (default 2,4,8,16,32)")
    ap.add_argument("--batch", type=int, default=32, help="rows per inference in the encodings part")
    ap.add_argument("--out", default="docs/results/agent.md", help="the report to write")
    ap.add_argument("--quick", action="store_true", help="smoke run: short phases, fleet sizes 2 and 4")
    args = ap.parse_args()
    start = time.time()
    bundles_dir, run, how = main_fleet(args)
    bundles = load_fleet(bundles_dir)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        fleet_dir, fleet_how = bundles_dir, how
        sizes = [n for n in (2, 4) if n <= len(bundles)]
    elif args.fleet_bundles:
        fleet_dir, fleet_how = Path(args.fleet_bundles), f"`{args.fleet_bundles}` (given)"
    else:
        run32, fleet_dir = ROOT / "runs/bench/agent-fleet32", ROOT / "runs/bench/agent-fleet32-bundles"
        train_export("tiny.toml", run32, fleet_dir, FLEET32_OVERRIDES, "fp32")
        fleet_how = ("`configs/tiny.toml` with 32 clients (`data.num_clients=32`, 3200 synthetic training images), "
                     "trained and exported (ONNX fp32) here into `runs/bench/agent-fleet32-bundles`; a fleet of N "
                     "runs devices 0..N-1, so for N < 32 the gates re-route to the next-best live experts")
    fleet = load_fleet(fleet_dir)
    sizes = [n for n in sizes if n <= len(fleet)]
    setup = time.time() - start
    sets, test_note = test_sets(bundles, run)
    load_start = other_load()
    say(load_start)
    trips = 200 if args.quick else 1000
    secs, warm = (2.0, 1.0) if args.quick else (8.0, 2.0)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmpdir:
        tmp = Path(tmpdir)
        with start_broker(BrokerOptions(tmp / "fleet", port=0)) as broker:
            url = broker.url
            rt = measure_round_trip(url, broker.port, bundles, tmp, trips)
            say(f"   raw {np.median(rt.raw):.3f} ms, agent {np.median(rt.agent):.3f} ms, "
                f"compute {np.median(rt.compute):.3f} ms")
            server = bundles[min(bundles)]
            tp = []
            for mb in (True, False):
                say(f"2. throughput, micro-batching {'on' if mb else 'off'}")
                tp.append(flood(url, server, f"tp-{'on' if mb else 'off'}", tmp, mb, 32, secs, warm))
                say(f"   {tp[-1].rps:.0f} req/s, mean batch {tp[-1].mean_batch:.2f}")
            say("4. latent encodings")
            enc = measure_encodings(url, bundles, sets, args.batch)
            say("   " + ", ".join(f"{k} {v.accuracy:.2f}%" for k, v in enc.items()))
            say("5. a frozen peer")
            frozen = frozen_peer(url, bundles, sets, tmp, 3.0 if args.quick else 6.0)
            say(f"   p95 of unrelated inferences {frozen.ratio:.2f}x before the freeze")
            scaling = []
            for n in sizes:
                say(f"3. fleet of {n} agent processes")
                scaling.append(fleet_run(url, [fleet[e] for e in sorted(fleet)[:n]], f"scale{n}", tmp, secs, warm))
                s = scaling[-1]
                say(f"   start-up {s.startup_s:.1f} s, {s.ips:.0f} inferences/s, errors {s.errors}, lost {s.lost}")
    options = [f"--bundles {args.bundles}" if args.bundles else "", f"--run {args.run}" if args.run else "",
               f"--fleet-bundles {args.fleet_bundles}" if args.fleet_bundles else "", "--quick" if args.quick else ""]
    command = " ".join(["python -m bench.agent", *filter(None, options)]) if any(options) else "make bench-agent"
    results = Results(Setup(command, args.quick, machine(), load_start, other_load(), f"{how}; {len(bundles)} devices",
                            fleet_how, test_note, args.batch, time.time() - start, setup),
                      rt, tp, scaling, enc, frozen)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
