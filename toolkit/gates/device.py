"""The in-process device of toolkit.simulation, with the operations of the gate methods (operations.py).

Every NMoE evaluation also reports the device's routing ceilings (ceiling.py) for the experts of its
Stage 1 method. A gate method whose gate sees other expert outputs than the recipe's (a shared
expert appended, or the held-out experts) keeps them as gate inputs under `<stage1>/<gate>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from device_agent.wire.training_frames import ROUTING
from toolkit.artifacts import stage2_job, stage3_job
from toolkit.checkpoint import unpack
from toolkit.evaluate import ExpertOutputs, Router, gate_router, predict
from toolkit.federated import Client, EvaluateIns, EvaluateRes, Evaluator, Params, Stateful
from toolkit.federated.operations import Report
from toolkit.gates.ceiling import ceiling_metrics
from toolkit.gates.methods import (
    EXTENDED_GATES,
    SWITCHED,
    OODScore,
    fallback_router,
    split,
    switch_router,
    true_class_table,
    with_expert,
)
from toolkit.gates.operations import (
    HeldoutGateIns,
    HeldoutIns,
    HeldoutPeer,
    OODIns,
    StatsIns,
    StatsReport,
    VirtualGateIns,
    VirtualIns,
)
from toolkit.gates.stats import class_stats, from_params, sample_virtual, to_params
from toolkit.simulation import GateInputs, Held, ModelFactory, SimDevice, sgd
from toolkit.torch_params import set_params
from toolkit.training import GateData, GateTask, LocalClient, OptimSpec, SupervisedTask, TensorData

HELDOUT = "heldout"


def heldout_job(stage1: str) -> str:
    """The checkpoint job of fedgate_heldout's experts."""
    return f"{stage2_job(stage1)}_{HELDOUT}"


def gate_models(models: ModelFactory, outputs: int) -> ModelFactory:
    """The factory whose gate has `outputs` outputs (the peers' experts, plus a shared expert when one more)."""
    return models if outputs == models.num_experts else replace(models, num_experts=outputs)


def gate_init(models: ModelFactory, outputs: int) -> Params:
    """Seeded initial parameters of a gate with `outputs` outputs: the recipe's own for the peers' experts,
    `gate_shared` for one more (the shared expert)."""
    if outputs == models.num_experts:
        return models.initial("gate")
    wide = gate_models(models, outputs)
    return wide.init(wide.gate, "gate_shared")


def shared_head_init(models: ModelFactory) -> Params:
    """Initial parameters of the shared expert FedSC trains on frozen latents (it has no classifier head)."""
    return models.init(models.expert, "shared_head")


@dataclass(frozen=True)
class SharedEvaluator:
    """A participant that trains nothing and evaluates with the shared parameters it is sent."""

    cid: int
    check: Callable[[Params], EvaluateRes]

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        return self.check(ins.params)


class GateSimDevice(SimDevice):
    """A SimDevice that also implements toolkit.gates' operations (GateDevice, HeldoutPeer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ood: dict[str, OODScore] = {}  # by Stage 1 method
        self._ceilings: dict[str, dict[str, float]] = {}  # by Stage 1 method

    @property
    def num_classes(self) -> int:
        return self.models.num_classes

    # ---- every NMoE evaluation: the ceilings of the Stage 1 method's experts -------------------------
    def _evaluate_nmoe(self, stage1: str, router: Router) -> EvaluateRes:
        res = super()._evaluate_nmoe(stage1, router)
        base = stage1.split("/")[0]
        if base not in self._ceilings:
            inputs = self._gate_inputs[base]
            self._ceilings[base] = ceiling_metrics(inputs.personal, self.personal.y, inputs.public,
                                                   self.public.data.y)
        width = self._gate_inputs[stage1].personal.probs.shape[1]  # every expert the router may choose
        shares = {f"{ROUTING}{e}": res.metrics.get(f"{ROUTING}{e}", 0.0) for e in range(width)}
        return EvaluateRes(res.num_examples, {**res.metrics, **shares, **self._ceilings[base]})

    def gate(self, stage1: str, gate: str) -> Client:
        if gate not in EXTENDED_GATES:
            return super().gate(stage1, gate)
        job = stage3_job(stage1, gate)
        if job not in self._clients:
            g, k, key = self.cfg.gate, self.cfg.model.top_k, f"{stage1}/{gate}"
            inputs = self._gate_inputs[key]
            models = gate_models(self.models, inputs.train.probs.shape[1])
            task = GateTask(models.gate, g.local_epochs, g.batch_size,
                            OptimSpec("adam", g.lr, weight_decay=g.weight_decay))
            score = self._ood.get(stage1) if EXTENDED_GATES[gate].kind == "ood" else None

            def check(params: Params) -> EvaluateRes:
                route = gate_router(set_params(models.gate(), params), k)
                if score is not None:
                    route = fallback_router(route, score, self.models.num_experts)
                return self._evaluate_nmoe(key, route)

            self._clients[job] = LocalClient(self.cid, task, inputs.train, gate_init(self.models, models.num_experts),
                                             check)
        return self._clients[job]

    # ---- fedgate_switch ------------------------------------------------------------------------------
    def switch_gate(self, stage1: str) -> Evaluator:
        """Its fedgate gate for familiar inputs, its fedgate_vl gate for the others (its OOD score decides);
        evaluated with both jobs' final shared parameters, packed under each gate's name."""
        k, score = self.cfg.model.top_k, self._ood[stage1]

        def router(gate: str, params: Params) -> Router:
            client = self.gate(stage1, gate)
            assert isinstance(client, LocalClient)  # the simulation's own client, holding its gate's state
            key = f"{stage1}/{gate}" if gate in EXTENDED_GATES else stage1
            models = gate_models(self.models, self._gate_inputs[key].train.probs.shape[1])
            return gate_router(set_params(models.gate(), {**client.state, **unpack(gate, params)}), k)

        familiar, unfamiliar = SWITCHED
        return SharedEvaluator(self.cid, lambda params: self._evaluate_nmoe(
            f"{stage1}/{unfamiliar}", switch_router(router(familiar, params), router(unfamiliar, params), score)))

    # ---- the shared expert -------------------------------------------------------------------------
    def shared_head(self, stage1: str) -> Client:
        job = f"shared_head_{stage1}"
        if job not in self._clients:
            f = self.cfg.federated
            task = SupervisedTask(self.models.expert, f.local_epochs, f.batch_size, sgd(f))
            self._clients[job] = LocalClient(self.cid, task, TensorData(self._latents[stage1].train, self.train.y),
                                             shared_head_init(self.models))
        return self._clients[job]

    def _with_head(self, base: GateInputs, head: Params, train: GateData | None = None) -> GateInputs:
        """The gate inputs with the shared expert as one more expert (index = number of peers)."""
        expert = set_params(self.models.expert(), head)

        def probs(z: torch.Tensor) -> torch.Tensor:
            return torch.softmax(predict(expert, z), dim=-1)

        return GateInputs(train or base.train, with_expert(base.personal, probs(base.personal.z)),
                          with_expert(base.public, probs(base.public.z)))

    # ---- fedgate_ood -------------------------------------------------------------------------------
    def prepare_ood(self, ins: OODIns) -> Report:
        z = self._latents[ins.stage1]
        self._ood[ins.stage1] = OODScore.fit(z.train, self.train.y, self.num_classes, ins.heldout_fraction,
                                             ins.quantile, ins.temperature, ins.seed)
        self._gate_inputs[f"{ins.stage1}/{ins.gate}"] = self._with_head(self._gate_inputs[ins.stage1], ins.head)
        return Report(len(self.train), {})

    # ---- fedgate_vl / localgate_vl -------------------------------------------------------------------
    def class_stats(self, ins: StatsIns) -> StatsReport:
        stats = class_stats(self._latents[ins.stage1].train, self.train.y, self.num_classes)
        return StatsReport(len(self.train), to_params(stats, ins.diagonal))

    def _virtual(self, ins: VirtualIns) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self._latents[ins.stage1].train.shape[1]
        return sample_virtual(from_params(ins.pooled, dim), torch.full((self.num_classes,), ins.per_class), ins.seed)

    def virtual_answers(self, ins: VirtualIns) -> np.ndarray:
        vz, vy = self._virtual(ins)
        probs = self.expert_outputs(ins.stage1, vz.numpy())
        answers: np.ndarray = probs[np.arange(len(vy)), vy.numpy()]
        return answers

    def prepare_virtual_gate(self, ins: VirtualGateIns) -> Report:
        stage1 = ins.virtual.stage1
        vz, vy = self._virtual(ins.virtual)
        base = self._gate_inputs[stage1]
        expert = set_params(self.models.expert(), ins.head)

        def head(z: torch.Tensor) -> torch.Tensor:
            return torch.softmax(predict(expert, z), dim=-1)

        real = torch.cat([base.train.probs, head(base.train.z).unsqueeze(1)], dim=1)
        answers = torch.cat([torch.from_numpy(ins.answers), head(vz)[torch.arange(len(vy)), vy].unsqueeze(1)], dim=1)
        train = GateData(torch.cat([base.train.z, vz]), torch.cat([real, true_class_table(answers, vy, self.num_classes)]),
                         torch.cat([base.train.y, vy]))
        self._gate_inputs[f"{stage1}/{ins.gate}"] = self._with_head(base, ins.head, train)
        return Report(len(train), {})

    # ---- fedgate_heldout ---------------------------------------------------------------------------
    def train_heldout_expert(self, ins: HeldoutIns) -> Report:
        kept, _ = split(len(self.train), ins.fraction, ins.split_seed)
        e = self.cfg.expert
        task = SupervisedTask(self.models.expert, e.epochs, e.batch_size,
                              OptimSpec("adam", e.lr, weight_decay=e.weight_decay))
        init = self.models.seeded(self.models.expert, ins.init_seed)
        data = TensorData(self._latents[ins.stage1].train[kept], self.train.y[kept])
        params, metrics = task.fit(init, data, ins.seed)
        self._held(ins.stage1).set_state(params)
        return Report(len(kept), metrics)

    def _held(self, stage1: str) -> Held:
        return self._experts.setdefault(heldout_job(stage1), Held())

    def heldout_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray:
        expert = set_params(self.models.expert(), self._held(stage1).state)
        probs: np.ndarray = torch.softmax(predict(expert, torch.from_numpy(z)), dim=-1).numpy()
        return probs

    def prepare_heldout_gate(self, ins: HeldoutGateIns) -> Report:
        z = self._latents[ins.stage1]
        _, held = split(len(self.train), ins.fraction, ins.split_seed)

        def probs(latents: torch.Tensor) -> torch.Tensor:  # [N, experts, classes]
            peers: list[HeldoutPeer] = [self.peers(e) for e in ins.experts]  # type: ignore[misc]
            return torch.stack([torch.from_numpy(p.heldout_outputs(ins.stage1, latents.numpy())) for p in peers], dim=1)

        self._gate_inputs[f"{ins.stage1}/fedgate_heldout"] = GateInputs(
            GateData(z.train[held], probs(z.train[held]), self.train.y[held]),
            ExpertOutputs(z.personal, probs(z.personal)), ExpertOutputs(z.public, probs(z.public)))
        return Report(len(held), {})

    # ---- simulation only ---------------------------------------------------------------------------
    def state(self, job: str) -> Stateful:
        if job.startswith(stage2_job("")) and job.endswith(f"_{HELDOUT}"):
            return self._experts.setdefault(job, Held())
        return super().state(job)
