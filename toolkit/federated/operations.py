"""The NMoE recipe's operations on a device: what the server asks, what comes back.

Any participant implements `Device`: an in-process simulated device (toolkit.simulation) or a proxy
of a device agent reached over MQTT. Every input and output is plain data (numpy parameters, ids,
seeds, float metrics); what a device trains privately (its expert, its gate's private layer) and
what it computes on its own data (latents, expert outputs) never leaves it, so the server side
(toolkit.federated.recipe) holds no private tensor.

| operation | when | input | output |
|---|---|---|---|
| `stage1(m).fit/evaluate` | Stage 1, job `stage1_<m>` | FitIns / EvaluateIns | FitRes / EvaluateRes |
| `use_extractor` | after Stage 1 | ExtractorIns: the shared extractor | Report (latents computed) |
| `train_expert` | Stage 2, job `stage2_<m>` | ExpertIns: seeds | Report (the expert stays on the device) |
| `prepare_gate` | before Stage 3 | GateDataIns: which devices hold the experts | Report |
| `gate(m, g).fit/evaluate` | Stage 3, job `stage3_<m>_<g>` | FitIns / EvaluateIns | FitRes / EvaluateRes |
| `random_gate(m).evaluate` | RanGate (no training) | EvaluateIns (no parameters) | EvaluateRes |

`prepare_gate` is where devices talk to each other: the device sends its own latents (never its
inputs) to every expert's device and gets back that expert's class probabilities (`Peer`): in the
simulation a method call on the other in-process device, on a fleet an expert request over MQTT.
An NMoE evaluation (`gate(...)` or `random_gate(...)`) returns `personalized_accuracy` (own test
split), `global_accuracy` (the public balanced test set) and `routing.<e>` (share of the device's
top-k choices on its own test split that went to expert e).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from toolkit.federated.client import Client, Evaluator, Metrics, Stateful
from toolkit.federated.params import Params


@dataclass(frozen=True)
class ExtractorIns:
    """Stage 1 `stage1` is done: its shared extractor, to compute (and keep) the device's latents."""

    stage1: str
    extractor: Params


@dataclass(frozen=True)
class ExpertIns:
    """Stage 2: train your own expert on your own latents (extractor frozen)."""

    stage1: str
    init_seed: int  # torch.manual_seed before building the expert
    seed: int  # shuffling of its training


@dataclass(frozen=True)
class GateDataIns:
    """Before Stage 3: get every expert's class probabilities on your own latents (train, test, public)."""

    stage1: str
    experts: tuple[int, ...]  # the devices holding the experts, in the order of the gate's outputs


@dataclass(frozen=True)
class Report:
    """What a device reports after an operation that sends nothing back."""

    num_examples: int
    metrics: Metrics


class Device(Protocol):
    """A participant of the whole NMoE recipe."""

    @property
    def cid(self) -> int: ...

    def stage1(self, method: str) -> Client:
        """Its participant in the Stage 1 job of `method` (fedce, fedsc, hybrid)."""
        ...

    def use_extractor(self, ins: ExtractorIns) -> Report:
        """Keep the shared extractor and compute the latents of its own data."""
        ...

    def train_expert(self, ins: ExpertIns) -> Report:
        """Train its own expert on its own latents; the expert never leaves the device."""
        ...

    def prepare_gate(self, ins: GateDataIns) -> Report:
        """Ask every expert's device for its probabilities on this device's latents."""
        ...

    def gate(self, stage1: str, gate: str) -> Client:
        """Its participant in a Stage 3 job (rollgate, fedavggate, fedgate, localgate)."""
        ...

    def random_gate(self, stage1: str) -> Evaluator:
        """RanGate: k experts drawn at random per input (seeded per device), nothing to train."""
        ...


class Peer(Protocol):
    """Device to device: an expert's class probabilities on someone else's latents."""

    def expert_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray:
        """softmax(expert(z)): [N, classes] for latents z [N, latent]."""
        ...


@runtime_checkable
class Simulated(Protocol):
    """Simulation only: a device whose private state lives in this process (checkpointed so that a
    resumed run is exact, and read back by `nmoe export`)."""

    def state(self, job: str) -> Stateful:
        """The private state it holds for `job` (a Stage 1 or 3 client's model, its Stage 2 expert)."""
        ...
