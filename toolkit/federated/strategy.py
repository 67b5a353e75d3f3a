"""Aggregation strategies: which parameters travel, who trains when, and how results merge.

Three hooks, one loop (see engine.run_federated), in the spirit of Flower's Strategy: `schedule` is
its configure_fit (the instructions themselves are the same for every client here), `aggregate_fit`
gets the results that arrived and is told which clients failed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from toolkit.federated.client import FitRes
from toolkit.federated.ledger import Failure
from toolkit.federated.params import Params, weighted_mean

Results = list[tuple[int, FitRes]]  # (client id, its accepted result), in the order the step asked them


class Strategy(ABC):
    """How one federated job exchanges and merges parameters."""

    def shares(self, name: str) -> bool:
        """Whether parameter `name` ever leaves a client."""
        return True

    def schedule(self, sampled: list[int]) -> list[list[int]]:
        """Steps of a round: clients in one step are asked concurrently, steps run one after another."""
        return [sampled]

    @abstractmethod
    def aggregate_fit(self, current: Params, results: Results, failures: list[Failure]) -> Params:
        """New shared parameters from one step's accepted results (possibly none); `failures` are
        the step's clients that delivered nothing usable."""


class FedAvg(Strategy):
    """Every parameter is averaged, weighted by the clients' example counts; no result: unchanged."""

    def aggregate_fit(self, current: Params, results: Results, failures: list[Failure]) -> Params:
        if not results:
            return current
        return weighted_mean([(res.params, res.num_examples) for _, res in results])


class PartialSync(FedAvg):
    """FedAvg over all parameters except those under `private_prefixes`, which never leave a client.

    FedGate is PartialSync(("final.",)): the gate body is averaged, its final layer stays local.
    """

    def __init__(self, private_prefixes: tuple[str, ...]) -> None:
        self.private_prefixes = private_prefixes

    def shares(self, name: str) -> bool:
        return not name.startswith(self.private_prefixes)


class Sequential(Strategy):
    """One model passed from client to client (RollGate): each step is one client; its result is the
    model. A client that fails passes the model on unchanged."""

    def schedule(self, sampled: list[int]) -> list[list[int]]:
        return [[c] for c in sampled]

    def aggregate_fit(self, current: Params, results: Results, failures: list[Failure]) -> Params:
        return results[-1][1].params if results else current


class NoSharing(Strategy):
    """Nothing leaves a client (LocalGate)."""

    def shares(self, name: str) -> bool:
        return False

    def aggregate_fit(self, current: Params, results: Results, failures: list[Failure]) -> Params:
        return current
