"""The "torch" device operations of a device agent: the simulation's own `SimDevice`, for one device.

A device agent with the [train] extra answers the coordinator's COMMANDs with exactly the code
`nmoe train` runs in-process (toolkit.simulation), on its own data file and with its peers'
experts reached over MQTT, so a fleet of torch devices reproduces the simulation's numbers.
Found by module name (device_agent.training.device_ops.OPS_MODULES): device_agent never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from device_agent.device_data import DeviceData, Split
from device_agent.training.device_ops import DeviceOps, FinalModels, Metrics, Params, PeerOutputs
from toolkit.artifacts import stage1_job, stage2_job, stage3_job
from toolkit.config import Config, from_dict
from toolkit.data import ArrayDataset
from toolkit.evaluate import ExpertOutputs
from toolkit.federated import EvaluateIns, FitIns
from toolkit.federated.operations import ExpertIns, ExtractorIns, GateDataIns
from toolkit.federated_data import normalize
from toolkit.simulation import GateInputs, Latents, ModelFactory, PublicTest, SimDevice
from toolkit.training import GateData, TensorData

EXTRACTOR, GATE_INPUTS = "extractor/", "gate_inputs/"  # state keys besides the jobs'


class _RemotePeer:
    """A peer's expert, asked over MQTT by the agent (set for the duration of prepare_gate)."""

    def __init__(self, expert: int, outputs: Callable[[], PeerOutputs]) -> None:
        self.expert, self.outputs = expert, outputs

    def expert_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray:
        return self.outputs()(self.expert, z)


class TorchOps:
    """`DeviceOps` on a SimDevice (see the module docstring)."""

    def __init__(self, cid: int, cfg: Config, data: DeviceData) -> None:
        self.cid, self.cfg = cid, cfg
        test = data.global_test
        if test is None:
            raise ValueError(f"device data of client {cid} has no global test set (global_x/global_y)")
        mean, std = data.mean, data.std
        self.models = ModelFactory(cfg, data.input_shape, data.num_classes, cfg.data.num_clients)
        self._outputs: PeerOutputs | None = None
        self.device = SimDevice(cid, cfg, self.models, _tensors(data.train, mean, std), _tensors(data.test, mean, std),
                                PublicTest(_tensors(test, mean, std)), self._peer)
        self._extractors: dict[str, Params] = {}

    def _peer(self, expert: int) -> Any:
        if expert == self.cid:
            return self.device
        return _RemotePeer(expert, self._peer_outputs)

    def _peer_outputs(self) -> PeerOutputs:
        if self._outputs is None:
            raise RuntimeError("peers are reachable only while gate data is prepared")
        return self._outputs

    # operations ---------------------------------------------------------------------------------

    def fit(self, job: str, rnd: int, params: Params, upload: tuple[str, ...], seed: int) -> tuple[Params, int, Metrics]:
        res = self._client(job).fit(FitIns(rnd, params, upload, seed))
        return res.params, res.num_examples, res.metrics

    def evaluate(self, job: str, rnd: int, params: Params, seed: int = 0) -> tuple[int, Metrics]:
        stage, stage1, gate = _parse(job)
        if stage == 3 and gate == "rangate":
            res = self.device.random_gate(stage1).evaluate(EvaluateIns(rnd, params))
        else:
            res = self._client(job).evaluate(EvaluateIns(rnd, params))
        return res.num_examples, res.metrics

    def use_extractor(self, stage1: str, extractor: Params) -> tuple[int, Metrics]:
        self._extractors[stage1] = dict(extractor)
        report = self.device.use_extractor(ExtractorIns(stage1, extractor))
        return report.num_examples, report.metrics

    def train_expert(self, stage1: str, init_seed: int, seed: int, init: Params | None = None) -> tuple[int, Metrics]:
        """(`init` is the initialization this device draws itself from init_seed.)"""
        report = self.device.train_expert(ExpertIns(stage1, init_seed, seed))
        return report.num_examples, report.metrics

    def expert_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray:
        return self.device.expert_outputs(stage1, np.ascontiguousarray(z, np.float32))

    def prepare_gate(self, stage1: str, experts: tuple[int, ...], peers: PeerOutputs,
                     init: Params | None = None) -> tuple[int, Metrics]:
        self._outputs = peers
        try:
            report = self.device.prepare_gate(GateDataIns(stage1, experts))
        finally:
            self._outputs = None
        return report.num_examples, report.metrics

    def final_models(self, stage1: str, gate_job: str | None, shared: Params) -> FinalModels:
        extractor = {k.removeprefix("extractor."): v for k, v in self._extractors[stage1].items()}
        expert = self.device.state(stage2_job(stage1)).get_state()
        gate = None if gate_job is None else {**self.device.state(gate_job).get_state(), **shared}
        return FinalModels(extractor, gate, expert)

    # private state --------------------------------------------------------------------------------

    def state_keys(self) -> list[str]:
        d = self.device
        return ([EXTRACTOR + m for m in self._extractors] + [GATE_INPUTS + m for m in d._gate_inputs]
                + list(d._experts) + list(d._clients))

    def get_state(self, key: str) -> Params:
        if key.startswith(EXTRACTOR):
            return self._extractors[key.removeprefix(EXTRACTOR)]
        if key.startswith(GATE_INPUTS):
            g = self.device._gate_inputs[key.removeprefix(GATE_INPUTS)]
            return {"train_z": g.train.z.numpy(), "train_probs": g.train.probs.numpy(), "train_y": g.train.y.numpy(),
                    "personal_z": g.personal.z.numpy(), "personal_probs": g.personal.probs.numpy(),
                    "public_z": g.public.z.numpy(), "public_probs": g.public.probs.numpy()}
        return dict(self.device.state(key).get_state())

    def set_state(self, key: str, state: Params) -> None:
        if key.startswith(EXTRACTOR):
            self.use_extractor(key.removeprefix(EXTRACTOR), state)
        elif key.startswith(GATE_INPUTS):
            t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
            self.device._gate_inputs[key.removeprefix(GATE_INPUTS)] = GateInputs(
                GateData(t["train_z"], t["train_probs"], t["train_y"]), ExpertOutputs(t["personal_z"], t["personal_probs"]),
                ExpertOutputs(t["public_z"], t["public_probs"]))
        elif key.startswith("stage2_"):
            self.device.state(key).set_state(state)
        else:
            self._client(key).set_state(state)

    def _client(self, job: str) -> Any:
        stage, stage1, gate = _parse(job)
        if stage == 1:
            return self.device.stage1(stage1)
        if stage == 3 and gate is not None:
            return self.device.gate(stage1, gate)
        raise ValueError(f"no federated job {job!r} on this device")


def _parse(job: str) -> tuple[int, str, str | None]:
    """(stage, Stage 1 method, gate or None) of a job name (toolkit.artifacts)."""
    kind, _, rest = job.partition("_")
    if kind == "stage1" and stage1_job(rest) == job:
        return 1, rest, None
    method, _, gate = rest.partition("_")
    if kind == "stage3" and gate and stage3_job(method, gate) == job:
        return 3, method, gate
    raise ValueError(f"unknown job {job!r}")


def _tensors(split: Split, mean: tuple[float, ...], std: tuple[float, ...]) -> TensorData:
    """Raw uint8 images -> the simulation's normalized tensors (bit for bit: toolkit's normalize)."""
    return normalize(ArrayDataset(split.x, split.y), mean, std)


def make(cid: int, run_config: dict[str, Any], data: DeviceData, workdir: Path) -> DeviceOps:
    """The torch DeviceOps of client `cid` (run_config: the resolved config, optional torch_threads)."""
    threads = run_config.get("torch_threads")
    if isinstance(threads, int) and threads > 0:
        torch.set_num_threads(threads)  # as many as the simulation used: float sums depend on it
    cfg = from_dict({k: v for k, v in run_config.items() if k != "torch_threads"})
    return TorchOps(cid, cfg, data)


__all__ = ["Latents", "TorchOps", "make", "stage1_job"]
