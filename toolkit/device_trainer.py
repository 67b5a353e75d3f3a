"""The "torch" backend of the device trainer seam (device_agent.training.backends).

It runs the simulation's own client updates, toolkit.training.SupervisedTask (an expert on
latents) and toolkit.training.GateTask, behind the seam's numpy interface, so a device with the
[train] extra computes exactly what the in-process simulation computes. device_agent finds this
module by its name and never imports toolkit.

A fit runs on one torch thread (restored after): for matrices this small more threads only contend
with each other and with the agent (20x slower per epoch on a loaded 2-core machine,
bench/trainer.py); the updates of these models came out identical at 1 and 2 threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from device_agent.training import OptimSpec, Params, Trainer, expert_data, gate_data
from toolkit import training
from toolkit.models import Expert, Gate


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _optim(spec: OptimSpec) -> training.OptimSpec:
    return training.OptimSpec(spec.kind, spec.lr, spec.momentum, spec.weight_decay, spec.grad_clip)


@dataclass(frozen=True)
class TorchExpertTask:
    """Stage 2 through toolkit.training.SupervisedTask."""

    epochs: int
    batch_size: int
    optim: OptimSpec

    def fit(self, params: Params, latents: np.ndarray, labels: np.ndarray,
            seed: int) -> tuple[Params, dict[str, float]]:
        d, x, y = expert_data(params, latents, labels)
        task = training.SupervisedTask(lambda: Expert(d.inputs, d.hidden, d.outputs), self.epochs,
                                       self.batch_size, _optim(self.optim))
        with _one_thread():
            return task.fit(params, training.TensorData(torch.tensor(x), torch.tensor(y)), seed)


@dataclass(frozen=True)
class TorchGateTask:
    """Stage 3 through toolkit.training.GateTask."""

    epochs: int
    batch_size: int
    optim: OptimSpec

    def fit(self, params: Params, latents: np.ndarray, probs: np.ndarray, labels: np.ndarray,
            seed: int) -> tuple[Params, dict[str, float]]:
        d, x, p, y = gate_data(params, latents, probs, labels)
        task = training.GateTask(lambda: Gate(d.inputs, d.hidden, d.outputs), self.epochs, self.batch_size,
                                 _optim(self.optim))
        with _one_thread():
            return task.fit(params, training.GateData(torch.tensor(x), torch.tensor(p), torch.tensor(y)), seed)


class TorchTrainer:
    """The seam's "torch" backend."""

    def expert_task(self, epochs: int, batch_size: int, optim: OptimSpec) -> TorchExpertTask:
        return TorchExpertTask(epochs, batch_size, optim)

    def gate_task(self, epochs: int, batch_size: int, optim: OptimSpec) -> TorchGateTask:
        return TorchGateTask(epochs, batch_size, optim)


TRAINER: Trainer = TorchTrainer()
