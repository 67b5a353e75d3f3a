"""N simulated devices in one process, for measuring a coordinator (`nmoe loadgen`, docs/scale.md).

Each simulated device announces a retained online presence for its expert (device `{name}-{e}`
holds expert e) and answers the coordinator's COMMANDs (docs/protocol.md §16, through the same
frames, chunks and inbox as an agent: `device_agent.wire.training_*`) with plausible RESULTs after a
drawn delay, without training anything:

- `setup`: the data shape of the run's dataset, its expert as `client`, a drawn example count;
- `fit`: exactly the tensors named in `upload`, each the COMMAND's tensor plus small noise (same
  name, shape, float32, finite), the device's example count, a `loss`;
- `evaluate`: accuracies in [0, 1]; for an NMoE job (`stage3_*`) also `routing.<e>`, the shares of
  top-k choices drawn over its personal test split, for the experts it chose (an absent share is 0:
  with every expert's share the RESULT header outgrows the protocol's 16 KiB near 700 experts);
- `use_extractor`, `train_expert`, `prepare_gate`: `ok` (no device-to-device expert traffic is
  simulated: `prepare_gate`'s N^2 expert requests are the devices' cost, not the coordinator's);
- `commit`: `ok`, and the device's presence announces the new model version.

As a real agent does, a device refuses a COMMAND past its deadline or of a run it is not set up for,
and answers a repeated task id with its stored RESULT. A chosen share of the devices misbehave on
`fit` (every other op they answer normally, since the recipe needs every device for them):
`failing` answer `error`, `late` answer `ok` one second after the deadline, `silent` never answer.

**Connections (the multiplexing trade-off).** Devices share connections, `per_connection` each (1:
one connection per device, as a real fleet). A connection subscribes to the COMMAND topic of each
of its devices and publishes their presences and RESULTs. MQTT registers one last will per
connection, so only a connection's first device has its offline presence as the will: if the load
generator dies, the coordinator sees that device go offline and the connection's other devices stay
online (retained) until their COMMANDs time out. A clean stop publishes every device's offline
presence. With `per_connection=1` a crash behaves exactly like a fleet's; it costs one socket and one
paho network thread per device.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from device_agent.wire.clock import now_ms
from device_agent.wire.protocol import (
    Caps,
    Presence,
    ProtocolError,
    TopicKind,
    Topics,
    encode_presence,
)
from device_agent.wire.tensor_codec import ENCODINGS
from device_agent.wire.training_frames import Command, Op, Result, Status, routing_metrics
from device_agent.wire.training_link import (
    COORDINATOR,
    DEFAULT_MAX_MESSAGE,
    TrainingInbox,
    send_training,
)
from device_agent.wire.transport import ConnectionEvent, Publication, Transport

Behaviour = Literal["ok", "failing", "late", "silent"]
UNTRAINED = "untrained"  # an agent's presence model before it has any (device_agent.agent.UNTRAINED)
DATASETS: dict[str, tuple[int, int, int, int, int]] = {  # dataset -> (channels, height, width, classes, test images)
    "fashion_mnist": (1, 28, 28, 10, 10_000), "cifar10": (3, 32, 32, 10, 10_000)}
LATE_BY_S = 1.0  # a `late` device answers this long after the deadline
RESULTS_KEPT = 8  # per device: RESULTs kept for a repeated task id
NOISE = 0.01  # standard deviation of the noise a `fit` adds to each parameter


@dataclass(frozen=True)
class Delay:
    """How long a simulated device takes for one task: `fixed:S`, `uniform:LO,HI` or `lognormal:MEDIAN,SIGMA`."""

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Delay:
        """ValueError with the accepted forms for anything else."""
        kind, _, args = text.partition(":")
        try:
            values = [float(v) for v in args.split(",")] if args else []
        except ValueError:
            values = []
        shapes = {"fixed": 1, "uniform": 2, "lognormal": 2}
        if kind not in shapes or len(values) != shapes[kind] or not all(math.isfinite(v) and v >= 0 for v in values) \
                or kind == "uniform" and values[0] > values[1]:
            raise ValueError(f"delay {text!r}: expected fixed:S, uniform:LO,HI (LO <= HI) or lognormal:MEDIAN,SIGMA "
                             "(seconds, >= 0)")
        return cls(kind, values[0], values[1] if len(values) > 1 else 0.0)  # type: ignore[arg-type]

    def draw(self, rng: np.random.Generator) -> float:
        if self.kind == "uniform":
            return float(rng.uniform(self.a, self.b))
        if self.kind == "lognormal":
            return float(self.a * math.exp(self.b * rng.standard_normal()))
        return self.a


@dataclass(frozen=True)
class LoadOptions:
    """What to simulate and where."""

    devices: int
    first_expert: int = 0  # devices hold experts first_expert .. first_expert + devices - 1
    per_connection: int = 50
    delay: Delay = Delay()
    failing: float = 0.0  # shares of the devices that misbehave on `fit` (see the module docstring)
    late: float = 0.0
    silent: float = 0.0
    examples: tuple[int, int] = (10, 100)  # a device's training examples, drawn uniformly in [lo, hi]
    seed: int = 0
    name: str = "sim"  # devices are `{name}-{expert}`
    prefix: str = "nmoe"
    fleet: str = "default"
    max_message: int = DEFAULT_MAX_MESSAGE

    def __post_init__(self) -> None:
        if self.devices < 1 or self.per_connection < 1 or self.first_expert < 0:
            raise ValueError("devices and per_connection must be >= 1, first_expert >= 0")
        if min(self.failing, self.late, self.silent) < 0 or self.failing + self.late + self.silent > 1:
            raise ValueError("failing, late and silent are shares of the devices: each >= 0, together <= 1")
        if not 1 <= self.examples[0] <= self.examples[1]:
            raise ValueError(f"examples {self.examples}: need 1 <= lo <= hi")


@dataclass
class SimDevice:
    """One simulated device: its name, expert, behaviour on `fit` and what it remembers."""

    name: str
    expert: int
    behaviour: Behaviour
    examples: int
    link: _Connection
    model: str = UNTRAINED
    run: str | None = None
    results: OrderedDict[bytes, Result | None] = field(default_factory=OrderedDict)
    inbox: TrainingInbox | None = None

    def presence(self) -> Presence:
        return Presence(self.name, self.expert, "online", self.model, Caps(("onnx",), ENCODINGS, 256), time.time(),
                        (1, 2))


class _Connection:
    """One broker connection carrying the topics of several devices."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.devices: list[SimDevice] = []
        self.connected = threading.Event()
        self.settled = threading.Event()  # connected, or the first attempt failed (`failure` says why)
        self.failure = ""


class LoadGenerator:
    """See the module docstring. `start`, then `wait_connected`; `stop` when done; `stats` at any time."""

    def __init__(self, options: LoadOptions, transport: Callable[[str], Transport]) -> None:
        self.options = options
        self.topics = Topics(options.prefix, options.fleet)
        self.counters: Counter[str] = Counter()
        self._lock = threading.Condition()
        self._due: list[tuple[float, int, str, Command | None]] = []  # (when, seq, device, command; None: stop)
        self._seq = itertools.count()
        self._rng = np.random.default_rng(options.seed)
        self._runs: dict[str, dict[str, Any]] = {}  # run id -> its resolved config
        self._connections: list[_Connection] = []
        self.devices: dict[str, SimDevice] = {}
        for e, behaviour, examples in self._draw_devices():
            if len(self.devices) % options.per_connection == 0:
                self._connections.append(_Connection(transport(f"{options.name}-loadgen-{e}")))
            device = SimDevice(f"{options.name}-{e}", e, behaviour, examples, self._connections[-1])
            device.inbox = TrainingInbox(partial(self._on_command, device))
            self._connections[-1].devices.append(device)
            self.devices[device.name] = device
        self._worker = threading.Thread(target=self._work, name="loadgen", daemon=True)

    def _draw_devices(self) -> list[tuple[int, Behaviour, int]]:
        o, n = self.options, self.options.devices
        shares: list[tuple[Behaviour, int]] = [("failing", round(o.failing * n)), ("late", round(o.late * n)),
                                               ("silent", round(o.silent * n))]
        kinds: list[Behaviour] = [kind for kind, count in shares for _ in range(count)]
        kinds += ["ok"] * (n - len(kinds))
        order = self._rng.permutation(n)
        examples = self._rng.integers(o.examples[0], o.examples[1] + 1, n)
        return [(o.first_expert + i, kinds[order[i]], int(examples[i])) for i in range(n)]

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect every connection (its first device's offline presence as the will) and start answering."""
        self._worker.start()
        for conn in self._connections:
            for d in conn.devices:
                conn.transport.subscribe(self.topics.train_command(d.name), qos=1)
            first = conn.devices[0]
            will = Publication(self.topics.presence(first.name), encode_presence(Presence.offline(first.name, first.expert)),
                               qos=1, retain=True)
            conn.transport.connect(will, partial(self._on_message, conn), partial(self._on_connection, conn))

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether every connection is up (and its devices announced) within `timeout_s`; False as soon as
        one cannot connect (broker unreachable or refusing: `failure()` says why)."""
        end = time.monotonic() + timeout_s
        for c in self._connections:
            c.settled.wait(max(0.0, end - time.monotonic()))
            if not c.connected.is_set():
                return False
        return True

    def failure(self) -> str:
        """Why a connection could not connect ("" if none failed)."""
        return next((c.failure for c in self._connections if c.failure), "")

    def stop(self) -> None:
        """Stop answering, publish every device's offline presence and disconnect."""
        with self._lock:
            heapq.heappush(self._due, (0.0, -1, "", None))
            self._lock.notify()
        self._worker.join(timeout=10)
        for conn in self._connections:
            for d in conn.devices[1:]:
                conn.transport.publish(self.topics.presence(d.name),
                                       encode_presence(Presence.offline(d.name, d.expert)), qos=1, retain=True)
            first = conn.devices[0]
            conn.transport.close(Publication(self.topics.presence(first.name),
                                             encode_presence(Presence.offline(first.name, first.expert)), 1, True))

    def stats(self) -> dict[str, int]:
        """Counters: commands by op, results by op and status, fit updates sent in time, late, silent, resent."""
        with self._lock:
            return dict(sorted(self.counters.items()))

    @property
    def connections(self) -> int:
        return len(self._connections)

    # incoming (transport threads) ------------------------------------------------------------------

    def _on_connection(self, conn: _Connection, event: ConnectionEvent, detail: str) -> None:
        if event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
            for d in conn.devices:
                self._announce(d)
            conn.connected.set()
            conn.settled.set()
        elif event == ConnectionEvent.DISCONNECTED:
            conn.connected.clear()
        elif event in (ConnectionEvent.UNREACHABLE, ConnectionEvent.REFUSED) and not conn.settled.is_set():
            conn.failure = f"{'refused' if event == ConnectionEvent.REFUSED else 'unreachable'}: {detail}"
            conn.settled.set()

    def _announce(self, d: SimDevice) -> None:
        d.link.transport.publish(self.topics.presence(d.name), encode_presence(d.presence()), qos=1, retain=True)

    def _on_message(self, conn: _Connection, topic: str, payload: bytes) -> None:
        try:
            kind, device, _ = self.topics.parse(topic)
        except ProtocolError:
            return
        d = self.devices.get(str(device))
        if kind == TopicKind.TRAIN_COMMAND and d is not None and d.inbox is not None:
            d.inbox.deliver(COORDINATOR, topic, payload)

    def _on_command(self, d: SimDevice, _sender: str, msg: Command | Result, _nbytes: int) -> None:
        if not isinstance(msg, Command):
            return
        with self._lock:
            self.counters[f"commands_{msg.op.value}"] += 1
            seen, stored = msg.task_id in d.results, d.results.get(msg.task_id)
            if not seen:
                d.results[msg.task_id] = None
                while len(d.results) > RESULTS_KEPT:
                    d.results.popitem(last=False)
        if seen:
            self.counters["repeated_commands"] += 1
            if stored is not None:
                self._send(d, stored, "resent")
            return
        if msg.op == Op.FIT and d.behaviour == "silent":
            self._count("silent_fits")
            return
        if msg.op == Op.FIT and d.behaviour == "late":
            when = max(time.monotonic(), time.monotonic() + (msg.deadline_ms - now_ms()) / 1000 + LATE_BY_S)
        else:
            with self._lock:
                when = time.monotonic() + self.options.delay.draw(self._rng)
        refused = now_ms() > msg.deadline_ms
        with self._lock:
            heapq.heappush(self._due, (0.0 if refused else when, next(self._seq), d.name, msg))
            self._lock.notify()

    # answering (the worker thread) -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._lock.wait(None if not self._due else self._due[0][0] - time.monotonic())
                _, _, name, cmd = heapq.heappop(self._due)
            if cmd is None:
                return
            d = self.devices[name]
            result = self._answer(d, cmd)
            with self._lock:
                if cmd.task_id in d.results:
                    d.results[cmd.task_id] = result
            late = now_ms() > cmd.deadline_ms
            self._send(d, result, "late" if late else "in_time")
            if cmd.op == Op.FIT and result.status == Status.OK and not late:
                self._count("fit_updates_in_time")
            if cmd.op == Op.COMMIT and result.status == Status.OK:
                self._announce(d)

    def _answer(self, d: SimDevice, cmd: Command) -> Result:
        if now_ms() > cmd.deadline_ms and not (cmd.op == Op.FIT and d.behaviour == "late"):
            return _result(cmd, Status.REFUSED, error="deadline passed before the task started")
        if cmd.op == Op.SETUP:
            return self._setup(d, cmd)
        config = self._runs.get(cmd.run)
        if cmd.run != d.run or config is None:
            return _result(cmd, Status.REFUSED, error=f"not set up for run {cmd.run} (current: {d.run})")
        rng = np.random.default_rng([self.options.seed, d.expert, cmd.round, len(cmd.job), cmd.seed & 0xFFFF])
        if cmd.op == Op.FIT:
            if d.behaviour == "failing":
                return _result(cmd, Status.ERROR, error="RuntimeError: simulated failure (load generator)")
            missing = [n for n in cmd.upload if n not in cmd.tensors]
            if missing:
                return _result(cmd, Status.ERROR, error=f"KeyError: no tensor to update for {missing[:3]}")
            tensors = {n: (cmd.tensors[n] + rng.normal(0.0, NOISE, cmd.tensors[n].shape)).astype(np.float32)
                       for n in cmd.upload}
            return _result(cmd, Status.OK, d.examples, {"loss": 2.3 * math.exp(-0.1 * cmd.round) + rng.uniform(0, 0.1)},
                           tensors)
        if cmd.op == Op.EVALUATE:
            return _result(cmd, Status.OK, int(config["data"]["personal_test_size"]), self._evaluation(cmd, config, rng))
        if cmd.op == Op.COMMIT:
            d.model = str(cmd.config.get("model_version", d.model))
            return _result(cmd, Status.OK, d.examples, {"rebuild_s": 0.0})
        return _result(cmd, Status.OK, d.examples)

    def _setup(self, d: SimDevice, cmd: Command) -> Result:
        config = cmd.config.get("run_config")
        if not isinstance(config, dict):
            return _result(cmd, Status.ERROR, error="setup needs config.run_config (the resolved config)")
        try:
            c, h, w, classes, public = data_shape(config)
            personal = int(config["data"]["personal_test_size"])
        except (KeyError, TypeError, ValueError) as e:
            return _result(cmd, Status.ERROR, error=f"ValueError: the run config's data section: {e}")
        with self._lock:
            self._runs[cmd.run] = config
        d.run = cmd.run
        return _result(cmd, Status.OK, d.examples, {
            "client": d.expert, "num_classes": classes, "input_channels": c, "input_height": h, "input_width": w,
            "test_examples": personal, "global_test_examples": public, "wants_init": 0.0})

    def _evaluation(self, cmd: Command, config: dict[str, Any], rng: np.random.Generator) -> dict[str, float]:
        accuracy = min(1.0, 0.3 + 0.05 * cmd.round + float(rng.uniform(0, 0.1)))
        metrics = {"personalized_accuracy": accuracy, "global_accuracy": accuracy * 0.8}
        if cmd.job.startswith("stage3_"):
            experts, k = int(config["data"]["num_clients"]), int(config["model"]["top_k"])
            tests = int(config["data"]["personal_test_size"])
            chosen = np.argpartition(rng.random((tests, experts)), experts - k, axis=1)[:, experts - k:]
            shares = np.bincount(chosen.ravel(), minlength=experts) / chosen.size
            metrics |= routing_metrics(shares)
        return metrics

    def _send(self, d: SimDevice, result: Result, how: str) -> None:
        try:
            send_training(d.link.transport, self.topics.train_result(d.name), result, self.options.max_message)
        except ProtocolError as e:  # e.g. a header over the protocol's 16 KiB: what an agent could not send either
            self._count(f"unsendable_{result.op.value}")
            result = _result(result, Status.ERROR, error=f"ProtocolError: {e}")
            send_training(d.link.transport, self.topics.train_result(d.name), result, self.options.max_message)
        self._count(f"results_{how}")
        self._count(f"results_{result.op.value}_{result.status.value}")

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1


def data_shape(run_config: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(channels, height, width, classes, public test images) of the run's dataset, from its resolved config."""
    data = run_config["data"]
    if data["dataset"] == "synthetic":
        size = int(data["synthetic_image_size"])
        return 1, size, size, 10, int(data["synthetic_test"])
    if data["dataset"] not in DATASETS:
        raise ValueError(f"unknown dataset {data['dataset']!r}")
    return DATASETS[data["dataset"]]


def _result(cmd: Command | Result, status: Status, n: int = 0, metrics: dict[str, float] | None = None,
            tensors: dict[str, np.ndarray] | None = None, error: str = "") -> Result:
    return Result(cmd.task_id, cmd.op, cmd.run, cmd.job, cmd.round, status, n, dict(metrics or {}), error, tensors or {})

