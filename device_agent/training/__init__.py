"""Torch-free training of the MLP stages on a device: Stage 2 experts and Stage 3 gates in numpy.

Equal to toolkit.training's torch updates within float32 rounding (tests/training/): same
parameter names, losses, optimizers, gradient clipping and loop. `load_trainer` is the seam an
agent calls; it also reaches the torch backend in toolkit when that is installed.
"""

from device_agent.training.backends import (
    BACKENDS,
    ExpertFit,
    GateFit,
    Trainer,
    TrainerUnavailable,
    load_trainer,
)
from device_agent.training.loop import Order, Permute, minibatches, numpy_order, optimize
from device_agent.training.losses import cross_entropy, mixture_nll
from device_agent.training.mlp import EXPERT, GATE, MLP, Dims, Params
from device_agent.training.optim import SGD, Adam, OptimSpec, clip_grad_norm
from device_agent.training.tasks import (
    ExpertTask,
    GateTask,
    LocalUpdate,
    NumpyTrainer,
    expert_data,
    gate_data,
)

__all__ = [
    "BACKENDS",
    "EXPERT",
    "GATE",
    "MLP",
    "SGD",
    "Adam",
    "Dims",
    "ExpertFit",
    "ExpertTask",
    "GateFit",
    "GateTask",
    "LocalUpdate",
    "NumpyTrainer",
    "OptimSpec",
    "Order",
    "Params",
    "Permute",
    "Trainer",
    "TrainerUnavailable",
    "clip_grad_norm",
    "cross_entropy",
    "expert_data",
    "gate_data",
    "load_trainer",
    "minibatches",
    "mixture_nll",
    "numpy_order",
    "optimize",
]
