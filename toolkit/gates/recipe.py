"""The NMoE recipe with the gate methods of toolkit.gates: server side, over device operations only.

Each method prepares its devices (operations.py), then runs as any gate variant of the recipe (one
federated job `stage3_<stage1>_<gate>`, the devices' own evaluations). What the server holds and
sends beyond the recipe's: the shared expert (Stage 1's classifier head; FedSC: one FedAvg job on the
frozen latents), the pool of the devices' class statistics, the virtual latents' seed and every
expert's true-class probabilities on them. Every evaluation also carries the devices' routing
ceilings, reported as their means (`ceiling`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from device_agent.wire.training_frames import ROUTING
from toolkit.artifacts import shared_expert_job, stage3_job
from toolkit.checkpoint import JobState, pack, unpack
from toolkit.federated import EvaluateIns, EvaluateRes, Evaluator, FedAvg, Params, Strategy, nbytes
from toolkit.federated.engine import run_federated
from toolkit.federated.recipe import FailureRows, NMoERecipe, failure_rows, round_policy
from toolkit.gates.ceiling import CEILING, mean_ceilings
from toolkit.gates.device import gate_init, heldout_job, shared_head_init
from toolkit.gates.methods import EXTENDED_GATES, SWITCHED, ccvr_calibrated
from toolkit.gates.operations import (
    GateDevice,
    HeldoutGateIns,
    HeldoutIns,
    OODIns,
    StatsIns,
    StatsReport,
    VirtualGateIns,
    VirtualIns,
)
from toolkit.gates.stats import from_params, pool, sample_virtual, to_params
from toolkit.seeding import derive_seed
from toolkit.simulation import ModelFactory
from toolkit.torch_params import subset


@dataclass
class Preparation:
    """What a gate method's preparation cost and revealed beyond its gate job."""

    upload_bytes: int = 0
    download_bytes: int = 0
    failures: FailureRows = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    """An evaluator whose answers are kept (for the metrics the recipe's summary does not read)."""

    inner: Evaluator
    answers: dict[int, EvaluateRes]

    @property
    def cid(self) -> int:
        return self.inner.cid

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        res = self.inner.evaluate(ins)
        self.answers[self.cid] = res
        return res


class GatesRecipe(NMoERecipe[GateDevice]):
    """NMoERecipe plus fedgate_ood, fedgate_vl, localgate_vl and fedgate_heldout, and the ceilings."""

    def __init__(self, cfg: Any, devices: Sequence[GateDevice], models: ModelFactory, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(cfg, devices, models.initial, *args, **kwargs)
        self.models = models
        self._results: dict[tuple[str, str], dict[str, Any]] = {}  # (stage 1, gate) -> its metrics

    def gate_strategy(self, gate: str) -> Strategy:
        strategy = EXTENDED_GATES[gate].strategy if gate in EXTENDED_GATES else None
        return strategy() if strategy else super().gate_strategy(gate)

    def gate_init(self, gate: str) -> Params:
        shared_column = gate in EXTENDED_GATES and EXTENDED_GATES[gate].kind == "virtual"
        return gate_init(self.models, self.models.num_experts + shared_column)

    def gate(self, method: str, gate: str, s1: Any, failures: FailureRows) -> dict[str, Any]:
        if gate == "fedgate_switch":
            result = self.switch(method, gate, s1, failures)
        elif gate not in EXTENDED_GATES:
            result = super().gate(method, gate, s1, failures)
        else:
            prepare: dict[str, Callable[[str, str, Any], Preparation]] = {
                "ood": self.prepare_ood, "virtual": self.prepare_virtual, "heldout": self.prepare_heldout}
            extra = prepare[EXTENDED_GATES[gate].kind](method, gate, s1)
            result = super().gate(method, gate, s1, failures + extra.failures)
            result["upload_bytes"] += extra.upload_bytes
            result["download_bytes"] += extra.download_bytes
            result.update(extra.info)
        self._results[(method, gate)] = result
        return result

    def evaluate(self, job: str, evaluators: Sequence[Evaluator], ins: EvaluateIns) -> tuple[dict[str, Any], FailureRows]:
        answers: dict[int, EvaluateRes] = {}
        result, failures = super().evaluate(job, [Recorded(e, answers) for e in evaluators], ins)
        rows = [answers[e.cid].metrics for e in evaluators if e.cid in answers]
        if all(any(k.startswith(CEILING) for k in m) for m in rows):
            result["ceiling"] = mean_ceilings(rows)
        width = sum(k.startswith(ROUTING) for k in rows[0])
        if width > len(self.devices):  # a shared expert: one more routing column
            result["routing"] = [[m.get(f"{ROUTING}{e}", 0.0) for e in range(width)] for m in rows]
        return result, failures

    # ---- the shared expert ---------------------------------------------------------------------
    def shared_head(self, method: str, s1: Any) -> tuple[Params, Preparation]:
        """Stage 1's classifier head; FedSC has none, so the devices train one by FedAvg on their frozen latents."""
        if method != "fedsc":
            return subset(s1.shared, "head."), Preparation()
        f, job = self.cfg.federated, f"shared_head_{method}"
        res = run_federated(job, FedAvg(), [d.shared_head(method) for d in self.devices],
                            shared_head_init(self.models), f.rounds, self.cfg.seed, policy=round_policy(f),
                            executor=self.executor, availability=self.availability, store=self.store(job),
                            private=self.private(job), show_progress=self.show)
        return res.shared, Preparation(res.ledger.total("up"), res.ledger.total("down"),
                                       failure_rows(job, res.ledger.failures))

    # ---- fedgate_ood -------------------------------------------------------------------------------
    def prepare_ood(self, method: str, gate: str, s1: Any) -> Preparation:
        g, n = self.cfg.gate, len(self.devices)
        head, prep = self.shared_head(method, s1)
        self.store(shared_expert_job(method, gate)).save(JobState(1, pack("shared", head), {}, True))  # for export
        _, failures = self.every_device(f"{gate}_{method}", "prepare_ood", lambda d: d.prepare_ood(OODIns(
            method, gate, head, g.heldout_fraction, g.ood_quantile, g.ood_temperature,
            derive_seed(self.cfg.seed, "ood", d.cid))))
        return Preparation(prep.upload_bytes, prep.download_bytes + n * nbytes(head), prep.failures + failures)

    # ---- fedgate_vl / localgate_vl -----------------------------------------------------------------
    def prepare_virtual(self, method: str, gate: str, s1: Any) -> Preparation:
        g, n, job = self.cfg.gate, len(self.devices), f"{gate}_{method}"
        stats, failures = self.every_device(job, "class_stats", lambda d: d.class_stats(
            StatsIns(method, g.class_stats == "diagonal")))
        uploads: list[StatsReport] = [stats[cid] for cid in sorted(stats)]
        dim = self.cfg.model.latent_dim
        pooled = to_params(pool([from_params(u.stats, dim) for u in uploads]), g.class_stats == "diagonal")
        virtual = VirtualIns(method, pooled, g.virtual_per_class, derive_seed(self.cfg.seed, "virtual", method))
        vz, vy = sample_virtual(from_params(pooled, dim), torch.full((self.models.num_classes,), g.virtual_per_class),
                                virtual.seed)
        head, prep = self.shared_head(method, s1)
        head = ccvr_calibrated(self.models.expert(), head, vz, vy, g.batch_size,
                               derive_seed(self.cfg.seed, "ccvr", method))
        self.store(shared_expert_job(method, gate)).save(JobState(1, pack("shared", head), {}, True))  # for export
        answers, more = self.every_device(job, "virtual_answers", lambda d: d.virtual_answers(virtual))
        table = np.stack([answers[d.cid] for d in self.devices], axis=1).astype(np.float32)
        _, last = self.every_device(job, "prepare_virtual_gate", lambda d: d.prepare_virtual_gate(
            VirtualGateIns(virtual, gate, table, head)))
        stats_bytes = nbytes(uploads[0].stats)
        m = len(vy)
        revealed = {"what": "per device: per-class latent counts (its label histogram), means and "
                            f"{g.class_stats} covariances; its expert's true-class probability on {m} virtual latents",
                    "stats_bytes_per_device": stats_bytes, "virtual_latents": m}
        return Preparation(prep.upload_bytes + n * (stats_bytes + 4 * m),
                           prep.download_bytes + n * (nbytes(pooled) + nbytes(head) + table.nbytes),
                           prep.failures + failures + more + last, {"revealed": revealed})

    # ---- fedgate_switch ------------------------------------------------------------------------------
    def switch(self, method: str, gate: str, s1: Any, failures: FailureRows) -> dict[str, Any]:
        """No training: every device switches per input between its fedgate and fedgate_vl gates (both
        trained before, config validation sees to it) by its OOD score. Bytes: both jobs' and preparations',
        Stage 1 once, plus both final shared gate bodies sent for the evaluation."""
        prep = self.prepare_ood(method, gate, s1)
        shared: Params = {}
        for g in SWITCHED:
            saved = self.store(stage3_job(method, g)).load()
            if saved is None or not saved.done:
                raise RuntimeError(f"{gate} needs the finished job {stage3_job(method, g)}")
            shared.update(pack(g, unpack("shared", saved.arrays)))
        result, evaluation_failures = self.evaluate(stage3_job(method, gate), [d.switch_gate(method) for d in self.devices],
                                                    EvaluateIns(0, shared))
        parts = [self._results[(method, g)] for g in SWITCHED]
        n = len(self.devices)
        result["upload_bytes"] = sum(p["upload_bytes"] for p in parts) - s1.ledger.total("up") + prep.upload_bytes
        result["download_bytes"] = (sum(p["download_bytes"] for p in parts) - s1.ledger.total("down")
                                    + prep.download_bytes + n * nbytes(shared))
        result["failures"] = failures + prep.failures + evaluation_failures
        return result

    # ---- fedgate_heldout ---------------------------------------------------------------------------
    def prepare_heldout(self, method: str, gate: str, s1: Any) -> Preparation:
        g, seed = self.cfg.gate, self.cfg.seed

        def split_seed(cid: int) -> int:
            return derive_seed(seed, "heldout", cid)

        failures = self.experts(method, heldout_job(method), lambda d: d.train_heldout_expert(HeldoutIns(
            method, g.heldout_fraction, split_seed(d.cid), derive_seed(seed, "init", f"expert{d.cid}"),
            derive_seed(seed, method, "expert", d.cid))))
        experts = tuple(d.cid for d in self.devices)
        _, more = self.every_device(heldout_job(method), "prepare_heldout_gate", lambda d: d.prepare_heldout_gate(
            HeldoutGateIns(method, g.heldout_fraction, split_seed(d.cid), experts)))
        return Preparation(failures=failures + more)
