"""Optimizers with torch.optim's semantics (single-tensor CPU path) and gradient-norm clipping.

SGD: momentum (dampening 0, no Nesterov) and weight decay added to the gradient, as torch.optim.SGD.
Adam: betas (0.9, 0.999), eps 1e-8, weight decay as L2 added to the gradient, bias correction,
no AMSGrad, as torch.optim.Adam's defaults. Arithmetic is float32 like torch's on float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from device_agent.training.mlp import Params

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6)


class Optimizer(Protocol):
    """Updates parameters in place from their gradients, one step at a time."""

    def step(self, params: Params, grads: Params) -> None: ...


@dataclass(frozen=True)
class OptimSpec:
    """Optimizer settings of a local update (the fields of toolkit.training.OptimSpec)."""

    kind: Literal["sgd", "adam"]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max gradient L2 norm over all parameters per step

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam"):
            raise ValueError(f"optimizer kind must be 'sgd' or 'adam', got {self.kind!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"optimizer {name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"optimizer grad_clip must be a finite number > 0, got {self.grad_clip!r}")

    def make(self) -> Optimizer:
        """A fresh optimizer (local updates start fresh every round, as in FedAvg)."""
        if self.kind == "sgd":
            return SGD(self.lr, self.momentum, self.weight_decay)
        return Adam(self.lr, self.weight_decay)


class SGD:
    """torch.optim.SGD(lr, momentum, weight_decay), dampening 0, nesterov False."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = np.float32(lr), np.float32(momentum), np.float32(weight_decay)
        self.buffers: Params = {}

    def step(self, params: Params, grads: Params) -> None:
        for name, param in params.items():
            grad = grads[name]
            if self.weight_decay:
                grad = grad + self.weight_decay * param
            if self.momentum:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = grad.copy()
                else:
                    buf *= self.momentum
                    buf += grad
                grad = buf
            param -= self.lr * grad


class Adam:
    """torch.optim.Adam(lr, weight_decay) with betas (0.9, 0.999), eps 1e-8, amsgrad False."""

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr, self.weight_decay = lr, np.float32(weight_decay)
        self.steps = 0
        self.exp_avg: Params = {}
        self.exp_avg_sq: Params = {}

    def step(self, params: Params, grads: Params) -> None:
        self.steps += 1
        bias_correction1 = 1 - self.beta1 ** self.steps
        bias_correction2_sqrt = math.sqrt(1 - self.beta2 ** self.steps)
        step_size = np.float32(-self.lr / bias_correction1)
        for name, param in params.items():
            grad = grads[name]
            if self.weight_decay:
                grad = grad + self.weight_decay * param
            m = self.exp_avg.setdefault(name, np.zeros_like(param))
            v = self.exp_avg_sq.setdefault(name, np.zeros_like(param))
            m += np.float32(1 - self.beta1) * (grad - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= np.float32(self.beta2)
            v += np.float32(1 - self.beta2) * grad * grad
            denom = np.sqrt(v)
            denom /= np.float32(bias_correction2_sqrt)
            denom += np.float32(self.eps)
            param += step_size * (m / denom)


def clip_grad_norm(grads: Params, max_norm: float) -> float:
    """Scale all gradients in place so their total L2 norm is at most max_norm; the norm before.

    As torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), clamped to 1.
    """
    norms = np.array([np.sqrt(np.vdot(g, g)) for g in grads.values()], dtype=np.float32)
    total = np.sqrt(np.vdot(norms, norms))
    coef = np.float32(max_norm) / (total + np.float32(CLIP_EPS))
    if not coef >= 1:  # a factor of 1 changes nothing; a NaN norm poisons every gradient, as in torch
        for g in grads.values():
            g *= coef
    return float(total)
