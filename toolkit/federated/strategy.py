"""Aggregation strategies: which parameters travel, who trains when, and how results merge.

Three hooks, one loop (see engine.run_federated), in the spirit of Flower's Strategy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from toolkit.federated.params import Params, weighted_mean


class Strategy(ABC):
    """How one federated job exchanges and merges parameters."""

    def shares(self, name: str) -> bool:
        """Whether parameter `name` ever leaves a client."""
        return True

    def schedule(self, sampled: list[int]) -> list[list[int]]:
        """Steps of a round: clients in one step train in parallel, steps run one after another."""
        return [sampled]

    @abstractmethod
    def aggregate(self, current: Params, results: list[tuple[Params, int]]) -> Params:
        """New global (shared) parameters from one step's (uploaded params, num_examples)."""


class FedAvg(Strategy):
    """Every parameter is averaged, weighted by the clients' example counts."""

    def aggregate(self, current: Params, results: list[tuple[Params, int]]) -> Params:
        return weighted_mean(results)


class PartialSync(FedAvg):
    """FedAvg over all parameters except those under `private_prefixes`, which never leave a client.

    FedGate is PartialSync(("final.",)): the gate body is averaged, its final layer stays local.
    """

    def __init__(self, private_prefixes: tuple[str, ...]) -> None:
        self.private_prefixes = private_prefixes

    def shares(self, name: str) -> bool:
        return not name.startswith(self.private_prefixes)


class Sequential(Strategy):
    """One model passed from client to client (RollGate): each step is one client; its result is the model."""

    def schedule(self, sampled: list[int]) -> list[list[int]]:
        return [[c] for c in sampled]

    def aggregate(self, current: Params, results: list[tuple[Params, int]]) -> Params:
        (params, _), = results
        return params


class NoSharing(Strategy):
    """Nothing leaves a client (LocalGate)."""

    def shares(self, name: str) -> bool:
        return False

    def aggregate(self, current: Params, results: list[tuple[Params, int]]) -> Params:
        return current
