"""Client updates (local training), written once and called by every transport.

A task turns (parameters, local data, seed) into (new parameters, metrics); `LocalClient` wraps a
task and a client's data as a federated `Client` for the in-process simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.augment import nt_xent, random_view
from toolkit.federated import EvaluateIns, EvaluateRes, FitIns, FitRes, Params
from toolkit.models import ContrastiveNet, Gate
from toolkit.torch_params import get_params, set_params


@dataclass(frozen=True)
class TensorData:
    """Inputs and labels held in memory (normalized images or latents)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class GateData:
    """What a gate trains on: latents, every frozen expert's class probabilities, labels."""

    z: torch.Tensor  # [N, D]
    probs: torch.Tensor  # [N, E, C]
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class OptimSpec:
    """Optimizer settings of a local update."""

    kind: Literal["sgd", "adam"]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max gradient L2 norm per step; keeps non-IID local updates from exploding

    def make(self, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer (local updates start fresh every round, as in FedAvg)."""
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


def minibatches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering 0..n-1; a trailing batch of one sample is dropped."""
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) > 1:
            yield idx


D = TypeVar("D", bound=Sized)
D_contra = TypeVar("D_contra", bound=Sized, contravariant=True)


class Task(Protocol[D_contra]):
    """A client update on its local data (each task has its own data type)."""

    def fit(self, params: Params, data: D_contra, seed: int) -> tuple[Params, dict[str, float]]: ...


BatchLoss = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def optimize(model: nn.Module, optim: OptimSpec, epochs: int, batch_size: int, n: int, seed: int,
             batch_loss: BatchLoss) -> dict[str, float]:
    """The one local training loop: `epochs` passes of shuffled minibatches over n samples."""
    model.train()
    opt, gen = optim.make(model.parameters()), torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(epochs):
        for idx in minibatches(n, batch_size, gen):
            loss = batch_loss(idx, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
    return {"loss": total / max(count, 1)}


@dataclass(frozen=True)
class SupervisedTask:
    """Cross-entropy training of a whole module (dense model, or an expert on latents)."""

    build: Callable[[], nn.Module]
    epochs: int
    batch_size: int
    optim: OptimSpec

    def fit(self, params: Params, data: TensorData, seed: int) -> tuple[Params, dict[str, float]]:
        model = set_params(self.build(), params)
        metrics = optimize(model, self.optim, self.epochs, self.batch_size, len(data), seed,
                           lambda idx, _gen: F.cross_entropy(model(data.x[idx]), data.y[idx]))
        return get_params(model), metrics


@dataclass(frozen=True)
class ContrastiveTask:
    """FedSC (sc_weight * NT-Xent over two views) and hybrid (+ ce_weight * cross-entropy)."""

    build: Callable[[], ContrastiveNet]
    epochs: int
    batch_size: int
    optim: OptimSpec
    temperature: float
    sc_weight: float
    ce_weight: float

    def fit(self, params: Params, data: TensorData, seed: int) -> tuple[Params, dict[str, float]]:
        model = self.build()
        set_params(model, params)

        def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            x, y = data.x[idx], data.y[idx]
            z1, z2 = model.extractor(random_view(x, gen)), model.extractor(random_view(x, gen))
            loss = self.sc_weight * nt_xent(model.projection(z1), model.projection(z2), self.temperature)
            if self.ce_weight and model.head is not None:
                ce = F.cross_entropy(model.head(z1), y) + F.cross_entropy(model.head(z2), y)
                loss = loss + self.ce_weight * ce / 2
            return loss

        metrics = optimize(model, self.optim, self.epochs, self.batch_size, len(data), seed, batch_loss)
        return get_params(model), metrics


def mixture_nll(gate_logits: torch.Tensor, probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the gate-weighted mixture of (frozen) expert class probabilities."""
    weights = torch.softmax(gate_logits, dim=-1)
    p_true = (weights * probs[torch.arange(len(y)), :, y]).sum(dim=1)
    return -torch.log(p_true.clamp_min(1e-8)).mean()


@dataclass(frozen=True)
class GateTask:
    """Trains a gate against the frozen experts' outputs on the client's own data."""

    build: Callable[[], Gate]
    epochs: int
    batch_size: int
    optim: OptimSpec

    def fit(self, params: Params, data: GateData, seed: int) -> tuple[Params, dict[str, float]]:
        gate = set_params(self.build(), params)
        metrics = optimize(gate, self.optim, self.epochs, self.batch_size, len(data), seed,
                           lambda idx, _gen: mixture_nll(gate(data.z[idx]), data.probs[idx], data.y[idx]))
        return get_params(gate), metrics


Check = Callable[[Params], EvaluateRes]  # a client's full model -> its metrics on its own test data


class LocalClient(Generic[D]):
    """An in-process federated client: its own data, its own full model state, one task, and (when
    its job is evaluated) how it evaluates that model."""

    def __init__(self, cid: int, task: Task[D], data: D, init: Params, check: Check | None = None) -> None:
        self.cid, self.task, self.data, self.check = cid, task, data, check
        self.state: Params = dict(init)

    def fit(self, ins: FitIns) -> FitRes:
        self.state.update(ins.params)
        self.state, metrics = self.task.fit(self.state, self.data, ins.seed)
        return FitRes({n: self.state[n] for n in ins.upload}, len(self.data), metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        if self.check is None:
            raise RuntimeError(f"client {self.cid}: this job has no evaluation")
        return self.check({**self.state, **ins.params})

    def get_state(self) -> Params:
        return self.state

    def set_state(self, state: Params) -> None:
        self.state = dict(state)
