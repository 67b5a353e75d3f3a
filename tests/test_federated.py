"""Aggregation strategies, the round loop, byte accounting and resume."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.checkpoint import JobStore, run_steps
from toolkit.errors import NoQuorumError
from toolkit.federated import (
    EvaluateRes,
    FedAvg,
    FederatedResult,
    FitIns,
    FitRes,
    NoSharing,
    Params,
    PartialSync,
    RoundPolicy,
    Sequential,
    nbytes,
    run_federated,
    sample_clients,
)
from toolkit.federated.params import weighted_mean
from toolkit.models import GATE_FINAL_PREFIX, Gate
from toolkit.torch_params import get_params
from toolkit.training import GateData, GateTask, LocalClient, OptimSpec


@dataclass(frozen=True)
class AddTask:
    """Toy client update: adds `amount` to every parameter."""

    amount: float

    def fit(self, params: Params, data: list[int], seed: int) -> tuple[Params, dict[str, float]]:
        return {k: v + self.amount for k, v in params.items()}, {}


def first_weight(params: Params) -> EvaluateRes:
    """A toy evaluation: 'accuracy' = the first body weight."""
    return EvaluateRes(1, {"personalized_accuracy": float(params["body.w"][0]), "global_accuracy": 0.0})


class AddClient(LocalClient[list[int]]):
    """A LocalClient whose 'training' adds (cid + 1); records the names it received."""

    def __init__(self, cid: int, init: Params, n: int = 1) -> None:
        super().__init__(cid, AddTask(cid + 1), [0] * n, init, first_weight)
        self.received: list[list[str]] = []

    def fit(self, ins: FitIns) -> FitRes:
        self.received.append(sorted(ins.params))
        return super().fit(ins)


INIT = {"body.w": np.zeros(3, np.float32), "final.w": np.zeros(2, np.float32)}


def test_weighted_mean_weights_by_examples() -> None:
    a, b = {"w": np.array([0.0, 0.0], np.float32)}, {"w": np.array([4.0, 8.0], np.float32)}
    out = weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [3.0, 6.0])
    assert out["w"].dtype == np.float32


def test_fedavg_one_round_is_the_weighted_mean_of_updates() -> None:
    clients = [AddClient(0, INIT, n=1), AddClient(1, INIT, n=3)]
    res = run_federated("t", FedAvg(), clients, INIT, rounds=1, seed=0, show_progress=False)
    np.testing.assert_allclose(res.shared["body.w"], (1 * 1 + 3 * 2) / 4)
    assert res.ledger.total("up") == res.ledger.total("down") == 2 * nbytes(INIT)


def test_fedgate_never_transmits_the_final_layer() -> None:
    clients = [AddClient(c, INIT) for c in range(3)]
    res = run_federated("t", PartialSync((GATE_FINAL_PREFIX,)), clients, INIT, rounds=3, seed=0,
                        show_progress=False)
    assert res.ledger.names_sent() == {"body.w"} and set(res.shared) == {"body.w"}
    assert all(m.nbytes == INIT["body.w"].nbytes for m in res.ledger.messages)
    assert all(r == ["body.w"] for c in clients for r in c.received)
    # each final layer is the client's own (it stays with the client, never with the server)
    assert len({float(c.state["final.w"][0]) for c in clients}) == 3


def test_fedgate_with_a_real_gate_sends_only_body_parameters() -> None:
    gen = torch.Generator().manual_seed(0)
    gate = lambda: Gate(8, 6, 3)
    init = get_params(gate())
    task = GateTask(gate, 1, 16, OptimSpec("adam", 0.01))
    clients = [LocalClient(c, task, GateData(torch.randn(40, 8, generator=gen),
                                             torch.softmax(torch.randn(40, 3, 5, generator=gen), -1),
                                             torch.randint(0, 5, (40,), generator=gen)), init) for c in range(3)]
    res = run_federated("g", PartialSync((GATE_FINAL_PREFIX,)), clients, init, 2, 0, show_progress=False)
    assert res.ledger.names_sent() == {"body.0.weight", "body.0.bias"}
    body_bytes = init["body.0.weight"].nbytes + init["body.0.bias"].nbytes
    assert res.ledger.total("up") == res.ledger.total("down") == 2 * 3 * body_bytes
    finals = [c.state["final.weight"] for c in clients]
    assert not np.allclose(finals[0], finals[1])


def test_local_gate_sends_nothing() -> None:
    clients = [AddClient(c, INIT) for c in range(2)]
    res = run_federated("t", NoSharing(), clients, INIT, 2, 0, show_progress=False)
    assert res.ledger.messages == [] and res.shared == {}
    assert float(clients[1].state["body.w"][0]) == 4.0  # two local rounds of +2


def test_rollgate_passes_one_model_client_to_client() -> None:
    clients = [AddClient(c, INIT) for c in range(3)]
    res = run_federated("t", Sequential(), clients, INIT, rounds=1, seed=0, show_progress=False)
    # each client adds cid+1 in sequence to the model it received: 1 + 2 + 3
    np.testing.assert_allclose(res.shared["body.w"], 6.0)
    order = [m.client for m in res.ledger.messages if m.direction == "up"]
    assert sorted(order) == [0, 1, 2]


def test_client_uploading_extra_names_is_refused_before_aggregation() -> None:
    class Leaky(AddClient):
        def fit(self, ins: FitIns) -> FitRes:
            res = super().fit(ins)
            return FitRes(dict(self.state), res.num_examples)  # everything, not just ins.upload

    with pytest.raises(NoQuorumError, match="final.w"):
        run_federated("t", PartialSync(("final.",)), [Leaky(0, INIT)], INIT, 1, 0, show_progress=False)


def test_client_sampling_is_seeded_and_sized() -> None:
    ids = list(range(10))
    assert sample_clients(ids, 3, 5) == sample_clients(ids, 3, 5)
    assert len(sample_clients(ids, 3, 5)) == 3 and len(set(sample_clients(ids, 10, 1))) == 10
    # with every client available, the draw is the one the simulation always made
    assert sample_clients(ids, 3, 5) == [int(c) for c in np.random.default_rng(5).permutation(10)[:3]]


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def run(store: JobStore, stop_after: int | None = None) -> tuple[FederatedResult, list[AddClient]]:
        clients = [AddClient(c, INIT) for c in range(4)]

        def summarize(results: list[tuple[int, EvaluateRes]]) -> dict[str, float]:
            saved = store.load()
            if stop_after is not None and saved and saved.step >= stop_after:
                raise KeyboardInterrupt  # like Ctrl-C in the round after `stop_after` was saved
            return {"first": sum(res.metrics["personalized_accuracy"] for _, res in results)}

        res = run_federated("t", PartialSync(("final.",)), clients, INIT, 5, 7, policy=RoundPolicy(fraction=0.5),
                            store=store, evaluate=summarize, private={c.cid: c for c in clients},
                            show_progress=False)
        return res, clients

    full, full_clients = run(JobStore(tmp_path / "a", "job"))
    store = JobStore(tmp_path / "b", "job")
    with pytest.raises(KeyboardInterrupt):
        run(store, stop_after=2)
    assert store.load().step == 2 and not store.load().done
    resumed, resumed_clients = run(store)
    assert store.load().done
    assert resumed.curve == full.curve and len(full.curve) == 5
    for a, b in zip(resumed_clients, full_clients):
        for k in INIT:
            np.testing.assert_array_equal(a.state[k], b.state[k])
    assert resumed.ledger.to_json() == full.ledger.to_json()


def test_finished_job_is_not_recomputed(tmp_path: Path) -> None:
    store = JobStore(tmp_path, "job")
    calls = []

    def step(i: int, prev):
        calls.append(i)
        return {"w": np.full(2, i, np.float32)}, {"i": i}

    first = run_steps(store, 3, step, "s", "step", show_progress=False)
    again = run_steps(store, 3, step, "s", "step", show_progress=False)
    assert calls == [0, 1, 2]
    assert [m for _, m in again] == [m for _, m in first]
    np.testing.assert_array_equal(again[-1][0]["w"], [2, 2])


def test_non_finite_updates_without_quorum_stop_the_job_with_a_clear_error(tmp_path: Path) -> None:
    class Exploding(AddClient):
        def fit(self, ins: FitIns) -> FitRes:
            res = super().fit(ins)
            return FitRes({k: v * np.nan for k, v in res.params.items()}, res.num_examples)

    store = JobStore(tmp_path, "job")
    with pytest.raises(NoQuorumError, match="lower the learning rate"):
        run_federated("t", FedAvg(), [AddClient(0, INIT), Exploding(1, INIT)], INIT, 2, 0, store=store,
                      show_progress=False)
    assert store.load() is None  # nothing half-aggregated was saved
