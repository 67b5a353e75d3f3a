"""A device's side of the NMoE recipe (toolkit.federated.operations), in plain data.

The coordinator asks a device agent for one operation per COMMAND (docs/federated.md); the agent's
`TrainingService` calls a `DeviceOps`, which holds the device's data and private models. Two
implementations, found by module name like the trainer backends (device_agent never imports
toolkit):

- "torch": `toolkit.device_ops`, the simulation's own `SimDevice` for this one device, so a fleet of
  torch devices computes exactly what `nmoe train` computes in-process;
- "numpy": `device_agent.training.numpy_ops`, torch-free for Stages 2 and 3 (the MLPs in numpy,
  latents through ONNX Runtime); Stage 1 (convolutions) goes to the torch implementation when it
  is installed, else it is refused.

Private state (`state_keys`/`get_state`/`set_state`) is what the service persists after every
operation, so a restarted agent resumes with its expert, its gates and its gate data.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from device_agent.device_data import DeviceData

Params = dict[str, np.ndarray]
Metrics = dict[str, float]
PeerOutputs = Callable[[int, np.ndarray], np.ndarray]  # (expert, latents [N, D]) -> that expert's probs [N, C]


class OperationRefused(RuntimeError):
    """This device cannot do the operation (e.g. Stage 1 without torch); the RESULT says why."""


@dataclass(frozen=True)
class FinalModels:
    """What a model version commit rebuilds: the shared extractor and the device's gate and expert."""

    extractor: Params  # names without the "extractor." prefix
    gate: Params | None  # None for RanGate
    expert: Params


class DeviceOps(Protocol):
    """One device's operations; see toolkit.federated.operations for what each means."""

    cid: int

    def fit(self, job: str, rnd: int, params: Params, upload: tuple[str, ...], seed: int) -> tuple[Params, int, Metrics]:
        """Stage 1 or 3 round of `job`: merge `params`, train, return exactly `upload`, examples, metrics."""
        ...

    def evaluate(self, job: str, rnd: int, params: Params, seed: int = 0) -> tuple[int, Metrics]:
        """The device's model of `job` with the shared `params`, on its own test data (`seed`: RanGate's
        routing, for a backend that cannot derive the simulation's)."""
        ...

    def use_extractor(self, stage1: str, extractor: Params) -> tuple[int, Metrics]:
        """Keep Stage 1's extractor (names with the "extractor." prefix) and compute the latents."""
        ...

    def train_expert(self, stage1: str, init_seed: int, seed: int, init: Params | None = None) -> tuple[int, Metrics]:
        """Stage 2: train the own expert on the own latents (from `init` when given, else drawn with init_seed)."""
        ...

    def expert_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray:
        """softmax(own expert(z)), for a peer's gate data."""
        ...

    def prepare_gate(self, stage1: str, experts: tuple[int, ...], peers: PeerOutputs,
                     init: Params | None = None) -> tuple[int, Metrics]:
        """Every expert's probabilities on the own latents (the own expert's computed here); `init`: the
        gates' initial parameters, for a backend that cannot draw the simulation's."""
        ...

    def final_models(self, stage1: str, gate_job: str | None, shared: Params) -> FinalModels:
        """The models a commit rebuilds (the gate: the job's state merged with the final `shared`)."""
        ...

    def state_keys(self) -> list[str]:
        """Keys of the private state held now."""
        ...

    def get_state(self, key: str) -> Params:
        ...

    def set_state(self, key: str, state: Params) -> None:
        ...


OPS_MODULES = {"torch": "toolkit.device_ops", "numpy": "device_agent.training.numpy_ops"}
DRAWS_TORCH_INIT = {"torch"}  # backends that draw the simulation's initial parameters themselves; to the others
INIT = "init."  # the coordinator sends them as tensors init.<name> (TRAIN_EXPERT: the expert, PREPARE_GATE: the gate)
OPS_EXTRAS = {"torch": "train", "numpy": "agent"}
Factory = Callable[[int, dict[str, Any], DeviceData, Path], DeviceOps]


def trainer_backend(choice: str) -> str:
    """`auto` -> "torch" when the torch operations can be imported here, else "numpy"; others unchanged."""
    if choice != "auto":
        load_device_ops(choice)  # OperationRefused now, not at the first COMMAND, when it is not installed
        return choice
    try:
        load_device_ops("torch")
    except OperationRefused:
        return "numpy"
    return "torch"


def load_device_ops(backend: str) -> Factory:
    """`make(cid, run_config, data, workdir) -> DeviceOps` of `backend`; ValueError or OperationRefused
    (naming the extra to install) when it is unknown or not installed."""
    if backend not in OPS_MODULES:
        raise ValueError(f"unknown trainer backend {backend!r}; known: {', '.join(sorted(OPS_MODULES))}")
    try:
        module = importlib.import_module(OPS_MODULES[backend])
    except ModuleNotFoundError as e:
        if e.name and e.name.partition(".")[0] in ("torch", "toolkit", "onnx"):
            raise OperationRefused(f"trainer backend {backend!r} is not installed here: no module named "
                                   f"{e.name!r} (install nmoe-edge[{OPS_EXTRAS[backend]}])") from e
        raise
    return cast(Factory, module.make)
