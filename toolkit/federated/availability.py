"""Who can be asked: the availability seam (Flower's ClientManager) and seeded sampling from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Availability(Protocol):
    """The clients that can be asked now: all of them in the simulation; on a fleet, those whose
    presence is online."""

    def available(self, at_least: int) -> list[int]:
        """Ids of the clients available now, ascending; may wait (bounded) until `at_least` are."""
        ...


class AllAvailable:
    """Every client, always (the in-process simulation)."""

    def __init__(self, cids: Sequence[int]) -> None:
        self.cids = sorted(cids)

    def available(self, at_least: int) -> list[int]:
        return list(self.cids)


def sample_clients(available: Sequence[int], size: int, seed: int) -> list[int]:
    """A seeded random subset of `size` of the available ids, in random order."""
    order = np.random.default_rng(seed).permutation(len(available))[:size]
    return [int(available[i]) for i in order]
