"""Two-layer MLPs on latents (Linear -> ReLU -> Linear) in numpy, forward and backward by hand.

Parameters are float32 arrays under torch's state-dict names, so one dict moves unchanged between
a device and the server's torch modules: the expert (`net.0.*`, `net.2.*`, toolkit.models.Expert)
and the gate (`body.0.*`, `final.*`, toolkit.models.Gate). A Linear layer computes
y = x @ weight.T + bias with weight [out, in], as torch.nn.Linear does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]  # parameter name -> float32 array, as they travel


@dataclass(frozen=True)
class Dims:
    """Sizes of a two-layer MLP: inputs -> hidden -> outputs."""

    inputs: int
    hidden: int
    outputs: int


@dataclass(frozen=True)
class Activations:
    """What the backward pass needs from the forward pass."""

    x: np.ndarray  # [B, inputs]
    hidden: np.ndarray  # [B, hidden], after the ReLU


@dataclass(frozen=True)
class MLP:
    """Linear(`first`) -> ReLU -> Linear(`second`); `first`/`second` are the layers' name prefixes."""

    first: str
    second: str

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in torch's order (the order of `module.parameters()`)."""
        return tuple(f"{layer}.{kind}" for layer in (self.first, self.second) for kind in ("weight", "bias"))

    def dims(self, params: Params) -> Dims:
        """The sizes `params` describe; ValueError naming the problem unless they form this MLP."""
        if set(params) != set(self.names):
            missing, extra = sorted(set(self.names) - set(params)), sorted(set(params) - set(self.names))
            raise ValueError(f"expected parameters {list(self.names)}; missing {missing}, unexpected {extra}")
        w0, b0, w2, b2 = (np.asarray(params[n]) for n in self.names)
        for name, arr in zip(self.names, (w0, b0, w2, b2)):
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"parameter {name} must be floating point, got {arr.dtype}")
        if w0.ndim != 2 or w2.ndim != 2 or b0.shape != (w0.shape[0],) or w2.shape[1] != w0.shape[0] \
                or b2.shape != (w2.shape[0],):
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in zip(self.names, (w0, b0, w2, b2)))
            raise ValueError(f"parameter shapes do not form Linear -> ReLU -> Linear: {shapes}")
        return Dims(inputs=w0.shape[1], hidden=w0.shape[0], outputs=w2.shape[0])

    def init(self, dims: Dims, rng: np.random.Generator) -> Params:
        """Fresh parameters from torch.nn.Linear's default distribution, U(+-1/sqrt(fan_in))."""
        shapes = {self.first: (dims.hidden, dims.inputs), self.second: (dims.outputs, dims.hidden)}
        params: Params = {}
        for layer, (out, fan_in) in shapes.items():
            bound = 1.0 / math.sqrt(fan_in)
            params[f"{layer}.weight"] = rng.uniform(-bound, bound, (out, fan_in)).astype(np.float32)
            params[f"{layer}.bias"] = rng.uniform(-bound, bound, out).astype(np.float32)
        return params

    def forward(self, params: Params, x: np.ndarray) -> tuple[np.ndarray, Activations]:
        """Outputs [B, outputs] for inputs x [B, inputs], and the activations for `backward`."""
        hidden = x @ params[f"{self.first}.weight"].T
        hidden += params[f"{self.first}.bias"]
        np.maximum(hidden, 0, out=hidden)
        out = hidden @ params[f"{self.second}.weight"].T
        out += params[f"{self.second}.bias"]
        return out, Activations(x, hidden)

    def backward(self, params: Params, acts: Activations, d_out: np.ndarray) -> Params:
        """Gradients of every parameter from the loss gradient d_out [B, outputs] w.r.t. the outputs."""
        d_hidden = d_out @ params[f"{self.second}.weight"]
        d_hidden[acts.hidden <= 0] = 0  # ReLU passes the gradient where its output is positive
        return {
            f"{self.first}.weight": d_hidden.T @ acts.x,
            f"{self.first}.bias": d_hidden.sum(axis=0),
            f"{self.second}.weight": d_out.T @ acts.hidden,
            f"{self.second}.bias": d_out.sum(axis=0),
        }


EXPERT = MLP("net.0", "net.2")  # toolkit.models.Expert: latent -> class logits
GATE = MLP("body.0", "final")  # toolkit.models.Gate: latent -> one logit per expert
