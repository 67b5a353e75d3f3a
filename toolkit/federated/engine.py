"""One federated loop for every stage and strategy; checkpointed after every round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from toolkit.checkpoint import JobState, JobStore, pack, unpack
from toolkit.errors import DivergedError
from toolkit.federated.client import Client, FitIns
from toolkit.federated.ledger import Ledger
from toolkit.federated.params import Params
from toolkit.federated.strategy import Strategy
from toolkit.progress import progress_bar
from toolkit.seeding import derive_seed

Evaluate = Callable[[dict[int, Params]], dict[str, float]]


@dataclass
class FederatedResult:
    """Outcome of a federated job."""

    shared: Params
    client_models: dict[int, Params]  # each client's full model (shared merged with its private part)
    ledger: Ledger
    curve: list[dict[str, float]]


class ProtocolViolation(RuntimeError):
    """A client uploaded something it was not asked for (or omitted something it was)."""


def check_upload(job: str, rnd: int, cid: int, params: Params, expected: tuple[str, ...]) -> None:
    """Refuse an upload with unexpected names or non-finite values before it is aggregated."""
    if set(params) != set(expected):
        raise ProtocolViolation(f"{job}: client {cid} uploaded {sorted(params)}, expected {list(expected)}")
    bad = [name for name, value in params.items() if not np.isfinite(value).all()]
    if bad:
        raise DivergedError(f"{job}: client {cid}'s update in round {rnd} is not finite ({bad[0]}); "
                            "training diverged: lower the learning rate of this stage")


def sample_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """A seeded random subset (in random order) of max(1, round(fraction * n)) clients."""
    m = max(1, round(fraction * num_clients))
    return [int(c) for c in np.random.default_rng(seed).permutation(num_clients)[:m]]


def run_federated(
    job: str,
    strategy: Strategy,
    clients: list[Client],
    init: Params,
    rounds: int,
    fraction: float,
    seed: int,
    store: JobStore | None = None,
    evaluate: Evaluate | None = None,
    show_progress: bool = True,
) -> FederatedResult:
    """Run `rounds` rounds of `strategy` over `clients`, resuming from `store` if it holds progress."""
    upload = tuple(n for n in init if strategy.shares(n))
    shared: Params = {n: init[n] for n in upload}
    ledger, curve, start = Ledger(), [], 0
    saved = store.load() if store else None
    if saved:
        start, shared = saved.step, unpack("shared", saved.arrays)
        for c in clients:
            c.set_state(unpack(f"client{c.cid}", saved.arrays))
        ledger, curve = Ledger.from_json(saved.meta["ledger"]), saved.meta["curve"]
    bar = progress_bar(total=rounds, initial=start, desc=job, unit="round", enabled=show_progress)
    for rnd in range(start + 1, rounds + 1):
        sampled = sample_clients(len(clients), fraction, derive_seed(seed, job, rnd))
        for step in strategy.schedule(sampled):
            results = []
            for cid in step:
                if shared:
                    ledger.record(rnd, cid, "down", shared)
                res = clients[cid].fit(FitIns(rnd, shared, upload, derive_seed(seed, job, rnd, cid)))
                check_upload(job, rnd, cid, res.params, upload)
                if res.params:
                    ledger.record(rnd, cid, "up", res.params)
                results.append((res.params, res.num_examples))
            shared = strategy.aggregate(shared, results)
        if evaluate:
            curve.append({"round": rnd, **evaluate({c.cid: c.model(shared) for c in clients})})
            bar.set_postfix({k: f"{v:.3f}" for k, v in curve[-1].items() if k != "round" and v is not None})
        if store:
            arrays = pack("shared", shared)
            for c in clients:
                arrays.update(pack(f"client{c.cid}", c.get_state()))
            store.save(JobState(rnd, arrays, {"ledger": ledger.to_json(), "curve": curve}, rnd == rounds))
        bar.update(1)
    bar.close()
    return FederatedResult(shared, {c.cid: c.model(shared) for c in clients}, ledger, curve)
