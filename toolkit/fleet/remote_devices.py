"""The recipe's devices on a fleet: each `Device` operation is one COMMAND to a device agent.

`RemoteDevice` implements toolkit.federated.operations.Device over a `FleetLink`, so `NMoERecipe`
drives device agents over MQTT exactly as it drives in-process simulated devices. Client id c is
the device whose presence announces expert c. Only shared tensors cross: the Stage 1 model, the
extractor, a gate's shared part; experts, a FedGate final layer and every latent stay on devices.
A COMMAND that fails (error, refused, no RESULT before its deadline, device offline) raises, which
the round loop records as a failure of that client (docs/federated.md).
A device whose trainer cannot draw torch's seeded initializations (setup metric `wants_init`: the
numpy backend) gets them as `init.*` tensors of TRAIN_EXPERT (its expert) and PREPARE_GATE (the
gates); they are seeded random draws, the same the simulation starts from, nothing private.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.training.device_ops import INIT
from device_agent.wire.clock import now_ms
from device_agent.wire.training_frames import Command, Op, Result
from device_agent.wire.training_link import new_task_id
from toolkit.artifacts import stage1_job, stage2_job, stage3_job
from toolkit.federated.client import EvaluateIns, EvaluateRes, FitIns, FitRes
from toolkit.federated.executor import Pending
from toolkit.federated.operations import ExpertIns, ExtractorIns, GateDataIns, Report
from toolkit.fleet.fleet_link import FleetLink
from toolkit.simulation import ModelFactory, rangate_seed


class DeviceOffline(ConnectionError):
    """No online device holds the client's expert."""


@dataclass(frozen=True)
class Initializations:
    """The run's seeded initial parameters, for the clients whose device asked for them (`wanted`)."""

    models: ModelFactory
    wanted: frozenset[int]

    def expert(self, cid: int, init_seed: int) -> dict[str, np.ndarray]:
        return _init(self.models.seeded(self.models.expert, init_seed)) if cid in self.wanted else {}

    def gate(self, cid: int) -> dict[str, np.ndarray]:
        return _init(self.models.initial("gate")) if cid in self.wanted else {}


def _init(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {INIT + name: value for name, value in params.items()}


class FleetSession:
    """One coordinator run on a fleet: its run id, the link and each task's time limit; `inits` once the
    devices' setup told the models' shapes."""

    def __init__(self, link: FleetLink, run: str, task_timeout_s: float) -> None:
        self.link, self.run, self.task_timeout_s = link, run, task_timeout_s
        self.inits: Initializations | None = None

    def device_of(self, cid: int) -> str:
        """The online device holding expert `cid`."""
        device = self.link.live().get(cid)
        if device is None:
            raise DeviceOffline(f"client {cid}: no online device holds expert {cid}")
        return device

    def call(self, cid: int, op: Op, job: str, rnd: int = 0, *, seed: int = 0, config: dict[str, Any] | None = None,
             upload: tuple[str, ...] = (), tensors: dict[str, Any] | None = None) -> Result:
        """Send one COMMAND to client `cid`'s device and wait for its OK RESULT."""
        return self.send(cid, op, job, rnd, seed=seed, config=config, upload=upload, tensors=tensors)(None)

    def send(self, cid: int, op: Op, job: str, rnd: int = 0, *, seed: int = 0, config: dict[str, Any] | None = None,
             upload: tuple[str, ...] = (), tensors: dict[str, Any] | None = None) -> Pending[Result]:
        """Send one COMMAND to client `cid`'s device now; the call returned waits for its OK RESULT."""
        command = Command(new_task_id(), op, self.run, job, rnd, seed,
                          now_ms() + int(self.task_timeout_s * 1000), config or {}, upload, tensors or {})
        return self.link.send(self.device_of(cid), command)


@dataclass(frozen=True)
class RemoteClient:
    """A device's participant in one federated job (Stage 1, or a Stage 3 gate)."""

    session: FleetSession
    cid: int
    job: str
    seed: int = 0  # of an evaluation (RanGate's routing)

    def fit(self, ins: FitIns) -> FitRes:
        return self.send_fit(ins)(None)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        return self.send_evaluate(ins)(None)

    def send_fit(self, ins: FitIns) -> Pending[FitRes]:
        """`Sender` (toolkit.federated.client): the FIT COMMAND goes out now."""
        pending = self.session.send(self.cid, Op.FIT, self.job, ins.round, seed=ins.seed, upload=ins.upload,
                                    tensors=ins.params)
        return lambda timeout: _fit_res(pending(timeout))

    def send_evaluate(self, ins: EvaluateIns) -> Pending[EvaluateRes]:
        """`Sender`: the EVALUATE COMMAND goes out now."""
        pending = self.session.send(self.cid, Op.EVALUATE, self.job, ins.round, seed=self.seed, tensors=ins.params)
        return lambda timeout: _evaluate_res(pending(timeout))


@dataclass(frozen=True)
class RemoteDevice:
    """`Device` (toolkit.federated.operations) of client `cid`, reached through `session`."""

    session: FleetSession
    cid: int

    def setup(self, run_config: dict[str, Any]) -> Result:
        """Bind the device to this run with the resolved config (before any other operation)."""
        return self.session.call(self.cid, Op.SETUP, "setup", config={"run_config": run_config})

    def stage1(self, method: str) -> RemoteClient:
        return RemoteClient(self.session, self.cid, stage1_job(method))

    def use_extractor(self, ins: ExtractorIns) -> Report:
        return _report(self.session.call(self.cid, Op.USE_EXTRACTOR, stage2_job(ins.stage1),
                                         config={"stage1": ins.stage1}, tensors=ins.extractor))

    def train_expert(self, ins: ExpertIns) -> Report:
        init = self.session.inits.expert(self.cid, ins.init_seed) if self.session.inits else {}
        return _report(self.session.call(self.cid, Op.TRAIN_EXPERT, stage2_job(ins.stage1), seed=ins.seed,
                                         config={"stage1": ins.stage1, "init_seed": ins.init_seed}, tensors=init))

    def prepare_gate(self, ins: GateDataIns) -> Report:
        init = self.session.inits.gate(self.cid) if self.session.inits else {}
        return _report(self.session.call(self.cid, Op.PREPARE_GATE, stage2_job(ins.stage1),
                                         config={"stage1": ins.stage1, "experts": list(ins.experts)}, tensors=init))

    def gate(self, stage1: str, gate: str) -> RemoteClient:
        return RemoteClient(self.session, self.cid, stage3_job(stage1, gate))

    def random_gate(self, stage1: str) -> RemoteClient:
        seed = rangate_seed(self.session.inits.models.cfg.seed, self.cid) if self.session.inits else 0
        return RemoteClient(self.session, self.cid, stage3_job(stage1, "rangate"), seed)

    def commit(self, config: dict[str, Any], shared: dict[str, Any]) -> Result:
        """Rebuild the device's inference files with the final models and serve them (docs/federated.md)."""
        return self.session.call(self.cid, Op.COMMIT, "commit", config=config, tensors=shared)


def _fit_res(r: Result) -> FitRes:
    return FitRes(r.tensors, r.num_examples, r.metrics)


def _evaluate_res(r: Result) -> EvaluateRes:
    return EvaluateRes(r.num_examples, r.metrics)


def _report(r: Result) -> Report:
    return Report(r.num_examples, r.metrics)
