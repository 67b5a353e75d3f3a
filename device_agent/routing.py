"""Routing over the live part of the fleet, decided before any request is sent.

With every expert live these are exactly `top_k_route` / `random_route` (so an agent matches
`LocalNMoE`). Otherwise an unavailable expert is replaced by the next-best live one by gate logit
(gate routing; the weights are the softmax over the logits of the re-routed set) or by another
random live one (random routing), keeping k experts per input while at least k are live.
`Suspects` takes peers that recently missed a deadline or answered BUSY out of the live set for a
while.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from device_agent.nmoe_local import random_route, shared_fallback, top_k_route


@dataclass(frozen=True)
class Route:
    """Chosen experts and weights per input, and what had to be re-routed."""

    experts: np.ndarray  # [N, k] int64
    weights: np.ndarray  # [N, k] float32, sum to 1 per row
    unavailable: np.ndarray  # [N, k'] int64: experts the routing wanted that were not live, -1 elsewhere

    def rerouted(self, rows: slice = slice(None)) -> dict[int, int]:
        """Expert the routing wanted but that was unavailable -> how many of `rows` were moved."""
        wanted = self.unavailable[rows]
        return dict(sorted(Counter(int(e) for e in wanted[wanted >= 0]).items()))


def gate_route(gate_logits: np.ndarray, k: int, live: Collection[int]) -> Route:
    """Top-k by gate logit among the `live` experts; weights are the softmax over the chosen."""
    ids = np.array(sorted(live), dtype=np.int64)
    if len(ids) == gate_logits.shape[1]:
        experts, weights = top_k_route(gate_logits, k)
        return Route(experts, weights, _unavailable(experts, ids))
    chosen, weights = top_k_route(gate_logits[:, ids], min(k, len(ids)))
    wanted, _ = top_k_route(gate_logits, k)
    return Route(ids[chosen], weights, _unavailable(wanted, ids))


def with_fallback(route: Route, s: np.ndarray, index: int) -> Route:
    """`route` plus the local shared expert `index` with weight s per input, the others' weights times
    (1 - s) (a shared expert in mode "fallback"); it is always live."""
    experts, weights = shared_fallback(route.experts, route.weights, s, index)
    return Route(experts, weights, route.unavailable)


def random_live_route(n: int, num_experts: int, k: int, live: Collection[int],
                      rng: np.random.Generator) -> Route:
    """RanGate (`random_route`), then every unavailable choice replaced by a random live expert
    that the input does not have yet; weights 1/k over the experts kept."""
    experts, weights = random_route(n, num_experts, k, rng)
    ids = np.array(sorted(live), dtype=np.int64)
    if np.isin(experts, ids).all():
        return Route(experts, weights, _unavailable(experts, ids))
    k_live = min(k, len(ids))
    rows = []
    for row in experts:
        kept = [e for e in row if e in ids]
        spare = [e for e in rng.permutation(ids) if e not in kept]
        rows.append((kept + spare)[:k_live])
    return Route(np.array(rows, dtype=np.int64), np.full((n, k_live), 1.0 / k_live, np.float32),
                 _unavailable(experts, ids))


def _unavailable(wanted: np.ndarray, live: np.ndarray) -> np.ndarray:
    """`wanted` with -1 where the expert is live."""
    return np.where(np.isin(wanted, live), -1, wanted).astype(np.int64)


class Suspects:
    """Devices to route around for a while (docs/agent.md, "Suspect peers").

    A peer that let a request time out is avoided for `missed_s`; every further timeout of a
    request sent after that back-off began doubles it, up to `max_s`; any answer from the peer ends
    it. A peer that answered BUSY is avoided for `busy_s` (the protocol's MAY). Requests already
    in flight to a suspect are still waited for: only new inputs are re-routed.
    """

    def __init__(self, missed_s: float, busy_s: float, max_s: float = 30.0) -> None:
        self.missed_s, self.busy_s, self.max_s = missed_s, busy_s, max_s
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # device -> time.monotonic() until which it is avoided
        self._since: dict[str, float] = {}  # device -> when its current timeout back-off began
        self._level: dict[str, int] = {}  # device -> consecutive timeout back-offs

    def missed(self, device: str, sent_at: float) -> None:
        """A request sent to `device` at `sent_at` (time.monotonic()) timed out."""
        now = time.monotonic()
        with self._lock:
            if sent_at < self._since.get(device, float("-inf")):
                return  # sent before the current back-off began: the same incident
            level = self._level[device] = self._level.get(device, 0) + 1
            self._since[device] = now
            backoff = min(self.missed_s * 2 ** (level - 1), self.max_s)
            self._until[device] = max(self._until.get(device, now), now + backoff)

    def busy(self, device: str) -> None:
        """`device` answered BUSY."""
        now = time.monotonic()
        with self._lock:
            self._until[device] = max(self._until.get(device, now), now + self.busy_s)

    def answered(self, device: str) -> None:
        """`device` answered: it is not suspect any more."""
        with self._lock:
            for state in (self._until, self._since, self._level):
                state.pop(device, None)

    def avoided(self) -> set[str]:
        """The devices to route around now."""
        now = time.monotonic()
        with self._lock:
            return {d for d, until in self._until.items() if until > now}
