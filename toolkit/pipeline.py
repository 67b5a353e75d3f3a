"""One run of a config: the NMoE stages and the baselines, each a resumable job, into metrics.

Stage 1 `fedce` is FedAvg of extractor + an expert-shaped classifier head with cross-entropy:
exactly the `fedavg` baseline's training, so both read the same job (`stage1_fedce`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from toolkit.artifacts import stage1_job, stage2_job, stage3_job
from toolkit.checkpoint import JobStore, run_steps
from toolkit.config import Config
from toolkit.evaluate import (
    ExpertOutputs,
    Router,
    client_accuracies,
    gate_router,
    nmoe_predict,
    predict,
    random_router,
    routing_matrix,
)
from toolkit.federated import (
    FedAvg,
    FederatedResult,
    Ledger,
    NoSharing,
    Params,
    PartialSync,
    Sequential,
    Strategy,
)
from toolkit.federated.engine import run_federated
from toolkit.federated_data import FederatedData, prepare
from toolkit.gates import EXTENDED_GATES, ExtendedGates, Stage3Inputs, ceilings
from toolkit.models import (
    GATE_FINAL_PREFIX,
    ContrastiveNet,
    DenseModel,
    Expert,
    Extractor,
    Gate,
    ProjectionHead,
    count_macs,
    count_params,
)
from toolkit.seeding import derive_seed
from toolkit.torch_params import get_params, set_params, subset
from toolkit.training import (
    ContrastiveTask,
    GateData,
    GateTask,
    LocalClient,
    OptimSpec,
    SupervisedTask,
    TensorData,
)

log = logging.getLogger("nmoe")

GATE_STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "rollgate": Sequential,
    "fedavggate": FedAvg,
    "fedgate": lambda: PartialSync((GATE_FINAL_PREFIX,)),
    "localgate": NoSharing,
}


@dataclass(frozen=True)
class Stage1Result:
    """A trained extractor and what its federated training exchanged."""

    extractor: Params
    upload_bytes: int
    download_bytes: int


@dataclass(frozen=True)
class LatentSets:
    """Every client's train latents, personalized-test latents, and the global-test latents."""

    train: list[torch.Tensor]
    personal: list[torch.Tensor]
    global_: torch.Tensor


def bytes_of(ledger: Ledger) -> tuple[int, int]:
    """(upload, download) bytes recorded by a federated job."""
    return ledger.total("up"), ledger.total("down")


class Pipeline:
    """Runs every method a config selects; each job checkpoints under `checkpoints/`."""

    def __init__(self, cfg: Config, checkpoints: Path, show_progress: bool = True,
                 data: FederatedData | None = None) -> None:
        self.cfg = cfg
        self.checkpoints = checkpoints
        self.show = show_progress
        self.fd = data or prepare(cfg.data)
        self.n = self.fd.num_clients
        self.k = cfg.model.top_k
        self.personal_y = [t.y for t in self.fd.personal_test]
        self.global_y = self.fd.global_test.y

    # ---- model builders --------------------------------------------------------------------
    def extractor(self) -> Extractor:
        m = self.cfg.model
        return Extractor(self.fd.splits.input_shape, m.width, m.latent_dim)

    def expert(self) -> Expert:
        m = self.cfg.model
        return Expert(m.latent_dim, m.expert_hidden, self.fd.splits.num_classes)

    def gate(self) -> Gate:
        m = self.cfg.model
        return Gate(m.latent_dim, m.gate_hidden, self.n)

    def dense(self) -> DenseModel:
        return DenseModel(self.extractor(), self.expert())

    def init(self, build: Callable[[], nn.Module], name: str) -> Params:
        """Seeded initial parameters (the same for every client that starts from `name`)."""
        torch.manual_seed(derive_seed(self.cfg.seed, "init", name))
        return get_params(build())

    def store(self, job: str) -> JobStore:
        return JobStore(self.checkpoints, job)

    def sgd(self, lr: float | None = None) -> OptimSpec:
        f = self.cfg.federated
        return OptimSpec("sgd", lr or f.lr, f.momentum, f.weight_decay)

    # ---- evaluation helpers -----------------------------------------------------------------
    def shared_model_accuracy(self, model: nn.Module) -> dict:
        """Accuracy of one model used by every client."""
        global_scores = predict(model, self.fd.global_test.x)
        return client_accuracies(
            self.n, self.personal_y, self.global_y,
            lambda c, which: predict(model, self.fd.personal_test[c].x) if which == "personal" else global_scores)

    def per_client_model_accuracy(self, models: list[nn.Module]) -> dict:
        """Accuracy when client c uses models[c]."""
        return client_accuracies(
            self.n, self.personal_y, self.global_y,
            lambda c, which: predict(models[c], self.fd.personal_test[c].x if which == "personal"
                                     else self.fd.global_test.x))

    def nmoe_accuracy(self, routers: list[Router], personal: list[ExpertOutputs], global_: ExpertOutputs) -> dict:
        """NMoE accuracy when client c routes with routers[c]; includes the routing matrix."""
        own = [nmoe_predict(routers[c], personal[c]) for c in range(self.n)]
        glob = [nmoe_predict(routers[c], global_)[0] for c in range(self.n)]
        result = client_accuracies(self.n, self.personal_y, self.global_y,
                                   lambda c, which: own[c][0] if which == "personal" else glob[c])
        result["routing"] = routing_matrix([idx for _, idx in own], self.n)
        return result

    @staticmethod
    def means(result: dict) -> dict[str, float]:
        return {k: result[k] for k in ("personalized_accuracy", "global_accuracy")}

    # ---- stage 1 -----------------------------------------------------------------------------
    @cached_property
    def dense_fedavg(self) -> FederatedResult:
        """FedAvg of the dense model: the `fedavg` baseline and Stage 1 `fedce`."""
        f = self.cfg.federated
        task = SupervisedTask(self.dense, f.local_epochs, f.batch_size, self.sgd())
        init = self.init(self.dense, "dense")
        clients = [LocalClient(c, task, self.fd.train[c], init) for c in range(self.n)]
        return run_federated(
            stage1_job("fedce"), FedAvg(), clients, init, f.rounds, f.client_fraction, self.cfg.seed,
            self.store(stage1_job("fedce")),
            lambda models: self.means(self.shared_model_accuracy(set_params(self.dense(), models[0]))), self.show)

    def contrastive(self, method: str) -> FederatedResult:
        """FedSC or hybrid: FedAvg of extractor + projection (+ CE head) with NT-Xent over two views."""
        f, s1 = self.cfg.federated, self.cfg.stage1
        hybrid = method == "hybrid"
        build = lambda: ContrastiveNet(
            self.extractor(), ProjectionHead(self.cfg.model.latent_dim, s1.projection_dim),
            self.expert() if hybrid else None)
        task = ContrastiveTask(build, f.local_epochs, s1.sc_batch_size, self.sgd(), s1.sc_temperature,
                               sc_weight=s1.sc_weight if hybrid else 1.0, ce_weight=1.0 if hybrid else 0.0)
        init = self.init(build, method)
        clients = [LocalClient(c, task, self.fd.train[c], init) for c in range(self.n)]
        job = stage1_job(method)
        return run_federated(job, FedAvg(), clients, init, f.rounds, f.client_fraction,
                             self.cfg.seed, self.store(job), None, self.show)

    def stage1(self, method: str) -> Stage1Result:
        res = self.dense_fedavg if method == "fedce" else self.contrastive(method)
        return Stage1Result(subset(res.shared, "extractor."), *bytes_of(res.ledger))

    def latents(self, extractor: Params) -> LatentSets:
        ext = set_params(self.extractor(), extractor)
        return LatentSets([predict(ext, t.x) for t in self.fd.train],
                          [predict(ext, t.x) for t in self.fd.personal_test],
                          predict(ext, self.fd.global_test.x))

    # ---- stage 2 -----------------------------------------------------------------------------
    def experts(self, method: str, z: LatentSets, subsets: list[torch.Tensor] | None = None,
                tag: str = "") -> list[Params]:
        """Each client's expert, trained on its own latents only (extractor frozen); with `subsets`, only on
        those indices of each client's data (a separate job, stage2_<method>_<tag>)."""
        e = self.cfg.expert
        task = SupervisedTask(self.expert, e.epochs, e.batch_size, OptimSpec("adam", e.lr, weight_decay=e.weight_decay))

        def train(c: int, _prev: Params | None) -> tuple[Params, dict[str, float]]:
            keep = slice(None) if subsets is None else subsets[c]
            data = TensorData(z.train[c][keep], self.fd.train[c].y[keep])
            return task.fit(self.init(self.expert, f"expert{c}"), data, derive_seed(self.cfg.seed, method, "expert", c))

        job = stage2_job(method) + (f"_{tag}" if tag else "")
        done = run_steps(self.store(job), self.n, train, job, "expert", self.show)
        return [p for p, _ in done]

    def expert_probs(self, experts: list[Params], z: torch.Tensor) -> torch.Tensor:
        """[N, E, C] softmax outputs of every expert."""
        return torch.stack([torch.softmax(predict(set_params(self.expert(), p), z), dim=-1) for p in experts], dim=1)

    # ---- stage 3 -----------------------------------------------------------------------------
    def gate_job(self, method: str, gate: str, gate_data: list[GateData],
                 personal: list[ExpertOutputs], global_: ExpertOutputs) -> FederatedResult:
        g = self.cfg.gate
        task = GateTask(self.gate, g.local_epochs, g.batch_size, OptimSpec("adam", g.lr, weight_decay=g.weight_decay))
        init = self.init(self.gate, "gate")
        clients = [LocalClient(c, task, gate_data[c], init) for c in range(self.n)]
        evaluate = lambda models: self.means(self.nmoe_accuracy(
            [gate_router(set_params(self.gate(), models[c]), self.k) for c in range(self.n)], personal, global_))
        job = stage3_job(method, gate)
        return run_federated(job, GATE_STRATEGIES[gate](), clients, init, g.rounds, g.client_fraction,
                             self.cfg.seed, self.store(job), evaluate, self.show)

    def nmoe(self, method: str) -> dict[str, dict]:
        """All selected gates on top of one Stage-1 extractor: {nmoe_<method>_<gate>: metrics}."""
        s1 = self.stage1(method)
        z = self.latents(s1.extractor)
        experts = self.experts(method, z)
        personal = [ExpertOutputs(z.personal[c], self.expert_probs(experts, z.personal[c])) for c in range(self.n)]
        global_ = ExpertOutputs(z.global_, self.expert_probs(experts, z.global_))
        gate_data = [GateData(z.train[c], self.expert_probs(experts, z.train[c]), self.fd.train[c].y)
                     for c in range(self.n)]
        ceiling = ceilings(personal, self.personal_y, global_, self.global_y)
        extended = ExtendedGates(self, Stage3Inputs(method, z, experts, personal, global_, gate_data))
        out = {}
        for gate in self.cfg.gate.methods:
            if gate == "rangate":
                routers = [random_router(self.n, self.k, derive_seed(self.cfg.seed, "rangate", c)) for c in range(self.n)]
                result, up, down = self.nmoe_accuracy(routers, personal, global_), 0, 0
            elif gate in EXTENDED_GATES:
                result, up, down = extended.run(gate)
            else:
                job = self.gate_job(method, gate, gate_data, personal, global_)
                routers = [gate_router(set_params(self.gate(), job.client_models[c]), self.k) for c in range(self.n)]
                result = self.nmoe_accuracy(routers, personal, global_)
                result["curve"] = job.curve
                up, down = bytes_of(job.ledger)
            result["upload_bytes"] = s1.upload_bytes + up
            result["download_bytes"] = s1.download_bytes + down
            result["ceiling"] = ceiling
            out[f"nmoe_{method}_{gate}"] = result
        return out

    # ---- baselines ---------------------------------------------------------------------------
    def local(self) -> dict:
        b, f = self.cfg.baselines, self.cfg.federated
        task = SupervisedTask(self.dense, b.local_epochs, f.batch_size, self.sgd())
        init = self.init(self.dense, "dense")
        done = run_steps(self.store("baseline_local"), self.n,
                         lambda c, _p: task.fit(init, self.fd.train[c], derive_seed(self.cfg.seed, "local", c)),
                         "baseline_local", "client", self.show)
        result = self.per_client_model_accuracy([set_params(self.dense(), p) for p, _ in done])
        return {**result, "upload_bytes": 0, "download_bytes": 0}

    def fedavg(self) -> dict:
        res = self.dense_fedavg
        result = self.shared_model_accuracy(set_params(self.dense(), res.shared))
        up, down = bytes_of(res.ledger)
        return {**result, "upload_bytes": up, "download_bytes": down, "curve": res.curve}

    def fedavg_ft(self) -> dict:
        b, f = self.cfg.baselines, self.cfg.federated
        res = self.dense_fedavg
        task = SupervisedTask(self.dense, b.finetune_epochs, f.batch_size, self.sgd(b.finetune_lr))
        done = run_steps(self.store("baseline_fedavg_ft"), self.n,
                         lambda c, _p: task.fit(res.shared, self.fd.train[c], derive_seed(self.cfg.seed, "ft", c)),
                         "baseline_fedavg_ft", "client", self.show)
        result = self.per_client_model_accuracy([set_params(self.dense(), p) for p, _ in done])
        up, down = bytes_of(res.ledger)
        return {**result, "upload_bytes": up, "download_bytes": down}

    def centralized(self) -> dict:
        """Pooled data (a reference, not federated): upload = the raw training data, download = the model."""
        b, f = self.cfg.baselines, self.cfg.federated
        pooled = TensorData(torch.cat([t.x for t in self.fd.train]), torch.cat([t.y for t in self.fd.train]))
        task = SupervisedTask(self.dense, 1, f.batch_size, self.sgd())

        def epoch(i: int, prev: Params | None) -> tuple[Params, dict[str, float]]:
            params, _ = task.fit(prev or self.init(self.dense, "dense"), pooled, derive_seed(self.cfg.seed, "central", i))
            return params, {"round": i + 1, **self.means(self.shared_model_accuracy(set_params(self.dense(), params)))}

        done = run_steps(self.store("baseline_centralized"), b.centralized_epochs, epoch,
                         "baseline_centralized", "epoch", self.show)
        final = done[-1][0]
        result = self.shared_model_accuracy(set_params(self.dense(), final))
        raw_bytes = sum(t.x[0].numel() * len(t) + len(t) for t in self.fd.train)  # uint8 pixels + 1-byte labels
        model_bytes = sum(a.nbytes for a in final.values())
        return {**result, "upload_bytes": raw_bytes, "download_bytes": model_bytes * self.n,
                "curve": [m for _, m in done]}

    # ---- the whole run -----------------------------------------------------------------------
    def compute(self) -> dict:
        """MACs per sample and parameter counts: one NMoE device vs a centralized MoE vs dense."""
        m = self.cfg.model
        parts = {
            "extractor": (self.extractor(), self.fd.splits.input_shape),
            "gate": (self.gate(), (m.latent_dim,)),
            "expert": (self.expert(), (m.latent_dim,)),
            "dense": (self.dense(), self.fd.splits.input_shape),
        }
        p = {name: {"macs": count_macs(mod, shape), "params": count_params(mod)} for name, (mod, shape) in parts.items()}
        ext, gate, exp = p["extractor"], p["gate"], p["expert"]
        base = {key: ext[key] + gate[key] for key in ("macs", "params")}
        return {"parts": p, "per_device": {
            "nmoe": {"macs": base["macs"] + exp["macs"], "params": base["params"] + exp["params"],
                     "note": "on each device: extractor + gate + its own expert; the k-1 peer experts run on peers"},
            "nmoe_distributed_total": {
                "macs": base["macs"] + self.k * exp["macs"], "params": base["params"] + exp["params"],
                "note": f"fleet-wide compute of one inference (top-{self.k} experts); params per device"},
            "centralized_moe": {
                "macs": base["macs"] + self.k * exp["macs"], "params": base["params"] + self.n * exp["params"],
                "note": f"one device holding the extractor, gate and all {self.n} experts"},
            "dense": {**{k: p["dense"][k] for k in ("macs", "params")},
                      "note": "the local/fedavg model: extractor + one classifier head"},
        }}

    def run(self) -> dict[str, dict]:
        """Metrics of every selected method, in the order baselines then NMoE."""
        methods: dict[str, dict] = {}
        for name in self.cfg.baselines.methods:
            log.info("baseline %s", name)
            methods[name] = getattr(self, name)()
        for method in self.cfg.stage1.methods:
            if self.cfg.gate.methods:
                log.info("nmoe stage 1 = %s", method)
                methods.update(self.nmoe(method))
        return methods
