"""The round loop under failures: exceptions, deadlines, refused uploads, quorum, retries, availability."""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from toolkit.checkpoint import JobStore
from toolkit.errors import NoQuorumError
from toolkit.federated import (
    EvaluateIns,
    EvaluateRes,
    FedAvg,
    FitIns,
    FitRes,
    InProcess,
    Ledger,
    Params,
    RoundPolicy,
    Sequential,
    ThreadPool,
    run_federated,
)
from toolkit.federated.executor import Pending, SendableCall, SendThenWait
from toolkit.federated.summary import mean_accuracies

INIT = {"w": np.zeros(2, np.float32)}


@dataclass
class Toy:
    """A client whose update adds `amount`; its fit raises in the rounds of `raises_in`."""

    cid: int
    amount: float = 1.0
    examples: int = 1
    raises_in: set[int] = field(default_factory=set)  # rounds whose fit raises
    fits: list[int] = field(default_factory=list)  # rounds it was asked to fit
    evaluations: int = 0

    def fit(self, ins: FitIns) -> FitRes:
        self.fits.append(ins.round)
        if ins.round in self.raises_in:
            raise RuntimeError(f"device {self.cid} crashed")
        return FitRes({k: v + self.amount for k, v in ins.params.items()}, self.examples)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        self.evaluations += 1
        return EvaluateRes(1, {"personalized_accuracy": float(ins.params["w"][0]), "global_accuracy": 0.0})


def run(clients: list, rounds: int = 3, **kwargs) -> object:
    return run_federated("job", kwargs.pop("strategy", FedAvg()), clients, INIT, rounds, 0, show_progress=False,
                         **kwargs)


def test_a_client_raising_mid_round_does_not_abort_a_round_with_quorum() -> None:
    clients = [Toy(0, 1.0), Toy(1, 2.0), Toy(2, 3.0), Toy(3, 10.0, raises_in={2})]
    res = run(clients, policy=RoundPolicy(min_fit_fraction=0.75), evaluate=mean_accuracies)
    # round 1: mean +4; round 2: client 3 failed, the others' mean +2; round 3: +4
    np.testing.assert_allclose(res.shared["w"], 4 + 2 + 4)
    (f,) = res.ledger.failures
    assert (f.round, f.attempt, f.client, f.op, f.kind) == (2, 0, 3, "fit", "error")
    assert "device 3 crashed" in f.reason
    # it was sent the parameters (down), but nothing of it was aggregated (no up)
    round2 = [(m.client, m.direction) for m in res.ledger.messages if m.round == 2]
    assert (3, "down") in round2 and (3, "up") not in round2
    assert [p["round"] for p in res.curve] == [1, 2, 3]
    assert Ledger.from_json(res.ledger.to_json()).failures == res.ledger.failures  # checkpointed with the round


def test_a_client_missing_the_deadline_is_a_timeout_and_the_round_goes_on() -> None:
    release = threading.Event()

    @dataclass
    class Straggler(Toy):
        def fit(self, ins: FitIns) -> FitRes:
            release.wait(60)  # far longer than the round's deadline
            return super().fit(ins)

    clients = [Toy(0), Toy(1), Toy(2), Straggler(3, 100.0)]
    start = time.monotonic()
    try:
        res = run(clients, rounds=1, policy=RoundPolicy(min_fit_fraction=0.5, timeout=5.0), executor=ThreadPool())
    finally:
        release.set()
    assert time.monotonic() - start < 30  # did not wait for the straggler (60 s)
    np.testing.assert_allclose(res.shared["w"], 1.0)  # the straggler's +100 never arrived
    (f,) = res.ledger.failures
    assert (f.client, f.op, f.kind) == (3, "fit", "timeout")


def test_thread_pool_asks_a_step_concurrently() -> None:
    barrier = threading.Barrier(4, timeout=30)

    @dataclass
    class Waits(Toy):
        def fit(self, ins: FitIns) -> FitRes:
            barrier.wait()  # only passes when all four are in fit at once
            return super().fit(ins)

    res = run([Waits(c) for c in range(4)], rounds=1, executor=ThreadPool())
    assert res.ledger.failures == [] and float(res.shared["w"][0]) == 1.0


def test_in_process_executor_drops_late_results_and_does_not_start_calls_after_the_deadline() -> None:
    started = []

    def slow() -> str:
        started.append("slow")
        time.sleep(3.0)
        return "late"

    def fast() -> str:
        started.append("fast")
        return "ok"

    def broken() -> str:
        raise ValueError("bad")

    out = InProcess().map([fast, broken, slow, fast], timeout=2.0)
    assert out[0] == "ok" and isinstance(out[1], ValueError)
    assert isinstance(out[2], TimeoutError) and "after" in str(out[2])
    assert isinstance(out[3], TimeoutError) and "not started" in str(out[3])
    assert started == ["fast", "slow"]
    assert InProcess().map([fast, fast], timeout=None) == ["ok", "ok"]


def test_executors_let_keyboard_interrupt_through() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    for executor in (InProcess(), ThreadPool()):
        with pytest.raises(KeyboardInterrupt):
            executor.map([interrupted], timeout=None)


@dataclass
class Mailed(Toy):
    """A `Sender`: its calls are sent, then awaited; `log` records (what, cid, thread) in call order."""

    log: list[tuple[str, int, int]] = field(default_factory=list)
    answers: bool = True  # False: never answers (its wait sleeps out the time it is given)

    def _pending(self, what: str, answer: object) -> Pending[object]:
        self.log.append((f"send_{what}", self.cid, threading.get_ident()))

        def wait(timeout: float | None) -> object:
            self.log.append((f"wait_{what}", self.cid, threading.get_ident()))
            if not self.answers:
                time.sleep(timeout or 0.0)
                raise TimeoutError(f"client {self.cid}: no answer")
            if isinstance(answer, Exception):
                raise answer
            return answer

        return wait

    def send_fit(self, ins: FitIns) -> Pending[FitRes]:
        try:
            answer: object = Toy.fit(self, ins)
        except RuntimeError as e:
            answer = e
        return self._pending("fit", answer)  # type: ignore[return-value]

    def send_evaluate(self, ins: EvaluateIns) -> Pending[EvaluateRes]:
        return self._pending("evaluate", Toy.evaluate(self, ins))  # type: ignore[return-value]


def test_send_then_wait_sends_every_call_from_the_caller_thread_before_waiting_and_equals_in_process() -> None:
    log: list[tuple[str, int, int]] = []
    mailed = [Mailed(c, float(c + 1), raises_in={2} if c == 3 else set(), log=log) for c in range(4)]
    res = run(mailed, policy=RoundPolicy(min_fit_fraction=0.75), evaluate=mean_accuracies, executor=SendThenWait())
    plain = run([Toy(c, float(c + 1), raises_in={2} if c == 3 else set()) for c in range(4)],
                policy=RoundPolicy(min_fit_fraction=0.75), evaluate=mean_accuracies)
    np.testing.assert_array_equal(res.shared["w"], plain.shared["w"])
    assert res.curve == plain.curve and res.ledger.failures == plain.ledger.failures
    assert {thread for _, _, thread in log} == {threading.get_ident()}  # no thread per call
    steps = [[what for what, _, _ in log[i:i + 8]] for i in range(0, len(log), 8)]  # fit, evaluate; 3 rounds
    assert steps == [["send_fit"] * 4 + ["wait_fit"] * 4, ["send_evaluate"] * 4 + ["wait_evaluate"] * 4] * 3


def test_send_then_wait_waits_once_for_all_until_the_deadline() -> None:
    given: list[float | None] = []

    def silent() -> Pending[int]:
        def wait(timeout: float | None) -> int:
            given.append(timeout)
            time.sleep(timeout or 0.0)
            raise TimeoutError("no answer")
        return wait

    calls = [SendableCall(lambda: 0, lambda: (lambda timeout: 1)), SendableCall(lambda: 0, silent),
             SendableCall(lambda: 0, silent)]
    out = SendThenWait().map(calls, timeout=1.0)
    assert out[0] == 1 and all(isinstance(o, TimeoutError) for o in out[1:])
    # one deadline for the step: the first silent call used it up, the second was left what remained
    assert len(given) == 2 and given[0] is not None and 0 < given[0] <= 1.0 and given[1] == 0.0


def test_send_then_wait_reports_send_errors_and_hands_other_calls_to_its_fallback() -> None:
    def refused() -> Pending[int]:
        raise ConnectionError("offline")

    out = SendThenWait().map([SendableCall(lambda: 0, refused), SendableCall(lambda: 0, lambda: (lambda t: 2))], None)
    assert isinstance(out[0], ConnectionError) and out[1] == 2
    barrier = threading.Barrier(2, timeout=30)  # plain calls: the fallback (a ThreadPool) runs them concurrently
    assert SendThenWait().map([barrier.wait, barrier.wait], timeout=None) in ([0, 1], [1, 0])

    def interrupted(timeout: float | None) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SendThenWait().map([SendableCall(lambda: 0, lambda: interrupted)], timeout=None)


def test_uploads_with_wrong_names_shapes_or_values_are_refused_not_fatal() -> None:
    @dataclass
    class Bad(Toy):
        upload: Params = field(default_factory=dict)

        def fit(self, ins: FitIns) -> FitRes:
            return FitRes(self.upload, 1)

    clients = [Toy(0), Bad(1, upload={"w": np.zeros(3, np.float32)}),
               Bad(2, upload={"w": np.full(2, np.inf, np.float32)}), Bad(3, upload={"v": np.zeros(2, np.float32)}),
               Bad(4, upload={"w": np.zeros(2, np.float64)})]
    res = run(clients, rounds=1, policy=RoundPolicy(min_fit_clients=1, min_fit_fraction=0.2))
    assert float(res.shared["w"][0]) == 1.0  # only client 0 was aggregated
    reasons = {f.client: f.reason for f in res.ledger.failures}
    assert all(f.kind == "refused" for f in res.ledger.failures) and set(reasons) == {1, 2, 3, 4}
    assert "expected float32[2]" in reasons[1] and "not finite" in reasons[2]
    assert "uploaded ['v']" in reasons[3] and "float64" in reasons[4]
    assert [m.client for m in res.ledger.messages if m.direction == "up"] == [0]


def test_a_round_without_quorum_is_asked_again() -> None:
    class FlakyOnce(Toy):
        def fit(self, ins: FitIns) -> FitRes:
            if not self.fits:
                self.fits.append(ins.round)
                raise ConnectionError("link down")
            return super().fit(ins)

    clients = [Toy(0), Toy(1), FlakyOnce(2), Toy(3)]
    res = run(clients, rounds=1, policy=RoundPolicy(min_fit_fraction=1.0))
    (f,) = res.ledger.failures
    assert (f.client, f.attempt, f.kind) == (2, 0, "error") and "link down" in f.reason
    assert len([m for m in res.ledger.messages if m.direction == "down"]) == 8  # every client asked twice
    assert float(res.shared["w"][0]) == 1.0  # the second attempt started from the same parameters


def test_a_round_that_never_reaches_quorum_stops_the_job_and_the_same_job_resumes(tmp_path: Path) -> None:
    store = JobStore(tmp_path, "job")
    clients = [Toy(0), Toy(1, raises_in={2})]
    with pytest.raises(NoQuorumError, match=r"round 2 reached no quorum \(1 of 2 .* 2 needed\) in 2 attempt.*crashed"):
        run(clients, policy=RoundPolicy(retries=1), store=store)
    assert clients[1].fits == [1, 2, 2]  # asked once more, then the job stopped
    assert store.load().step == 1  # round 1 is kept
    healed = [Toy(0), Toy(1)]
    res = run(healed, store=store)
    assert healed[0].fits == [2, 3] and float(res.shared["w"][0]) == 3.0


def test_clients_are_sampled_and_evaluated_from_those_available() -> None:
    class Live:
        def __init__(self, ids: list[int]) -> None:
            self.ids, self.asked = ids, []

        def available(self, at_least: int) -> list[int]:
            self.asked.append(at_least)
            return list(self.ids)

    clients = [Toy(c) for c in range(5)]
    live = Live([1, 3, 4])
    run(clients, rounds=2, availability=live, evaluate=mean_accuracies,
        policy=RoundPolicy(fraction=0.7, min_fit_clients=2))
    assert clients[0].fits == clients[2].fits == []  # never asked: not available
    assert sum(len(c.fits) for c in clients) == 4  # round(0.7 * 3) = 2 of the 3 live ones, twice
    assert [c.evaluations for c in clients] == [0, 2, 0, 2, 2]
    assert 2 in live.asked  # told how many the round needs (a fleet may wait for them)

    with pytest.raises(NoQuorumError, match="no client available"):
        run(clients, rounds=1, availability=Live([]))


def test_the_strategy_is_told_about_failures() -> None:
    seen = []

    class Spy(FedAvg):
        def aggregate_fit(self, current, results, failures):
            seen.append(([cid for cid, _ in results], [f.client for f in failures]))
            return super().aggregate_fit(current, results, failures)

    run([Toy(0), Toy(1, raises_in={1})], rounds=1, strategy=Spy(), policy=RoundPolicy(min_fit_fraction=0.5))
    assert seen == [([0], [1])]


def test_rollgate_passes_the_model_on_past_a_failed_client() -> None:
    clients = [Toy(0, 1.0), Toy(1, 2.0, raises_in={1}), Toy(2, 4.0)]
    res = run(clients, rounds=1, strategy=Sequential(), policy=RoundPolicy(min_fit_fraction=0.6))
    np.testing.assert_allclose(res.shared["w"], 5.0)  # 1 + 4, the failed client's +2 is missing


def test_an_evaluation_failure_leaves_a_curve_point_from_the_others() -> None:
    class Blind(Toy):
        def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
            raise OSError("camera unplugged")

    res = run([Toy(0), Blind(1)], rounds=1, evaluate=mean_accuracies)
    assert res.curve == [{"round": 1, "personalized_accuracy": 1.0, "global_accuracy": 0.0}]
    (f,) = res.ledger.failures
    assert (f.op, f.client, f.kind) == ("evaluate", 1, "error")


def test_ledgers_of_older_checkpoints_still_load() -> None:
    old = [{"round": 1, "client": 0, "direction": "up", "names": ["w"], "nbytes": 8}]
    ledger = Ledger.from_json(old)
    assert ledger.total("up") == 8 and ledger.failures == []


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_clear_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from toolkit.cli import main

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"
    args = ["--set", "federated.lr=1e30", "--set", 'stage1.methods=["fedce"]', "--set", "gate.methods=[]",
            "--set", 'baselines.methods=["fedavg"]', "--set", "federated.rounds=1", "--set", "federated.round_retries=0",
            "--set", "data.num_clients=2"]
    assert main(["train", str(tiny), "--out", str(tmp_path), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmoe: error: stage1_fedce: round 1 reached no quorum") and "\n" not in err
    assert "not finite" in err and "lower the learning rate" in err
    assert "client 0" in (tmp_path / "run.log").read_text()  # the failures are in the run's log too
