"""Bulk expert queries for federated training: every row of a latent matrix through a peer's expert.

Before Stage 3 each device needs every expert's class probabilities on ALL its own latents (its
gate's training data, and its NMoE's test inputs). `expert_outputs` asks the device holding an
expert at a given model version, in requests of at most the peer's `max_batch` rows (never a
single row: a batch of one takes other kernels in some runtimes, so results would depend on how
the rows were split), with a bounded window of requests in flight; a request that fails (timeout,
BUSY, error) is sent again, up to `retries` times, so the result is complete or an error.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from device_agent.wire.clock import now_ms
from device_agent.wire.fleet_view import FleetView
from device_agent.wire.protocol import ExpertRequest, ExpertResponse, Topics, encode
from device_agent.wire.requester import Call, Requester

_POLL_S = 0.02  # how often the window is checked for settled requests


class ExpertQueryError(RuntimeError):
    """A peer's outputs could not be obtained (no device holds the expert, or it kept failing)."""


@dataclass(frozen=True)
class QueryLimits:
    """How hard to try."""

    wait_s: float = 10.0  # per request
    window: int = 8  # requests in flight
    retries: int = 5  # per chunk
    peer_timeout_s: float = 60.0  # how long to wait for a device holding the expert to appear


def row_chunks(n: int, max_rows: int) -> list[slice]:
    """Contiguous chunks of at most `max_rows` rows (for max_rows >= 3) covering 0..n-1, none of a
    single row when n > 1."""
    count = max(1, min(-(-n // max(1, max_rows)), n // 2))
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def expert_outputs(requester: Requester[np.ndarray], fleet: FleetView, topics: Topics, inbox: str, expert: int,
                   version: str, z: np.ndarray, limits: QueryLimits = QueryLimits()) -> np.ndarray:
    """softmax(expert(z)) [N, C] as computed by the device holding `expert` at `version`."""
    end = time.monotonic() + limits.peer_timeout_s
    while (peer := fleet.holder(expert)) is None:  # a training version is not in presence: any holder
        if time.monotonic() > end:
            raise ExpertQueryError(f"no device online holds expert {expert}")
        time.sleep(0.1)
    todo = list(row_chunks(len(z), peer.caps.max_batch))
    attempts = {(c.start, c.stop): 0 for c in todo}
    results: dict[int, np.ndarray] = {}
    in_flight: list[Call[np.ndarray]] = []
    while todo or in_flight:
        while todo and len(in_flight) < limits.window:
            rows = todo.pop(0)
            frame = partial(_frame, expert=expert, version=version, inbox=inbox, latent=z[rows],
                            wait_s=limits.wait_s)
            in_flight.append(requester.send(topics.expert_request(expert), peer.device, expert, frame,
                                            limits.wait_s, np.arange(rows.start, rows.stop)))
        requester.wait(in_flight, time.monotonic() + _POLL_S)
        requester.give_up([c for c in in_flight if c.fate is None and time.monotonic() > c.until])
        for call in [c for c in in_flight if c.fate is not None]:
            in_flight.remove(call)
            start, stop = int(call.context[0]), int(call.context[-1]) + 1
            reply = call.reply
            if isinstance(reply, ExpertResponse) and len(reply.probs) == stop - start:
                results[start] = reply.probs
                continue
            attempts[(start, stop)] += 1
            if attempts[(start, stop)] > limits.retries:
                raise ExpertQueryError(f"expert {expert} on {peer.device}: rows {start}..{stop - 1} failed "
                                       f"{attempts[(start, stop)]} times ({call.detail or call.fate})")
            time.sleep(min(1.0, 0.05 * 2 ** attempts[(start, stop)]))
            todo.append(slice(start, stop))
    return np.concatenate([results[k] for k in sorted(results)])


def _frame(cid: bytes, expert: int, version: str, inbox: str, latent: np.ndarray, wait_s: float) -> bytes:
    return encode(ExpertRequest(cid, expert, now_ms() + int(wait_s * 1000), version, inbox, latent, "fp32"))
