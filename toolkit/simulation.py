"""The in-process simulation of a fleet: devices that hold their own data and private models.

`SimDevice` implements the recipe's device operations (toolkit.federated.operations) with torch in
this process, and `Pipeline` runs the server side (toolkit.federated.recipe) on them. What a real
device keeps to itself stays inside its SimDevice; only the simulation also lets the recipe
checkpoint it (`state`), so that a resumed run is exact and `nmoe export` finds every device's models.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from device_agent.wire.training_frames import routing_metrics
from toolkit.artifacts import stage1_job, stage2_job, stage3_job
from toolkit.config import STAGE1_METHODS, Config, FederatedConfig
from toolkit.evaluate import (
    ExpertOutputs,
    Router,
    accuracy,
    gate_router,
    nmoe_predict,
    predict,
    random_router,
    routing_shares,
)
from toolkit.federated import Client, EvaluateIns, EvaluateRes, Evaluator, Params, Stateful
from toolkit.federated.operations import ExpertIns, ExtractorIns, GateDataIns, Peer, Report
from toolkit.federated.params import digest
from toolkit.federated_data import FederatedData
from toolkit.models import ContrastiveNet, DenseModel, Expert, Extractor, Gate, ProjectionHead
from toolkit.seeding import derive_seed
from toolkit.torch_params import get_params, set_params
from toolkit.training import (
    ContrastiveTask,
    GateData,
    GateTask,
    LocalClient,
    OptimSpec,
    SupervisedTask,
    Task,
    TensorData,
)

Place = Callable[[Task[Any]], Task[Any]]  # where a client update runs (RayExecutor.place: on Ray)


def in_process(task: Task[Any]) -> Task[Any]:
    """Client updates run in this process."""
    return task


def sgd(f: FederatedConfig, lr: float | None = None) -> OptimSpec:
    """The optimizer of Stage 1 and the dense baselines."""
    return OptimSpec("sgd", lr or f.lr, f.momentum, f.weight_decay)


def rangate_seed(seed: int, cid: int) -> int:
    """The seed of client `cid`'s RanGate routing."""
    return derive_seed(seed, "rangate", cid)


_TORCH_RNG = threading.RLock()  # building a module draws from torch's global RNG: one builder at a time


@dataclass(frozen=True)
class ModelFactory:
    """The run's models and their seeded initial parameters (the same on the server and every device).

    Every build holds one lock, so that in-process devices asked concurrently (ThreadPool) still get
    exactly their seeded initializations.
    """

    cfg: Config
    input_shape: tuple[int, ...]
    num_classes: int
    num_experts: int
    _initial: dict[str, Params] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, cfg: Config, fd: FederatedData) -> ModelFactory:
        return cls(cfg, fd.splits.input_shape, fd.splits.num_classes, fd.num_clients)

    def extractor(self) -> Extractor:
        with _TORCH_RNG:
            m, (c, h, w) = self.cfg.model, self.input_shape
            return Extractor((c, h, w), m.width, m.latent_dim)

    def expert(self) -> Expert:
        with _TORCH_RNG:
            m = self.cfg.model
            return Expert(m.latent_dim, m.expert_hidden, self.num_classes)

    def gate(self) -> Gate:
        with _TORCH_RNG:
            m = self.cfg.model
            return Gate(m.latent_dim, m.gate_hidden, self.num_experts)

    def dense(self) -> DenseModel:
        with _TORCH_RNG:
            return DenseModel(self.extractor(), self.expert())

    def contrastive(self, method: str) -> ContrastiveNet:
        """FedSC's extractor + projection head; `hybrid` adds an expert-shaped CE head."""
        with _TORCH_RNG:
            return ContrastiveNet(self.extractor(), ProjectionHead(self.cfg.model.latent_dim,
                                                                   self.cfg.stage1.projection_dim),
                                  self.expert() if method == "hybrid" else None)

    def seeded(self, build: Callable[[], nn.Module], seed: int) -> Params:
        """Initial parameters of `build()` after torch.manual_seed(seed)."""
        with _TORCH_RNG:
            torch.manual_seed(seed)
            return get_params(build())

    def init(self, build: Callable[[], nn.Module], name: str) -> Params:
        """Seeded initial parameters (the same for everyone who starts from `name`)."""
        return self.seeded(build, derive_seed(self.cfg.seed, "init", name))

    def initial(self, name: str) -> Params:
        """The recipe's shared models: "fedce" (the dense model), "fedsc", "hybrid" or "gate" (built once:
        every device starts from them; callers never change the arrays in place)."""
        with _TORCH_RNG:
            if name not in self._initial:
                if name == "fedce":
                    self._initial[name] = self.init(self.dense, "dense")
                elif name == "gate":
                    self._initial[name] = self.init(self.gate, "gate")
                else:
                    self._initial[name] = self.init(partial(self.contrastive, name), name)
            return self._initial[name]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a Ray task's model builder) without the initial parameters it holds."""
        return {**self.__dict__, "_initial": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class PublicTest:
    """The balanced test set: public, the same on every device. Devices that run the same model on it
    share one forward pass (the latest, keyed by a digest of the parameters): no number changes, and
    N devices evaluating one shared model cost one pass."""

    def __init__(self, data: TensorData) -> None:
        self.data = data
        self._lock = threading.Lock()
        self._last: tuple[str, torch.Tensor] | None = None
        self._shared: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}

    def outputs(self, build: Callable[[], nn.Module], params: Params) -> torch.Tensor:
        """predict(build() with params, x)."""
        key = digest(params)
        with self._lock:
            if self._last is None or self._last[0] != key:
                self._last = (key, predict(set_params(build(), params), self.data.x))
            return self._last[1]

    def shared(self, key: Hashable, latents: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """compute() once for every device that asks with the same `key` and the same `latents` object (the
        output of `outputs`, e.g. every expert's probabilities on the public latents: the same for every
        device, so N devices cost one pass over N experts instead of N, and hold one tensor)."""
        with self._lock:
            held = self._shared.get(key)
            if held is None or held[0] is not latents:
                held = self._shared[key] = (latents, compute())
            return held[1]


class Held:
    """Private parameters held in this process (a Stage 2 expert)."""

    def __init__(self) -> None:
        self.state: Params = {}

    def get_state(self) -> Params:
        return self.state

    def set_state(self, state: Params) -> None:
        self.state = dict(state)


@dataclass(frozen=True)
class FixedEvaluator:
    """A participant with nothing to train and no shared parameters (RanGate)."""

    cid: int
    check: Callable[[], EvaluateRes]

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        return self.check()


@dataclass(frozen=True)
class Latents:
    """A device's latents under one Stage 1 extractor."""

    train: torch.Tensor
    personal: torch.Tensor
    public: torch.Tensor


@dataclass(frozen=True)
class GateInputs:
    """Every expert's outputs on a device's latents: its gate's training data and its NMoE's test inputs."""

    train: GateData
    personal: ExpertOutputs
    public: ExpertOutputs


class SimDevice:
    """One in-process device: its own training data and test split, its private models (implements
    `Device`, `Peer` and `Simulated` of toolkit.federated.operations)."""

    def __init__(self, cid: int, cfg: Config, models: ModelFactory, train: TensorData, personal: TensorData,
                 public: PublicTest, peers: Callable[[int], Peer], place: Place = in_process) -> None:
        self.cid, self.cfg, self.models, self.place = cid, cfg, models, place
        self.train, self.personal, self.public, self.peers = train, personal, public, peers
        self._clients: dict[str, LocalClient[TensorData] | LocalClient[GateData]] = {}
        self._experts: dict[str, Held] = {}  # by Stage 2 job
        self._latents: dict[str, Latents] = {}  # by Stage 1 method
        self._expert_modules: dict[str, tuple[Params, nn.Module]] = {}  # by Stage 1 method: (its state, built)
        self._dense: DenseModel | None = None
        self._gate_inputs: dict[str, GateInputs] = {}  # by Stage 1 method

    # ---- Stage 1 -------------------------------------------------------------------------------
    def stage1(self, method: str) -> Client:
        job = stage1_job(method)
        if job not in self._clients:
            f, s1 = self.cfg.federated, self.cfg.stage1
            init = self.models.initial(method)
            if method == "fedce":
                task = SupervisedTask(self.models.dense, f.local_epochs, f.batch_size, sgd(f))
                self._clients[job] = LocalClient(self.cid, self.place(task), self.train, init, self._classify)
            else:
                hybrid = method == "hybrid"
                contrastive = ContrastiveTask(partial(self.models.contrastive, method), f.local_epochs,
                                              s1.sc_batch_size, sgd(f), s1.sc_temperature,
                                              sc_weight=s1.sc_weight if hybrid else 1.0, ce_weight=1.0 if hybrid else 0.0)
                self._clients[job] = LocalClient(self.cid, self.place(contrastive), self.train, init)
        return self._clients[job]

    def _classify(self, params: Params) -> EvaluateRes:
        """A dense model's accuracy on the device's own test split and on the public test set."""
        if self._dense is None:  # one module per device, loaded anew for every evaluation
            self._dense = self.models.dense()
        model = set_params(self._dense, params)
        public = self.public.outputs(self.models.dense, params)
        return EvaluateRes(len(self.personal), {
            "personalized_accuracy": accuracy(predict(model, self.personal.x), self.personal.y),
            "global_accuracy": accuracy(public, self.public.data.y)})

    def use_extractor(self, ins: ExtractorIns) -> Report:
        ext = set_params(self.models.extractor(), ins.extractor)
        self._latents[ins.stage1] = Latents(predict(ext, self.train.x), predict(ext, self.personal.x),
                                            self.public.outputs(self.models.extractor, ins.extractor))
        return Report(len(self.train), {})

    # ---- Stage 2 -------------------------------------------------------------------------------
    def _expert(self, stage1: str) -> Held:
        return self._experts.setdefault(stage2_job(stage1), Held())

    def train_expert(self, ins: ExpertIns) -> Report:
        e = self.cfg.expert
        task = SupervisedTask(self.models.expert, e.epochs, e.batch_size,
                              OptimSpec("adam", e.lr, weight_decay=e.weight_decay))
        init = self.models.seeded(self.models.expert, ins.init_seed)
        params, metrics = self.place(task).fit(init, TensorData(self._latents[ins.stage1].train, self.train.y), ins.seed)
        self._expert(ins.stage1).set_state(params)
        return Report(len(self.train), metrics)

    def expert_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            probs: np.ndarray = torch.softmax(predict(self._expert_model(stage1), torch.from_numpy(z)), dim=-1).numpy()
        return probs

    def _expert_model(self, stage1: str) -> nn.Module:
        """The expert of `stage1` as a module, built once per state (N peers ask it N times)."""
        state = self._expert(stage1).state
        built = self._expert_modules.get(stage1)
        if built is None or built[0] is not state:
            built = self._expert_modules[stage1] = (state, set_params(self.models.expert(), state))
        return built[1]

    # ---- Stage 3 -------------------------------------------------------------------------------
    def prepare_gate(self, ins: GateDataIns) -> Report:
        z = self._latents[ins.stage1]

        def probs(latents: torch.Tensor) -> torch.Tensor:  # [N, experts, classes]
            return torch.stack([torch.from_numpy(self.peers(e).expert_outputs(ins.stage1, latents.numpy()))
                                for e in ins.experts], dim=1)

        own = probs(torch.cat([z.train, z.personal]))  # one request per peer for both of its own splits
        public = self.public.shared(("gate-inputs", ins.stage1, ins.experts), z.public, lambda: probs(z.public))
        self._gate_inputs[ins.stage1] = GateInputs(GateData(z.train, own[:len(z.train)], self.train.y),
                                                   ExpertOutputs(z.personal, own[len(z.train):]),
                                                   ExpertOutputs(z.public, public))
        return Report(len(self.train), {})

    def gate(self, stage1: str, gate: str) -> Client:
        job = stage3_job(stage1, gate)
        if job not in self._clients:
            g, k = self.cfg.gate, self.cfg.model.top_k
            task = GateTask(self.models.gate, g.local_epochs, g.batch_size,
                            OptimSpec("adam", g.lr, weight_decay=g.weight_decay))
            check = lambda params: self._evaluate_nmoe(stage1, gate_router(set_params(self.models.gate(), params), k))
            self._clients[job] = LocalClient(self.cid, self.place(task), self._gate_inputs[stage1].train,
                                             self.models.initial("gate"), check)
        return self._clients[job]

    def random_gate(self, stage1: str) -> Evaluator:
        router = random_router(self.models.num_experts, self.cfg.model.top_k, rangate_seed(self.cfg.seed, self.cid))
        return FixedEvaluator(self.cid, partial(self._evaluate_nmoe, stage1, router))

    def _evaluate_nmoe(self, stage1: str, router: Router) -> EvaluateRes:
        """The device's NMoE (its router + every expert) on its own test split and on the public test set."""
        inputs = self._gate_inputs[stage1]
        own, chosen = nmoe_predict(router, inputs.personal)
        public, _ = nmoe_predict(router, inputs.public)
        shares = routing_shares(chosen, self.models.num_experts)
        return EvaluateRes(len(self.personal), {
            "personalized_accuracy": accuracy(own, self.personal.y),
            "global_accuracy": accuracy(public, self.public.data.y),
            **routing_metrics(shares)})

    # ---- simulation only -----------------------------------------------------------------------
    def state(self, job: str) -> Stateful:
        if job in self._clients:
            return self._clients[job]
        if job in {stage2_job(m) for m in STAGE1_METHODS}:
            return self._experts.setdefault(job, Held())
        raise KeyError(f"device {self.cid} holds no state for job {job!r}")
