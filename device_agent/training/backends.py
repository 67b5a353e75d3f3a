"""The trainer seam: what an agent calls to train its MLP stages, and the backends behind it.

A backend is a module, found BY NAME (as toolkit.cli.PLUGINS finds subcommands), that exposes
`TRAINER`, an object with the `Trainer` methods. "numpy" is torch-free (device_agent.training);
"torch" lives in toolkit (toolkit.device_trainer: the simulation's own client updates) and is
there only where the [train] extra is installed. device_agent never imports toolkit: the name
of its module is all it knows.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from device_agent.training.mlp import Params
from device_agent.training.optim import OptimSpec


class ExpertFit(Protocol):
    """Stage 2 update: (expert parameters, latents [N, D], labels [N], seed) -> (parameters, metrics)."""

    def fit(self, params: Params, latents: np.ndarray, labels: np.ndarray,
            seed: int) -> tuple[Params, dict[str, float]]: ...


class GateFit(Protocol):
    """Stage 3 update: (gate parameters, latents, expert probabilities [N, E, C], labels, seed)."""

    def fit(self, params: Params, latents: np.ndarray, probs: np.ndarray, labels: np.ndarray,
            seed: int) -> tuple[Params, dict[str, float]]: ...


class Trainer(Protocol):
    """Makes the client updates of the MLP stages for one schedule and optimizer."""

    def expert_task(self, epochs: int, batch_size: int, optim: OptimSpec) -> ExpertFit: ...

    def gate_task(self, epochs: int, batch_size: int, optim: OptimSpec) -> GateFit: ...


@dataclass(frozen=True)
class Backend:
    """Where a trainer backend lives and what it needs installed."""

    module: str
    needs: tuple[str, ...]  # top-level packages; missing one means "not installed here"
    extra: str  # the nmoe-edge extra that installs them


BACKENDS: dict[str, Backend] = {
    "numpy": Backend("device_agent.training.tasks", ("numpy",), "agent"),
    "torch": Backend("toolkit.device_trainer", ("toolkit", "torch"), "train"),
}


class TrainerUnavailable(RuntimeError):
    """A known trainer backend whose packages are not installed here."""


def load_trainer(name: str) -> Trainer:
    """The trainer of backend `name`; ValueError if unknown, TrainerUnavailable if not installed."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown trainer backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    try:
        module = importlib.import_module(backend.module)
    except ModuleNotFoundError as e:
        if e.name and e.name.partition(".")[0] in backend.needs:
            raise TrainerUnavailable(
                f"trainer backend {name!r} is not installed here: no module named {e.name!r} "
                f"(install nmoe-edge[{backend.extra}])") from e
        raise
    return cast(Trainer, module.TRAINER)
