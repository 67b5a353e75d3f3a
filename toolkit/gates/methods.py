"""Gate methods that know what they do not know, on top of one Stage-1 extractor and its experts.

Every method here adds to FedGate (gate body averaged, final layer never leaves the device) one way
of handling inputs of classes a device never saw:

- `fedgate_ood`: FedGate's gates unchanged, plus an out-of-distribution fallback to a **shared
  expert** (the Stage-1 FedAvg classifier head, which every device already has): per input, the
  Mahalanobis distance of its latent to the device's own class means (shared covariance) sets how much
  weight goes to the shared expert instead of the gate's top-k. Means, covariance and the threshold
  come from the device's own data (threshold: a quantile of the scores of a held-out part of it), so
  nothing new leaves the device. Sources: Lee et al. 2018 (Mahalanobis score); FedTHE (Jiang & Lin,
  ICLR 2023) and PFL-MoE (Guo et al. 2021) for mixing a global and a personal model per input.
- `fedgate_vl` / `localgate_vl`: devices share per-class latent statistics (counts, means,
  covariances); the server pools them exactly (CCVR, Luo et al. NeurIPS 2021), recalibrates the
  shared expert's last layer on virtual latents drawn from the pool (CCVR), and every device adds a
  common set of virtual latents of *every* class to its gate's training data, so its final layer
  learns where unfamiliar latents should go. The gate routes over the peers' experts **plus the
  shared expert** (an always-available local expert, as in shared-expert MoE designs, e.g.
  DeepSeekMoE). `localgate_vl` is the same with nothing averaged.
- `fedgate_heldout`: PFL-MoE's recipe: each expert trains on (1 - f) of its device's data and the
  gate on the held-out f, so the gate does not learn from an expert that has memorised its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from toolkit.evaluate import ExpertOutputs, Router, gate_router, predict
from toolkit.federated import FedAvg, NoSharing, Params, PartialSync, Strategy, nbytes
from toolkit.federated.engine import run_federated
from toolkit.gates.stats import (
    ClassStats,
    Mahalanobis,
    class_stats,
    from_params,
    pool,
    sample_virtual,
    to_params,
)
from toolkit.models import GATE_FINAL_PREFIX, Gate
from toolkit.seeding import derive_seed
from toolkit.torch_params import get_params, set_params, subset
from toolkit.training import GateData, GateTask, LocalClient, OptimSpec, SupervisedTask, TensorData

if TYPE_CHECKING:
    from toolkit.pipeline import LatentSets, Pipeline

CCVR_EPOCHS = 5  # last-layer recalibration of the shared expert on virtual latents (CCVR)
CCVR_LR = 1e-3
MIN_KNOWN_FRACTION = 0.01  # a class with less than this share of a device's data is not 'known' to its OOD score


@dataclass(frozen=True)
class GateMethod:
    """One extended gate method: its aggregation strategy and what it adds to FedGate."""

    strategy: Callable[[], Strategy]
    kind: str  # "ood" | "virtual" | "heldout"


EXTENDED_GATES: dict[str, GateMethod] = {
    "fedgate_ood": GateMethod(lambda: PartialSync((GATE_FINAL_PREFIX,)), "ood"),
    "fedgate_vl": GateMethod(lambda: PartialSync((GATE_FINAL_PREFIX,)), "virtual"),
    "localgate_vl": GateMethod(NoSharing, "virtual"),
    "fedgate_heldout": GateMethod(lambda: PartialSync((GATE_FINAL_PREFIX,)), "heldout"),
}


@dataclass(frozen=True)
class Stage3Inputs:
    """What the classic gates of one Stage-1 method are trained and evaluated on."""

    method: str
    z: LatentSets
    experts: list[Params]
    personal: list[ExpertOutputs]
    global_: ExpertOutputs
    gate_data: list[GateData]


@dataclass(frozen=True)
class SharedExpert:
    """The classifier head every device holds, and the bytes it cost beyond Stage 1."""

    params: Params
    upload_bytes: int
    download_bytes: int


def with_expert(out: ExpertOutputs, extra: torch.Tensor) -> ExpertOutputs:
    """The same outputs with one more expert's class probabilities [N, C] appended (index E)."""
    return ExpertOutputs(out.z, torch.cat([out.probs, extra.unsqueeze(1)], dim=1))


def fallback_router(route: Router, score: Callable[[torch.Tensor], torch.Tensor], shared_index: int) -> Router:
    """Top-k of `route` with weights (1 - s), plus the shared expert with weight s = score(z) in [0, 1]."""
    def routed(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, weights = route(z)
        s = score(z).unsqueeze(1)
        shared = torch.full((len(z), 1), shared_index, dtype=idx.dtype)
        return torch.cat([idx, shared], dim=1), torch.cat([(1 - s) * weights, s], dim=1)
    return routed


@dataclass(frozen=True)
class OODScore:
    """s(z) = sigmoid((d(z) - tau) / (temperature * spread)): ~0 for familiar latents, ~1 for far ones.

    d is the Mahalanobis distance to the device's known classes; tau the `quantile` of d over a
    held-out part of the device's data, spread = tau - median of those held-out distances.
    """

    maha: Mahalanobis
    tau: float
    spread: float
    temperature: float

    @classmethod
    def fit(cls, z: torch.Tensor, y: torch.Tensor, num_classes: int, heldout: float, quantile: float,
            temperature: float, seed: int) -> OODScore:
        fit_idx, held_idx = split(len(y), heldout, seed)
        stats = class_stats(z[fit_idx], y[fit_idx], num_classes)
        maha = Mahalanobis.fit(stats, min_count=max(2, round(MIN_KNOWN_FRACTION * len(fit_idx))))
        held = maha.score(z[held_idx])
        tau = float(torch.quantile(held, quantile))
        spread = max(tau - float(held.median()), 1e-6)
        return cls(maha, tau, spread, temperature)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.maha.score(z) - self.tau) / (self.temperature * self.spread))


def split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (kept, held-out) index split with round(fraction * n) held out (at least 1 of each)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = min(max(1, round(fraction * n)), n - 1)
    return perm[cut:], perm[:cut]


class ExtendedGates:
    """Runs the extended gate methods of one Stage-1 method through the pipeline's jobs and checkpoints."""

    def __init__(self, pipeline: Pipeline, inputs: Stage3Inputs) -> None:
        self.p, self.x = pipeline, inputs
        self.cfg, self.n, self.k = pipeline.cfg, pipeline.n, pipeline.k
        self.train_y = [t.y for t in pipeline.fd.train]
        self.num_classes = pipeline.fd.splits.num_classes

    def run(self, gate: str) -> tuple[dict, int, int]:
        """(metrics, upload bytes, download bytes beyond Stage 1) of one extended gate method."""
        kind = EXTENDED_GATES[gate].kind
        if kind == "ood":
            return self.ood()
        if kind == "virtual":
            return self.virtual(gate)
        return self.heldout(gate)

    # ---- the shared expert ----------------------------------------------------------------------
    def shared_head(self) -> SharedExpert:
        """The Stage-1 classifier head; FedSC has none, so one is trained by FedAvg on the frozen latents."""
        method = self.x.method
        if method == "fedce":
            return SharedExpert(subset(self.p.dense_fedavg.shared, "head."), 0, 0)
        if method == "hybrid":
            return SharedExpert(subset(self.p.contrastive(method).shared, "head."), 0, 0)
        f = self.cfg.federated
        task = SupervisedTask(self.p.expert, f.local_epochs, f.batch_size, self.p.sgd())
        init = self.p.init(self.p.expert, "shared_head")
        clients = [LocalClient(c, task, TensorData(self.x.z.train[c], self.train_y[c]), init) for c in range(self.n)]
        job = f"shared_head_{method}"
        res = run_federated(job, FedAvg(), clients, init, f.rounds, f.client_fraction, self.cfg.seed,
                            self.p.store(job), None, self.p.show)
        return SharedExpert(res.shared, res.ledger.total("up"), res.ledger.total("down"))

    def head_probs(self, head: Params, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(predict(set_params(self.p.expert(), head), z), dim=-1)

    def extended(self, head: Params) -> tuple[list[ExpertOutputs], ExpertOutputs]:
        """Personalized and global evaluation outputs with the shared expert as expert index n."""
        personal = [with_expert(o, self.head_probs(head, o.z)) for o in self.x.personal]
        return personal, with_expert(self.x.global_, self.head_probs(head, self.x.global_.z))

    # ---- fedgate_ood ------------------------------------------------------------------------------
    def ood(self) -> tuple[dict, int, int]:
        g = self.cfg.gate
        shared = self.shared_head()
        job = self.p.gate_job(self.x.method, "fedgate", self.x.gate_data, self.x.personal, self.x.global_)
        routers = []
        for c in range(self.n):
            score = OODScore.fit(self.x.z.train[c], self.train_y[c], self.num_classes, g.heldout_fraction,
                                 g.ood_quantile, g.ood_temperature, derive_seed(self.cfg.seed, "ood", c))
            route = gate_router(set_params(self.p.gate(), job.client_models[c]), self.k)
            routers.append(fallback_router(route, score, self.n))
        result = self.p.nmoe_accuracy(routers, *self.extended(shared.params))
        result["curve"] = job.curve
        up, down = job.ledger.total("up"), job.ledger.total("down")
        return result, up + shared.upload_bytes, down + shared.download_bytes

    # ---- fedgate_vl / localgate_vl -----------------------------------------------------------------
    def pooled_stats(self) -> tuple[ClassStats, int]:
        """The pool of every device's class statistics (as uploaded) and the bytes one upload takes."""
        diagonal = self.cfg.gate.class_stats == "diagonal"
        uploads = [to_params(class_stats(self.x.z.train[c], self.train_y[c], self.num_classes), diagonal)
                   for c in range(self.n)]
        dim = self.x.z.global_.shape[1]
        return pool([from_params(u, dim) for u in uploads]), nbytes(uploads[0])

    def calibrated(self, head: Params, vz: torch.Tensor, vy: torch.Tensor) -> Params:
        """CCVR: the shared expert's last layer retrained on virtual latents (rest frozen), seeded."""
        model = set_params(self.p.expert(), head)
        last = model.net[-1]
        opt = torch.optim.Adam(last.parameters(), lr=CCVR_LR)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "ccvr", self.x.method))
        with torch.no_grad():
            hidden = model.net[:-1](vz)
        for _ in range(CCVR_EPOCHS):
            for idx in torch.randperm(len(vy), generator=gen).split(self.cfg.gate.batch_size):
                loss = F.cross_entropy(last(hidden[idx]), vy[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return get_params(model)

    def virtual(self, gate: str) -> tuple[dict, int, int]:
        g = self.cfg.gate
        pooled, stats_bytes = self.pooled_stats()
        per_class = torch.full((self.num_classes,), g.virtual_per_class)
        vz, vy = sample_virtual(pooled, per_class, derive_seed(self.cfg.seed, "virtual", self.x.method))
        shared = self.shared_head()
        head = self.calibrated(shared.params, vz, vy)
        virtual_probs = torch.cat([self.p.expert_probs(self.x.experts, vz), self.head_probs(head, vz).unsqueeze(1)], 1)
        data = []
        for c, real in enumerate(self.x.gate_data):
            real_probs = torch.cat([real.probs, self.head_probs(head, real.z).unsqueeze(1)], dim=1)
            data.append(GateData(torch.cat([real.z, vz]), torch.cat([real_probs, virtual_probs]),
                                 torch.cat([real.y, vy])))
        personal, global_ = self.extended(head)
        job = self.train_gates(gate, data, self.n + 1, personal, global_)
        routers = [gate_router(set_params(self.gate(self.n + 1), job.client_models[c]), self.k) for c in range(self.n)]
        result = self.p.nmoe_accuracy(routers, personal, global_)
        result["curve"] = job.curve
        # per device: its statistics up, the pool and the calibrated head down, then its expert's
        # true-class probability on every virtual latent up and everyone's down (the table the gate trains on)
        m = len(vy)
        extra_up = stats_bytes + 4 * m
        extra_down = stats_bytes + nbytes(head) + 4 * m * self.n
        result["revealed"] = {
            "what": "per device: per-class latent counts (its label histogram), means and "
                    f"{g.class_stats} covariances; its expert's true-class probability on {m} virtual latents",
            "stats_bytes_per_device": stats_bytes, "virtual_latents": m}
        up, down = job.ledger.total("up"), job.ledger.total("down")
        return (result, up + shared.upload_bytes + self.n * extra_up,
                down + shared.download_bytes + self.n * extra_down)

    # ---- fedgate_heldout ------------------------------------------------------------------------
    def heldout(self, gate: str) -> tuple[dict, int, int]:
        g = self.cfg.gate
        parts = [split(len(y), g.heldout_fraction, derive_seed(self.cfg.seed, "heldout", c))
                 for c, y in enumerate(self.train_y)]
        experts = self.p.experts(self.x.method, self.x.z, subsets=[kept for kept, _ in parts], tag="heldout")
        probs = lambda z: self.p.expert_probs(experts, z)
        data = [GateData(self.x.z.train[c][held], probs(self.x.z.train[c][held]), self.train_y[c][held])
                for c, (_, held) in enumerate(parts)]
        personal = [ExpertOutputs(o.z, probs(o.z)) for o in self.x.personal]
        global_ = ExpertOutputs(self.x.global_.z, probs(self.x.global_.z))
        job = self.train_gates(gate, data, self.n, personal, global_)
        routers = [gate_router(set_params(self.gate(self.n), job.client_models[c]), self.k) for c in range(self.n)]
        result = self.p.nmoe_accuracy(routers, personal, global_)
        result["curve"] = job.curve
        return result, job.ledger.total("up"), job.ledger.total("down")

    # ---- shared by the trained variants ---------------------------------------------------------
    def gate(self, outputs: int) -> Gate:
        m = self.cfg.model
        return Gate(m.latent_dim, m.gate_hidden, outputs)

    def train_gates(self, gate: str, data: list[GateData], outputs: int, personal: list[ExpertOutputs],
                    global_: ExpertOutputs):
        """One federated gate job (checkpointed as stage3_<method>_<gate>) with its evaluation curve."""
        g = self.cfg.gate
        build = lambda: self.gate(outputs)
        task = GateTask(build, g.local_epochs, g.batch_size, OptimSpec("adam", g.lr, weight_decay=g.weight_decay))
        init = self.p.init(build, "gate" if outputs == self.n else "gate_shared")
        clients = [LocalClient(c, task, data[c], init) for c in range(self.n)]
        evaluate = lambda models: self.p.means(self.p.nmoe_accuracy(
            [gate_router(set_params(build(), models[c]), self.k) for c in range(self.n)], personal, global_))
        job = f"stage3_{self.x.method}_{gate}"
        return run_federated(job, EXTENDED_GATES[gate].strategy(), clients, init, g.rounds, g.client_fraction,
                             self.cfg.seed, self.p.store(job), evaluate, self.p.show)
