"""The "numpy" device operations: Stages 2 and 3 without torch (docs/federated.md).

Latents come from the shared extractor built as an ONNX graph and run in ONNX Runtime (the device's
own inference runtime); the expert and the gate train with device_agent.training's numpy updates;
NMoE evaluation routes and combines as the agent does at inference (device_agent.nmoe_local).
Stage 1 trains convolutions: it goes to the torch operations when torch is installed here, and is
refused otherwise (a Raspberry Pi with the [agent] extra takes part in Stages 2 and 3 only).
The batch order and RanGate's routing come from torch's random stream drawn in numpy
(device_agent.training.torch_stream, seeded as the simulation seeds them), and the initial expert
and gate are the coordinator's seeded initializations (`init.*` tensors of TRAIN_EXPERT and
PREPARE_GATE; without them, numpy draws). What still differs from the simulation is float
rounding: latents from ONNX Runtime, MLPs in numpy.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import InputSpec
from device_agent.device_data import DeviceData, Split
from device_agent.nmoe_local import combine, preprocess, softmax, top_k_route
from device_agent.training.device_ops import (
    DeviceOps,
    FinalModels,
    Metrics,
    OperationRefused,
    Params,
    PeerOutputs,
    load_device_ops,
)
from device_agent.training.mlp import EXPERT, GATE, Dims
from device_agent.training.optim import OptimSpec
from device_agent.training.tasks import ExpertTask, GateTask
from device_agent.training.torch_stream import TorchStream, torch_order
from device_agent.wire.training_frames import routing_metrics

_BATCH = 512  # rows per extractor call
GATE_INIT = "init."  # gate-data key prefix of the gate's initial parameters (from PREPARE_GATE)


def _seed(*parts: object) -> np.random.Generator:
    """A generator seeded from `parts` (stable across processes and platforms)."""
    return np.random.default_rng([zlib.crc32(repr(p).encode()) for p in parts])


class NumpyOps:
    """`DeviceOps` without torch for Stages 2 and 3 (see the module docstring)."""

    def __init__(self, cid: int, config: dict[str, Any], data: DeviceData, workdir: Path) -> None:
        self.cid, self.config, self.data, self.workdir = cid, config, data, workdir
        self.spec = InputSpec(list(data.input_shape), "uint8", data.scale, list(data.mean), list(data.std), "NCHW")
        self._torch: DeviceOps | None = None
        self._extractors: dict[str, Params] = {}
        self._latents: dict[str, dict[str, np.ndarray]] = {}
        self._experts: dict[str, Params] = {}  # by Stage 1 method
        self._gate_inputs: dict[str, dict[str, np.ndarray]] = {}
        self._gates: dict[str, Params] = {}  # by Stage 3 job

    @property
    def num_experts(self) -> int:
        return int(self.config["data"]["num_clients"])

    def _stage1_ops(self) -> DeviceOps:
        if self._torch is None:
            try:
                self._torch = load_device_ops("torch")(self.cid, self.config, self.data, self.workdir)
            except OperationRefused as e:
                raise OperationRefused(f"Stage 1 trains convolutions and needs torch on the device ({e}); train it "
                                      "in-process and give the run to `nmoe federate --stage1-from RUN`") from e
        return self._torch

    # operations ---------------------------------------------------------------------------------

    def fit(self, job: str, rnd: int, params: Params, upload: tuple[str, ...], seed: int) -> tuple[Params, int, Metrics]:
        stage, stage1, _ = _parse(job)
        if stage == 1:
            return self._stage1_ops().fit(job, rnd, params, upload, seed)
        g = self.config["gate"]
        state = {**self._gate_state(job), **params}
        inputs = self._gate_inputs[stage1]
        task = GateTask(int(g["local_epochs"]), int(g["batch_size"]),
                        OptimSpec("adam", float(g["lr"]), weight_decay=float(g["weight_decay"])), torch_order)
        new, metrics = task.fit(state, inputs["train_z"], inputs["train_probs"], self.data.train.y, seed)
        self._gates[job] = new
        return {n: new[n] for n in upload}, len(self.data.train), metrics

    def evaluate(self, job: str, rnd: int, params: Params, seed: int = 0) -> tuple[int, Metrics]:
        stage, stage1, gate = _parse(job)
        if stage == 1:
            return self._stage1_ops().evaluate(job, rnd, params, seed)
        inputs, k = self._gate_inputs[stage1], int(self.config["model"]["top_k"])
        if gate == "rangate":  # as toolkit.evaluate.random_router: a fresh stream of `seed` per call
            route = lambda z: (TorchStream(seed).rand(len(z), self.num_experts).argsort(axis=1)[:, :k],
                               np.full((len(z), k), 1.0 / k, dtype=np.float32))
        else:
            weights = {**self._gate_state(job), **params}
            route = lambda z: top_k_route(GATE.forward(weights, z)[0], k)
        own, chosen = _nmoe(route, inputs["personal_z"], inputs["personal_probs"])
        public, _ = _nmoe(route, inputs["public_z"], inputs["public_probs"])
        test = self.data.global_test
        assert test is not None
        shares = np.bincount(chosen.ravel(), minlength=self.num_experts) / chosen.size
        return len(self.data.test), {"personalized_accuracy": _accuracy(own, self.data.test.y),
                                     "global_accuracy": _accuracy(public, test.y),
                                     **routing_metrics(shares)}

    def use_extractor(self, stage1: str, extractor: Params) -> tuple[int, Metrics]:
        from device_agent.model_build import build_model  # needs onnx (the [agent] extra has it)
        from device_agent.rebuild import in_memory_runtime

        self._extractors[stage1] = dict(extractor)
        weights = {k.removeprefix("extractor."): v for k, v in extractor.items()}
        model = build_model("extractor", weights, self.data.input_shape)
        runtime = in_memory_runtime("extractor", model.SerializeToString(), model)

        def latents(split: Split | None) -> np.ndarray:
            assert split is not None
            x = preprocess(split.x, self.spec)
            return np.concatenate([runtime.run(x[i:i + _BATCH]) for i in range(0, len(x), _BATCH)])

        self._latents[stage1] = {"train": latents(self.data.train), "personal": latents(self.data.test),
                                 "public": latents(self.data.global_test)}
        return len(self.data.train), {}

    def train_expert(self, stage1: str, init_seed: int, seed: int, init: Params | None = None) -> tuple[int, Metrics]:
        m, e = self.config["model"], self.config["expert"]
        z = self._latents[stage1]["train"]
        if not init:
            init = EXPERT.init(Dims(z.shape[1], int(m["expert_hidden"]), self.data.num_classes), _seed(init_seed))
        task = ExpertTask(int(e["epochs"]), int(e["batch_size"]),
                          OptimSpec("adam", float(e["lr"]), weight_decay=float(e["weight_decay"])), torch_order)
        self._experts[stage1], metrics = task.fit(init, z, self.data.train.y, seed)
        return len(self.data.train), metrics

    def expert_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray:
        out: np.ndarray = softmax(EXPERT.forward(self._experts[stage1], np.asarray(z, np.float32))[0])
        return out

    def prepare_gate(self, stage1: str, experts: tuple[int, ...], peers: PeerOutputs,
                     init: Params | None = None) -> tuple[int, Metrics]:
        z = self._latents[stage1]

        def probs(latents: np.ndarray) -> np.ndarray:  # [N, experts, classes]
            return np.stack([self.expert_outputs(stage1, latents) if e == self.cid else peers(e, latents)
                             for e in experts], axis=1).astype(np.float32)

        self._gate_inputs[stage1] = {"train_z": z["train"], "train_probs": probs(z["train"]),
                                     "personal_z": z["personal"], "personal_probs": probs(z["personal"]),
                                     "public_z": z["public"], "public_probs": probs(z["public"]),
                                 **{GATE_INIT + n: np.asarray(v, np.float32) for n, v in (init or {}).items()}}
        return len(self.data.train), {}

    def final_models(self, stage1: str, gate_job: str | None, shared: Params) -> FinalModels:
        extractor = {k.removeprefix("extractor."): v for k, v in self._extractors[stage1].items()}
        gate = None if gate_job is None else {**self._gate_state(gate_job), **shared}
        return FinalModels(extractor, gate, self._experts[stage1])

    def _gate_state(self, job: str) -> Params:
        """The gate of `job`, initialized: the coordinator's initial gate given with the gate data, else a
        numpy draw (the same on every device)."""
        init = {k.removeprefix(GATE_INIT): v for k, v in self._gate_inputs[_parse(job)[1]].items()
                if k.startswith(GATE_INIT)}
        if job not in self._gates and init:
            self._gates[job] = init
        elif job not in self._gates:
            m = self.config["model"]
            latent = int(m["latent_dim"])
            self._gates[job] = GATE.init(Dims(latent, int(m["gate_hidden"]), self.num_experts),
                                         _seed(self.config["seed"], "init", "gate"))
        return self._gates[job]

    # private state --------------------------------------------------------------------------------

    def state_keys(self) -> list[str]:
        keys = [f"extractor/{m}" for m in self._extractors] + [f"gate_inputs/{m}" for m in self._gate_inputs]
        keys += [f"stage2_{m}" for m in self._experts] + list(self._gates)
        return keys + (self._torch.state_keys() if self._torch is not None else [])

    def get_state(self, key: str) -> Params:
        kind, _, name = key.partition("/")
        if kind == "extractor":
            return self._extractors[name]
        if kind == "gate_inputs":
            return self._gate_inputs[name]
        if key.startswith("stage2_"):
            return self._experts[key.removeprefix("stage2_")]
        if key in self._gates:
            return self._gates[key]
        return self._stage1_ops().get_state(key)

    def set_state(self, key: str, state: Params) -> None:
        kind, _, name = key.partition("/")
        if kind == "extractor":
            self.use_extractor(name, state)
        elif kind == "gate_inputs":
            self._gate_inputs[name] = dict(state)
        elif key.startswith("stage2_"):
            self._experts[key.removeprefix("stage2_")] = dict(state)
        elif key.startswith("stage3_"):
            self._gates[key] = dict(state)
        else:
            self._stage1_ops().set_state(key, state)


def _nmoe(route: Any, z: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Combined probabilities and the chosen experts, from every expert's probabilities [N, E, C]."""
    idx, weights = route(z)
    experts = {e: (lambda _z, e=e: probs[np.nonzero((idx == e).any(axis=1))[0], e]) for e in range(probs.shape[1])}
    return combine(z, idx, weights, experts, probs.shape[2]), idx


def _accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == y).mean())


def _parse(job: str) -> tuple[int, str, str | None]:
    """(stage, Stage 1 method, gate or None) of a job name (stage1_<m>, stage3_<m>_<gate>)."""
    kind, _, rest = job.partition("_")
    if kind == "stage1" and rest:
        return 1, rest, None
    method, _, gate = rest.partition("_")
    if kind == "stage3" and method and gate:
        return 3, method, gate
    raise ValueError(f"unknown job {job!r}")


def make(cid: int, run_config: dict[str, Any], data: DeviceData, workdir: Path) -> DeviceOps:
    """The numpy DeviceOps of client `cid`."""
    return NumpyOps(cid, run_config, data, workdir)
