"""A device agent's part in federated training: the coordinator's COMMANDs in, RESULTs out.

The service receives COMMANDs on `train/{me}/cmd` (protocol §15), runs one at a time on its own
thread through the device's `DeviceOps` (device_agent.training.device_ops), and publishes one
RESULT per COMMAND on `train/{me}/up`. It never blocks the transport's thread.

Reliability (docs/federated.md):
- a COMMAND seen before (same task id; MQTT QoS 1 redelivers, a coordinator re-sends after a
  reconnect) is not run again: its stored RESULT is sent again (or nothing, while it runs);
- a COMMAND past its deadline, or of another run than the one set up, is answered `refused`;
- every operation's private state is persisted atomically in the state dir before the RESULT is
  sent, with, for each job, its last round and the state before that round, so a round asked
  again (after a coordinator restart) is recomputed from the same state, and a stale round
  (older than the device's last one for that job) is refused;
- a restarted agent loads its run, its private state, and serves again what it served.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.bundle import BundleError, InputSpec, load_bundle
from device_agent.device_data import DeviceData
from device_agent.device_models import DeviceModels
from device_agent.expert_queries import ExpertQueryError, QueryLimits, expert_outputs
from device_agent.training.device_ops import (
    DRAWS_TORCH_INIT,
    INIT,
    DeviceOps,
    OperationRefused,
    Params,
    load_device_ops,
)
from device_agent.wire.clock import now_ms
from device_agent.wire.events import Counters, EventLog
from device_agent.wire.tensor_codec import ProtocolError
from device_agent.wire.training_frames import Command, Op, Result, Status
from device_agent.wire.training_link import (
    COORDINATOR,
    DEFAULT_MAX_MESSAGE,
    TrainingInbox,
    send_training,
)

RESULTS_KEPT = 64  # RESULTs remembered by task id, for COMMANDs delivered twice
STATE_FILE, JOURNAL_FILE, BUNDLE_DIR = "state.npz", "journal.json", "bundle"
BEFORE = "before/"  # state.npz key prefix of a job's state before its last round


def _initial(tensors: Params) -> Params:
    """The initial parameters a COMMAND carries (`init.<name>`), by name."""
    return {k.removeprefix(INIT): v for k, v in tensors.items() if k.startswith(INIT)}


def training_version(run: str, stage1: str) -> str:
    """The model version under which a device serves its Stage 2 expert during run `run`."""
    return f"train-{run}-{stage1}"


@dataclass(frozen=True)
class ServiceOptions:
    """How a device trains."""

    backend: str = "torch"  # "torch" (exactly the simulation's updates) or "numpy" (torch-free Stages 2-3)
    max_message: int = DEFAULT_MAX_MESSAGE
    queue_size: int = 16
    query: QueryLimits = field(default_factory=QueryLimits)


class TrainingService:
    """See the module docstring. `attach` before `agent.start()`; `stop` after."""

    def __init__(self, agent: Agent, data: DeviceData, state_dir: Path, options: ServiceOptions = ServiceOptions(),
                 events: EventLog | None = None) -> None:
        self.agent, self.data, self.state_dir, self.options = agent, data, Path(state_dir), options
        self.events = events or agent.events
        self.counters = Counters()
        self.inbox = TrainingInbox(self._on_message)
        self._queue: queue.Queue[Command | None] = queue.Queue(options.queue_size)
        self._results: OrderedDict[bytes, Result | None] = OrderedDict()  # task id -> RESULT (None: running)
        self._lock = threading.Lock()
        self._run: str | None = None
        self._config: dict[str, Any] = {}
        self._journal: dict[str, Any] = {"jobs": {}, "staging": [], "committed": None}
        self.ops: DeviceOps | None = None
        self._before: dict[str, Params] = {}  # job -> its private state before its last round
        self._worker = threading.Thread(target=self._work, name="training", daemon=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # lifecycle -----------------------------------------------------------------------------------

    def attach(self) -> None:
        """Hook into the agent (before it starts) and resume a run persisted in the state dir."""
        self.agent.training = self.receive
        self._resume()
        self._worker.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout=30)

    # incoming (the transport's thread) ------------------------------------------------------------

    def receive(self, topic: str, payload: bytes) -> None:
        """A payload on train/{me}/cmd (only the coordinator may publish there: broker ACL)."""
        self.inbox.deliver(COORDINATOR, topic, payload)

    def _on_message(self, _sender: str, msg: Command | Result, _nbytes: int) -> None:
        if not isinstance(msg, Command):
            self.counters.add("dropped_not_command")
            return
        with self._lock:
            seen = msg.task_id in self._results
            stored = self._results.get(msg.task_id)
            if not seen:
                self._results[msg.task_id] = None
        if seen:
            self.counters.add("duplicate_commands")
            if stored is not None:
                self._send(stored)
            return
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            with self._lock:
                self._results.pop(msg.task_id, None)
            self._send(self._result(msg, Status.ERROR, error=f"busy: {self.options.queue_size} commands queued"))

    # the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while (cmd := self._queue.get()) is not None:
            started = time.perf_counter()
            try:
                result = self._execute(cmd)
            except (OperationRefused, ExpertQueryError, BundleError, ValueError, KeyError) as e:
                result = self._result(cmd, Status.ERROR, error=f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 -- a task's failure is a RESULT, never a dead agent
                self.events.emit("error", where="training", op=cmd.op.value, error=f"{type(e).__name__}: {e}")
                result = self._result(cmd, Status.ERROR, error=f"{type(e).__name__}: {e}")
            self.counters.add(f"{cmd.op.value}_{result.status.value}")
            self.events.emit("training", op=cmd.op.value, job=cmd.job, round=cmd.round, status=result.status.value,
                             seconds=round(time.perf_counter() - started, 3), error=result.error[:200])
            with self._lock:
                self._results[cmd.task_id] = result
                while len(self._results) > RESULTS_KEPT:
                    self._results.popitem(last=False)
            self._send(result)

    def _execute(self, cmd: Command) -> Result:
        if now_ms() > cmd.deadline_ms:
            return self._result(cmd, Status.REFUSED, error="deadline passed before the task started")
        if cmd.op == Op.SETUP:
            return self._setup(cmd)
        if cmd.run != self._run or self.ops is None:
            return self._result(cmd, Status.REFUSED, error=f"not set up for run {cmd.run} (current: {self._run})")
        ops, c = self.ops, cmd.config
        if cmd.op == Op.FIT:
            return self._fit(ops, cmd)
        if cmd.op == Op.EVALUATE:
            n, metrics = ops.evaluate(cmd.job, cmd.round, cmd.tensors, cmd.seed)
            return self._result(cmd, Status.OK, n, metrics)
        if cmd.op == Op.USE_EXTRACTOR:
            n, metrics = ops.use_extractor(str(c["stage1"]), cmd.tensors)
        elif cmd.op == Op.TRAIN_EXPERT:
            n, metrics = ops.train_expert(str(c["stage1"]), int(c["init_seed"]), cmd.seed, _initial(cmd.tensors))
            self._serve_staging(ops, str(c["stage1"]))
        elif cmd.op == Op.PREPARE_GATE:
            stage1 = str(c["stage1"])
            version = training_version(cmd.run, stage1)
            n, metrics = ops.prepare_gate(stage1, tuple(int(e) for e in c["experts"]), lambda e, z: expert_outputs(
                self.agent.requester, self.agent.fleet, self.agent.topics, self.agent.inbox, e, version, z,
                self.options.query), _initial(cmd.tensors))
        elif cmd.op == Op.COMMIT:
            n, metrics = self._commit(ops, cmd)
        else:
            return self._result(cmd, Status.REFUSED, error=f"unknown op {cmd.op}")
        self._persist()
        return self._result(cmd, Status.OK, n, metrics)

    def _setup(self, cmd: Command) -> Result:
        """Bind this device to run `cmd.run` with its resolved config (a new run replaces the old one)."""
        config = cmd.config.get("run_config")
        if not isinstance(config, dict):
            return self._result(cmd, Status.ERROR, error="setup needs config.run_config (the resolved config)")
        if cmd.run != self._run:
            self.ops = load_device_ops(self.options.backend)(self.data.client, config, self.data, self.state_dir)
            self._run, self._config = cmd.run, config
            self._journal = {"jobs": {}, "staging": [], "committed": None}
            self._before = {}
            self._persist()
        c, h, w = self.data.input_shape
        return self._result(cmd, Status.OK, len(self.data.train), {
            "client": self.data.client, "num_classes": self.data.num_classes, "input_channels": c,
            "input_height": h, "input_width": w, "test_examples": len(self.data.test),
            "global_test_examples": 0 if self.data.global_test is None else len(self.data.global_test),
            "wants_init": float(self.options.backend not in DRAWS_TORCH_INIT)})

    def _fit(self, ops: DeviceOps, cmd: Command) -> Result:
        """A round, recomputed from the same state when asked again; a stale round is refused."""
        jobs: dict[str, Any] = self._journal["jobs"]
        last = jobs.get(cmd.job)
        if last is not None and cmd.round < last["round"]:
            return self._result(cmd, Status.REFUSED, error=f"stale round {cmd.round} of {cmd.job} "
                                                           f"(this device trained round {last['round']})")
        if last is not None and cmd.round == last["round"] and cmd.job in self._before:
            ops.set_state(cmd.job, self._before[cmd.job])  # the same round again: from the same state
        elif cmd.job in ops.state_keys():
            self._before[cmd.job] = {k: v.copy() for k, v in ops.get_state(cmd.job).items()}
        params, n, metrics = ops.fit(cmd.job, cmd.round, cmd.tensors, cmd.upload, cmd.seed)
        jobs[cmd.job] = {"round": cmd.round}
        self._persist()
        return self._result(cmd, Status.OK, n, metrics, params)

    def _serve_staging(self, ops: DeviceOps, stage1: str) -> None:
        """Serve the just-trained expert to peers gathering their gate data."""
        assert self._run is not None
        version = training_version(self._run, stage1)
        latent_dim = int(self._config["model"]["latent_dim"])
        self.agent.serve_expert_version(version, latent_dim, lambda z: ops.expert_outputs(stage1, z))
        if stage1 not in self._journal["staging"]:
            self._journal["staging"].append(stage1)

    def _commit(self, ops: DeviceOps, cmd: Command) -> tuple[int, dict[str, float]]:
        """Rebuild the inference files (fp32 and int8 ONNX) and serve them as `model_version`."""
        from device_agent.rebuild import (  # needs onnx: only when used
            DeviceSpec,
            NewWeights,
            rebuild_bundle,
        )

        c, assert_run = cmd.config, self._run
        assert assert_run is not None
        gate_job = c.get("gate_job")
        final = ops.final_models(str(c["stage1"]), str(gate_job) if gate_job else None, cmd.tensors)
        model = self._config["model"]
        spec = DeviceSpec(self.agent.me, self.agent.expert_id, int(c["num_experts"]), int(model["top_k"]),
                          list(self.data.class_names), "gate" if final.gate is not None else "random",
                          InputSpec(list(self.data.input_shape), "uint8", self.data.scale, list(self.data.mean),
                                    list(self.data.std), "NCHW"))
        started = time.perf_counter()
        calibration = self.data.train.x[: int(c.get("calibration", 256))]
        bundle = rebuild_bundle(
            self.state_dir / BUNDLE_DIR, spec, NewWeights(final.extractor, final.gate, final.expert), calibration,
            model_version=str(c["model_version"]), run_id=assert_run, round_index=cmd.round,
            precisions=tuple(c.get("precisions", ("fp32", "int8"))), sample_images=self.data.test.x[:16],
            sample_labels=self.data.test.y[:16], provenance={"coordinator_config_hash": c.get("config_hash", ""), **dict(c.get("provenance") or {})})
        precision = str(c.get("serve_precision", "fp32"))
        self.agent.install(bundle, DeviceModels.open(bundle, precision, "onnx"))
        self._journal["committed"] = {"model_version": bundle.manifest.model_version, "precision": precision}
        return len(self.data.train), {"rebuild_s": round(time.perf_counter() - started, 3)}

    # persistence --------------------------------------------------------------------------------

    def _persist(self) -> None:
        """The run, the journal and every private state, atomically (temp file + rename)."""
        arrays: dict[str, np.ndarray] = {}
        if self.ops is not None:
            states = {key: self.ops.get_state(key) for key in self.ops.state_keys()}
            states |= {f"{BEFORE}{job}": state for job, state in self._before.items()}
            for key, state in states.items():
                for name, value in state.items():
                    arrays[f"{key}::{name}"] = value
        _atomic(self.state_dir / STATE_FILE, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
        meta = {"run": self._run, "config": self._config, "journal": self._journal, "client": self.data.client}
        _atomic(self.state_dir / JOURNAL_FILE, lambda f: f.write(json.dumps(meta).encode("utf-8")))

    def _resume(self) -> None:
        """Load a persisted run: its ops, private state, staging experts and committed bundle."""
        journal = self.state_dir / JOURNAL_FILE
        if not journal.exists():
            return
        try:
            meta = json.loads(journal.read_text())
            with np.load(self.state_dir / STATE_FILE, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            self.events.emit("error", where="training resume", error=f"state dir unreadable, starting fresh: {e}")
            return
        if meta.get("run") is None or meta.get("client") != self.data.client:
            return
        self._run, self._config, self._journal = meta["run"], meta["config"], meta["journal"]
        self.ops = load_device_ops(self.options.backend)(self.data.client, self._config, self.data, self.state_dir)
        states: dict[str, Params] = {}
        for flat, value in arrays.items():
            key, _, name = flat.partition("::")
            states.setdefault(key, {})[name] = value
        self._before = {k.removeprefix(BEFORE): v for k, v in states.items() if k.startswith(BEFORE)}
        for key in sorted((k for k in states if not k.startswith(BEFORE)), key=lambda k: (not k.startswith("extractor/"), k)):
            self.ops.set_state(key, states[key])  # extractors first: the latents are computed from them
        for stage1 in self._journal.get("staging", []):
            self._serve_staging(self.ops, stage1)
        self._install_committed()
        self.events.emit("training_resumed", run=self._run, keys=len(states))

    def _install_committed(self) -> None:
        committed = self._journal.get("committed")
        if not committed:
            return
        try:
            bundle = load_bundle(self.state_dir / BUNDLE_DIR)
            self.agent.install(bundle, DeviceModels.open(bundle, committed.get("precision", "fp32"), "onnx"))
        except BundleError as e:
            self.events.emit("error", where="training resume", error=f"committed bundle unusable: {e}")

    # sending ------------------------------------------------------------------------------------

    def _result(self, cmd: Command, status: Status, n: int = 0, metrics: dict[str, float] | None = None,
                tensors: Params | None = None, error: str = "") -> Result:
        return Result(cmd.task_id, cmd.op, cmd.run, cmd.job, cmd.round, status, n,
                      {k: float(v) for k, v in (metrics or {}).items()}, error[:1000], tensors or {})

    def _send(self, result: Result) -> None:
        """Publish `result`; one that cannot be encoded (e.g. a header over the protocol's limit) goes out as an
        ERROR saying so, so that the coordinator counts a failure and this worker keeps serving."""
        topic = self.agent.topics.train_result(self.agent.me)
        try:
            sent = send_training(self.agent.transport, topic, result, self.options.max_message)
        except ProtocolError as e:
            self.events.emit("error", where="training", op=result.op.value, error=f"result not sendable: {e}")
            self.counters.add("unsendable_results")
            failed = replace(result, status=Status.ERROR, num_examples=0, metrics={}, tensors={},
                             error=f"result not sendable: {e}"[:1000])
            sent = send_training(self.agent.transport, topic, failed, self.options.max_message)
        self.counters.add("result_bytes", sent)


def _atomic(path: Path, write: Callable[[Any], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
