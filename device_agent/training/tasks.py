"""The MLP stages' client updates on a device, mirroring toolkit.training's tasks without torch.

`ExpertTask` is Stage 2 (toolkit.training.SupervisedTask on latents), `GateTask` is Stage 3
(toolkit.training.GateTask). A task turns (parameters, local data, seed) into (new parameters,
metrics); the caller's parameters are not modified. `TRAINER` is this module's trainer backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.training.backends import Trainer
from device_agent.training.loop import Order, numpy_order, optimize
from device_agent.training.losses import cross_entropy, mixture_nll
from device_agent.training.mlp import EXPERT, GATE, MLP, Dims, Params
from device_agent.training.optim import OptimSpec


def _latents(latents: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(latents)
    if x.ndim != 2 or x.shape[1] != dim or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"latents must be floating point [N, {dim}], got {x.dtype} {list(x.shape)}")
    return x.astype(np.float32, copy=False)


def _labels(labels: np.ndarray, n: int, classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers [{n}] (one per latent), got {y.dtype} {list(y.shape)}")
    if n and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in 0..{classes - 1}, got {y.min()}..{y.max()}")
    return y.astype(np.int64, copy=False)


def expert_data(params: Params, latents: np.ndarray, labels: np.ndarray) -> tuple[Dims, np.ndarray, np.ndarray]:
    """Checked expert parameters and data: (sizes, float32 latents, int64 labels); ValueError if not."""
    dims = EXPERT.dims(params)
    x = _latents(latents, dims.inputs)
    return dims, x, _labels(labels, len(x), dims.outputs)


def gate_data(params: Params, latents: np.ndarray, probs: np.ndarray,
              labels: np.ndarray) -> tuple[Dims, np.ndarray, np.ndarray, np.ndarray]:
    """Checked gate parameters and data: (sizes, latents, float32 probs [N, E, C], labels)."""
    dims = GATE.dims(params)
    x = _latents(latents, dims.inputs)
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[:2] != (len(x), dims.outputs) or not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"expert probabilities must be floating point [{len(x)}, {dims.outputs}, classes], "
                         f"got {p.dtype} {list(p.shape)}")
    return dims, x, p.astype(np.float32, copy=False), _labels(labels, len(x), p.shape[2])


def _own_copy(model: MLP, params: Params) -> Params:
    """float32 copies in torch's parameter order (the order gradient norms are summed in)."""
    return {name: np.array(params[name], dtype=np.float32) for name in model.names}


@dataclass(frozen=True)
class LocalUpdate:
    """The schedule of a local update: epochs of minibatches, an optimizer, the batch order."""

    epochs: int
    batch_size: int
    optim: OptimSpec
    order: Order = numpy_order

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {self.epochs} and {self.batch_size}")


@dataclass(frozen=True)
class ExpertTask(LocalUpdate):
    """Stage 2: mean cross-entropy training of an expert on the device's latents."""

    def fit(self, params: Params, latents: np.ndarray, labels: np.ndarray,
            seed: int) -> tuple[Params, dict[str, float]]:
        _, x, y = expert_data(params, latents, labels)
        own = _own_copy(EXPERT, params)

        def batch_loss(p: Params, idx: np.ndarray) -> tuple[float, Params]:
            logits, acts = EXPERT.forward(p, x[idx])
            loss, d_logits = cross_entropy(logits, y[idx])
            return loss, EXPERT.backward(p, acts, d_logits)

        return own, optimize(own, self.optim, self.epochs, self.batch_size, len(y), seed, batch_loss, self.order)


@dataclass(frozen=True)
class GateTask(LocalUpdate):
    """Stage 3: a gate trained with mixture_nll against the frozen experts' class probabilities."""

    def fit(self, params: Params, latents: np.ndarray, probs: np.ndarray, labels: np.ndarray,
            seed: int) -> tuple[Params, dict[str, float]]:
        _, x, p_experts, y = gate_data(params, latents, probs, labels)
        own = _own_copy(GATE, params)

        def batch_loss(p: Params, idx: np.ndarray) -> tuple[float, Params]:
            logits, acts = GATE.forward(p, x[idx])
            loss, d_logits = mixture_nll(logits, p_experts[idx], y[idx])
            return loss, GATE.backward(p, acts, d_logits)

        return own, optimize(own, self.optim, self.epochs, self.batch_size, len(y), seed, batch_loss, self.order)


class NumpyTrainer:
    """The torch-free trainer backend ("numpy"): runs with only the [agent] extra."""

    def expert_task(self, epochs: int, batch_size: int, optim: OptimSpec) -> ExpertTask:
        return ExpertTask(epochs, batch_size, optim)

    def gate_task(self, epochs: int, batch_size: int, optim: OptimSpec) -> GateTask:
        return GateTask(epochs, batch_size, optim)


TRAINER: Trainer = NumpyTrainer()
