"""One federated loop for every stage and strategy; checkpointed after every round.

A round samples from the available clients, then for each step of the strategy's schedule asks the
step's clients concurrently through the executor. A client may raise, miss the deadline, or upload
something that is refused (wrong names or shapes, non-finite values, no examples): each is a
`Failure` in the ledger, and `strategy.aggregate_fit` merges what was accepted. The round needs its
quorum (`RoundPolicy.quorum`) of accepted results; without it the round's aggregate is dropped and the
round is asked again with a fresh sample, up to `retries` times, after which the job stops with
`NoQuorumError` (the checkpoint keeps every completed round). Then the clients evaluate their own
models and the per-round curve gets the summary; then the round is checkpointed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar, cast

import numpy as np

from toolkit.checkpoint import JobState, JobStore, pack, unpack
from toolkit.errors import NoQuorumError
from toolkit.federated.availability import AllAvailable, Availability, sample_clients
from toolkit.federated.client import (
    Client,
    EvaluateIns,
    EvaluateRes,
    Evaluator,
    FitIns,
    FitRes,
    Metrics,
    Sender,
    Stateful,
)
from toolkit.federated.executor import Executor, InProcess, SendableCall
from toolkit.federated.ledger import Failure, FailureKind, Ledger
from toolkit.federated.params import Params
from toolkit.federated.strategy import Results, Strategy
from toolkit.progress import progress_bar
from toolkit.seeding import derive_seed

log = logging.getLogger("nmoe")

R = TypeVar("R")
Summarize = Callable[[list[tuple[int, EvaluateRes]]], Metrics]  # the clients' evaluations -> one curve point


@dataclass(frozen=True)
class RoundPolicy:
    """Who a round asks and what it needs back (config keys of the same names in toolkit.config)."""

    fraction: float = 1.0  # of the available clients sampled per round (at least one)
    min_fit_fraction: float = 1.0  # quorum: this fraction of the sampled clients must deliver ...
    min_fit_clients: int = 1  # ... and at least this many
    timeout: float | None = None  # seconds for a round's fits (and for an evaluation); None: no deadline
    retries: int = 2  # a round without quorum is asked again (fresh sample) this many times

    def sample_size(self, available: int) -> int:
        """How many of `available` clients a round asks: never fewer than it needs for quorum."""
        return min(available, max(1, round(self.fraction * available), self.min_fit_clients))

    def quorum(self, sampled: int) -> int:
        """Accepted results a round of `sampled` clients needs."""
        return max(self.min_fit_clients, math.ceil(self.min_fit_fraction * sampled - 1e-9))


@dataclass
class FederatedResult:
    """Outcome of a federated job: the shared parameters only (private parts stay with the clients)."""

    shared: Params
    ledger: Ledger
    curve: list[dict[str, float]] = field(default_factory=list)


def ask(executor: Executor, calls: Mapping[int, Callable[[], R]],
        timeout: float | None) -> tuple[list[tuple[int, R]], list[tuple[int, Exception]]]:
    """Run one call per client through `executor`: (answers, errors), each in the order of `calls`."""
    cids = list(calls)
    answers: list[tuple[int, R]] = []
    errors: list[tuple[int, Exception]] = []
    for cid, outcome in zip(cids, executor.map([calls[c] for c in cids], timeout)):
        if isinstance(outcome, Exception):
            errors.append((cid, outcome))
        else:
            answers.append((cid, outcome))
    return answers, errors


def fit_call(client: Client, ins: FitIns) -> Callable[[], FitRes]:
    """`client.fit(ins)` as one call of a step; a `SendableCall` when the client is a `Sender`."""
    run = partial(client.fit, ins)
    return SendableCall(run, partial(cast(Sender, client).send_fit, ins)) if hasattr(client, "send_fit") else run


def evaluate_call(client: Evaluator, ins: EvaluateIns) -> Callable[[], EvaluateRes]:
    """`client.evaluate(ins)` as one call of a step; a `SendableCall` when the client is a `Sender`."""
    run = partial(client.evaluate, ins)
    return SendableCall(run, partial(cast(Sender, client).send_evaluate, ins)) \
        if hasattr(client, "send_evaluate") else run


def failure_of(rnd: int, attempt: int, cid: int, op: str, error: Exception) -> Failure:
    """The ledger's record of a call that raised (`TimeoutError`: missed the deadline)."""
    kind: FailureKind = "timeout" if isinstance(error, TimeoutError) else "error"
    return Failure(rnd, attempt, cid, op, kind, f"{type(error).__name__}: {error}")


def check_upload(res: FitRes, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why an upload must be refused before aggregation, or None when it is sound."""
    if set(res.params) != set(expected):
        return f"uploaded {sorted(res.params)}, expected {sorted(expected)}"
    for name, value in res.params.items():
        shape, dtype = expected[name]
        if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
            got = f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
            return f"{name} is {got}, expected {dtype}{list(shape)}"
        if not np.isfinite(value).all():
            return f"update is not finite ({name}): training diverged; lower the learning rate of this stage"
    if res.num_examples < 1:
        return f"reported {res.num_examples} examples"
    return None


@dataclass
class _Job:
    """What every round of one job shares."""

    name: str
    strategy: Strategy
    clients: dict[int, Client]
    upload: tuple[str, ...]
    expected: dict[str, tuple[tuple[int, ...], np.dtype]]
    seed: int
    policy: RoundPolicy
    executor: Executor
    availability: Availability
    ledger: Ledger

    def record(self, failure: Failure, error: Exception | None = None) -> None:
        self.ledger.fail(failure)
        log.warning("%s: round %d (attempt %d): client %d %s %s: %s", self.name, failure.round, failure.attempt,
                    failure.client, failure.op, failure.kind, failure.reason,
                    exc_info=error if failure.kind == "error" else None)

    def available(self, at_least: int) -> list[int]:
        return [c for c in self.availability.available(at_least) if c in self.clients]

    def fit_round(self, rnd: int, shared: Params) -> Params:
        """The round's new shared parameters; raises NoQuorumError when every attempt lacks quorum."""
        for attempt in range(self.policy.retries + 1):
            available = self.available(self.policy.min_fit_clients)
            seed = derive_seed(self.seed, self.name, rnd, *(("retry", attempt) if attempt else ()))
            sampled = sample_clients(available, self.policy.sample_size(len(available)), seed)
            deadline = None if self.policy.timeout is None else time.monotonic() + self.policy.timeout
            new, delivered, failures = shared, 0, list[Failure]()
            for step in self.strategy.schedule(sampled):
                results, step_failures = self.fit_step(rnd, attempt, step, new, deadline)
                new = self.strategy.aggregate_fit(new, results, step_failures)
                delivered, failures = delivered + len(results), failures + step_failures
            need = self.policy.quorum(len(sampled))
            if delivered >= need:
                return new
            log.warning("%s: round %d (attempt %d) has no quorum: %d of %d sampled clients delivered, %d needed",
                        self.name, rnd, attempt, delivered, len(sampled), need)
        last = "; ".join(f"client {f.client}: {f.reason}" for f in failures[:3]) or "no client available"
        raise NoQuorumError(f"{self.name}: round {rnd} reached no quorum ({delivered} of {len(sampled)} sampled "
                            f"clients delivered, {need} needed) in {self.policy.retries + 1} attempt(s); {last}")

    def fit_step(self, rnd: int, attempt: int, step: list[int], shared: Params,
                 deadline: float | None) -> tuple[Results, list[Failure]]:
        calls = {}
        for cid in step:
            if shared:
                self.ledger.record(rnd, cid, "down", shared)
            ins = FitIns(rnd, shared, self.upload, derive_seed(self.seed, self.name, rnd, cid))
            calls[cid] = fit_call(self.clients[cid], ins)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        answers, errors = ask(self.executor, calls, remaining)
        failures = [failure_of(rnd, attempt, cid, "fit", e) for cid, e in errors]
        for (_, error), f in zip(errors, failures):
            self.record(f, error)
        results: Results = []
        for cid, res in answers:
            problem = check_upload(res, self.expected)
            if problem:
                failures.append(Failure(rnd, attempt, cid, "fit", "refused", problem))
                self.record(failures[-1])
                continue
            if res.params:
                self.ledger.record(rnd, cid, "up", res.params)
            results.append((cid, res))
        return results, failures

    def evaluate(self, rnd: int, shared: Params, summarize: Summarize) -> dict[str, float] | None:
        """One curve point from the available clients' own evaluations (None when none answered)."""
        ins = EvaluateIns(rnd, shared)
        calls = {cid: evaluate_call(self.clients[cid], ins) for cid in self.available(0)}
        answers, errors = ask(self.executor, calls, self.policy.timeout)
        for cid, error in errors:
            self.record(failure_of(rnd, 0, cid, "evaluate", error), error)
        return {"round": rnd, **summarize(answers)} if answers else None


def run_federated(
    job: str,
    strategy: Strategy,
    clients: Sequence[Client],
    init: Params,
    rounds: int,
    seed: int,
    *,
    policy: RoundPolicy | None = None,
    executor: Executor | None = None,
    availability: Availability | None = None,
    store: JobStore | None = None,
    evaluate: Summarize | None = None,
    private: Mapping[int, Stateful] | None = None,
    show_progress: bool = True,
) -> FederatedResult:
    """Run `rounds` rounds of `strategy` over `clients`, resuming from `store` if it holds progress.

    `evaluate` turns the clients' own evaluations into a curve point after every round (None: no
    evaluation). `private` (simulation only) holds clients' private state in this process: it is
    checkpointed with every round and restored on resume, so a resumed run equals an uninterrupted one.
    """
    upload = tuple(n for n in init if strategy.shares(n))
    by_id = {c.cid: c for c in clients}
    ctx = _Job(job, strategy, by_id, upload, {n: (init[n].shape, init[n].dtype) for n in upload}, seed,
               policy or RoundPolicy(), executor or InProcess(), availability or AllAvailable(list(by_id)), Ledger())
    private = private or {}
    shared: Params = {n: init[n] for n in upload}
    curve: list[dict[str, float]] = []
    start = 0
    saved = store.load() if store else None
    if saved:
        start, shared = saved.step, unpack("shared", saved.arrays)
        for cid, holder in private.items():
            holder.set_state(unpack(f"client{cid}", saved.arrays))
        ctx.ledger, curve = Ledger.from_json(saved.meta["ledger"]), saved.meta["curve"]
    bar = progress_bar(total=rounds, initial=start, desc=job, unit="round", enabled=show_progress)
    for rnd in range(start + 1, rounds + 1):
        began = time.perf_counter()
        shared = ctx.fit_round(rnd, shared)
        fitted = time.perf_counter()
        point = ctx.evaluate(rnd, shared, evaluate) if evaluate else None
        log.info("%s: round %d fit %.3f s, evaluate %.3f s", job, rnd, fitted - began, time.perf_counter() - fitted)
        if point:
            curve.append(point)
            bar.set_postfix({k: f"{v:.3f}" for k, v in point.items() if k != "round"})
        if store:
            arrays = pack("shared", shared)
            for cid, holder in private.items():
                arrays.update(pack(f"client{cid}", holder.get_state()))
            store.save(JobState(rnd, arrays, {"ledger": ctx.ledger.to_json(), "curve": curve}, rnd == rounds))
        bar.update(1)
    bar.close()
    return FederatedResult(shared, ctx.ledger, curve)
