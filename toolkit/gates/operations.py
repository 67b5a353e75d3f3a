"""The device operations the gate methods of toolkit.gates add to the NMoE recipe's (toolkit.federated.operations).

Like the recipe's, every input and output is plain data (numpy parameters, seeds, ids, fractions), so
a proxy of a device agent can implement them over MQTT; what a device trains on its own data (its
experts, its gate's final layer, its OOD score) never leaves it.

| operation | for | input | output |
|---|---|---|---|
| `shared_head(m)` | fedsc's shared expert (fedce/hybrid have Stage 1's head) | FitIns / EvaluateIns | FitRes |
| `prepare_ood` | fedgate_ood | OODIns: the shared expert, threshold settings | Report |
| `class_stats` | *_vl | StatsIns | StatsReport: counts, means, covariances |
| `virtual_answers` | *_vl | VirtualIns: the pooled statistics | its expert's true-class probabilities |
| `prepare_virtual_gate` | *_vl | VirtualGateIns: pool, every expert's answers, shared expert | Report |
| `train_heldout_expert` | fedgate_heldout | HeldoutIns: seeds, fraction | Report |
| `prepare_heldout_gate` | fedgate_heldout | HeldoutGateIns | Report |
| `switch_gate(m).evaluate` | fedgate_switch (after `prepare_ood`) | EvaluateIns: fedgate's and fedgate_vl's shared bodies | EvaluateRes |

Peer to peer, `heldout_outputs` is `expert_outputs` of the expert trained on the kept part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from toolkit.federated import Client, Evaluator, Params
from toolkit.federated.operations import Device, Report


@dataclass(frozen=True)
class OODIns:
    """fedgate_ood: the shared expert, and how the device sets its switch on its own data."""

    stage1: str
    gate: str
    head: Params  # the shared expert (an Expert's parameters)
    heldout_fraction: float  # of the device's data, held out to set the threshold
    quantile: float
    temperature: float
    seed: int


@dataclass(frozen=True)
class StatsIns:
    """*_vl: upload your per-class latent statistics."""

    stage1: str
    diagonal: bool  # covariance diagonals only


@dataclass(frozen=True)
class StatsReport:
    """A device's class statistics (toolkit.gates.stats.to_params)."""

    num_examples: int
    stats: Params


@dataclass(frozen=True)
class VirtualIns:
    """*_vl: the pooled class statistics and how to draw the common virtual latents from them."""

    stage1: str
    pooled: Params  # to_params of the pool
    per_class: int
    seed: int


@dataclass(frozen=True)
class VirtualGateIns:
    """*_vl: every expert's true-class probability on the virtual latents, and the shared expert."""

    virtual: VirtualIns
    gate: str
    answers: np.ndarray  # [virtual latents, experts]
    head: Params  # the CCVR-calibrated shared expert


@dataclass(frozen=True)
class HeldoutIns:
    """fedgate_heldout: train an expert on all but `fraction` of your data (the gate trains on the rest)."""

    stage1: str
    fraction: float
    split_seed: int
    init_seed: int
    seed: int


@dataclass(frozen=True)
class HeldoutGateIns:
    """fedgate_heldout: the gate's data is the held-out part; ask every peer's held-out expert on it."""

    stage1: str
    fraction: float
    split_seed: int  # the same split as train_heldout_expert's
    experts: tuple[int, ...]


class GateDevice(Device, Protocol):
    """A device that runs the gate methods of toolkit.gates too."""

    def shared_head(self, stage1: str) -> Client: ...

    def prepare_ood(self, ins: OODIns) -> Report: ...

    def class_stats(self, ins: StatsIns) -> StatsReport: ...

    def virtual_answers(self, ins: VirtualIns) -> np.ndarray: ...

    def prepare_virtual_gate(self, ins: VirtualGateIns) -> Report: ...

    def train_heldout_expert(self, ins: HeldoutIns) -> Report: ...

    def prepare_heldout_gate(self, ins: HeldoutGateIns) -> Report: ...

    def switch_gate(self, stage1: str) -> Evaluator: ...


class HeldoutPeer(Protocol):
    """Device to device: the held-out variant's expert outputs on someone else's latents."""

    def heldout_outputs(self, stage1: str, z: np.ndarray) -> np.ndarray: ...
