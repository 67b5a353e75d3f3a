"""The client side of a federated job, as any transport sees it.

`Client` is what every participant offers (an in-process client, an MQTT proxy of a device agent,
a Ray actor): train on the shared parameters, evaluate its own model. `Sender` is what a client
whose calls are messages may add: send a call now, wait for its answer later (the fleet asks a
thousand devices without a thread each). `Stateful` is what only the simulation offers: private
state held in this process, checkpointed so that a resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from toolkit.federated.executor import Pending
from toolkit.federated.params import Params

Metrics = dict[str, float]


@dataclass(frozen=True)
class FitIns:
    """What the server sends: the shared parameters and which names to send back."""

    round: int
    params: Params
    upload: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class FitRes:
    """What a client sends back: only the names it was asked for, plus its example count."""

    params: Params
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateIns:
    """The latest shared parameters (of `round`); the client merges them into its own model."""

    round: int
    params: Params


@dataclass(frozen=True)
class EvaluateRes:
    """The client's metrics on its own test data (e.g. personalized_accuracy, global_accuracy)."""

    num_examples: int
    metrics: Metrics


class Evaluator(Protocol):
    """A participant that can evaluate its own model."""

    @property
    def cid(self) -> int: ...

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Merge ins.params into the local model and evaluate it on the client's own test data."""
        ...


class Client(Evaluator, Protocol):
    """A participant of a federated job."""

    def fit(self, ins: FitIns) -> FitRes:
        """Merge ins.params into the local model, train locally, return exactly the names in ins.upload."""
        ...


class Sender(Protocol):
    """A client whose calls are messages (a device's proxy): `send_*` sends the call and returns at once."""

    def send_fit(self, ins: FitIns) -> Pending[FitRes]: ...

    def send_evaluate(self, ins: EvaluateIns) -> Pending[EvaluateRes]: ...


@runtime_checkable
class Stateful(Protocol):
    """Simulation only: private state held in this process (a real device persists its own)."""

    def get_state(self) -> Params:
        """The private state to checkpoint."""
        ...

    def set_state(self, state: Params) -> None:
        """Restore the private state from a checkpoint."""
        ...
