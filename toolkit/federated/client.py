"""The client side of a federated job, as any transport sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from toolkit.federated.params import Params


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
    metrics: dict[str, float] = field(default_factory=dict)


class Client(Protocol):
    """A participant. In-process clients and MQTT-backed proxies both implement this."""

    cid: int

    def fit(self, ins: FitIns) -> FitRes:
        """Merge ins.params into the local model, train locally, return the requested names."""
        ...

    def model(self, shared: Params) -> Params:
        """The client's full model when combined with the latest shared parameters."""
        ...

    def get_state(self) -> Params:
        """Private state to checkpoint (a real device persists it itself)."""
        ...

    def set_state(self, state: Params) -> None:
        """Restore private state from a checkpoint."""
        ...
