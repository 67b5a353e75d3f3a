"""The NMoE recipe, server side: every stage as operations on devices (operations.py).

`nmoe train` runs it with in-process simulated devices (toolkit.simulation); the MQTT coordinator
runs the same recipe with proxies of device agents. The server holds only what is shared (Stage 1's
parameters, the gates' shared parts), the ledgers, the curves and the metrics the devices report.

Stage 1 is one federated job per method. Then every device must (a) take the shared extractor,
(b) train its expert (Stage 2) and (c) gather every expert's outputs on its own latents; a device
that fails a step is asked again up to `expert.retries` times, after which the run stops with
NoQuorumError (Stage 3 needs every expert). Stage 3 is one federated job per gate variant, and the
final numbers are the devices' own evaluations of their NMoE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from toolkit.artifacts import stage1_job, stage2_job, stage3_job
from toolkit.checkpoint import JobState, JobStore, pack, unpack
from toolkit.config import Config, FederatedConfig, GateConfig
from toolkit.errors import NoQuorumError
from toolkit.federated.availability import Availability
from toolkit.federated.client import EvaluateIns, Evaluator, Stateful
from toolkit.federated.engine import (
    FederatedResult,
    RoundPolicy,
    ask,
    failure_of,
    log,
    run_federated,
)
from toolkit.federated.executor import Executor, InProcess
from toolkit.federated.ledger import Failure
from toolkit.federated.operations import (
    Device,
    ExpertIns,
    ExtractorIns,
    GateDataIns,
    Report,
    Simulated,
)
from toolkit.federated.params import Params
from toolkit.federated.strategy import FedAvg, NoSharing, PartialSync, Sequential, Strategy
from toolkit.federated.summary import client_rows, mean_accuracies, routing_rows, summarize
from toolkit.models import GATE_FINAL_PREFIX
from toolkit.progress import progress_bar
from toolkit.seeding import derive_seed
from toolkit.torch_params import subset

GATE_STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "rollgate": Sequential,
    "fedavggate": FedAvg,
    "fedgate": lambda: PartialSync((GATE_FINAL_PREFIX,)),
    "localgate": NoSharing,
}

FailureRows = list[dict[str, Any]]  # Failure fields plus the job's name, as in metrics.json
D = TypeVar("D", bound=Device)  # the devices a recipe drives (a subclass may ask them for more operations)
R = TypeVar("R")


def failure_rows(job: str, failures: Sequence[Failure]) -> FailureRows:
    """A job's failures as metrics.json lists them."""
    return [{"job": job, **asdict(f)} for f in failures]


def round_policy(section: FederatedConfig | GateConfig) -> RoundPolicy:
    """The round keys of a config section."""
    return RoundPolicy(section.client_fraction, section.min_fit_fraction, section.min_fit_clients,
                       section.round_timeout or None, section.round_retries)


class NMoERecipe(Generic[D]):
    """Runs Stage 1, 2 and 3 of a config through `devices`, checkpointing under `checkpoints`.

    `initial(name)` gives the seeded initial parameters of a shared model: "fedce", "fedsc",
    "hybrid" (Stage 1) or "gate".
    """

    def __init__(self, cfg: Config, devices: Sequence[D], initial: Callable[[str], Params], checkpoints: Path,
                 executor: Executor | None = None, availability: Availability | None = None,
                 show_progress: bool = True) -> None:
        self.cfg, self.devices, self.initial, self.checkpoints = cfg, list(devices), initial, checkpoints
        self.executor = executor or InProcess()
        self.availability = availability
        self.show = show_progress
        self._stage1: dict[str, FederatedResult] = {}
        self.gates: dict[str, Params] = {}  # Stage 3 job -> its final shared parameters (what a commit deploys)

    def store(self, job: str) -> JobStore:
        return JobStore(self.checkpoints, job)

    def private(self, job: str) -> dict[int, Stateful]:
        """Simulation only: the private state of the devices that live in this process."""
        devices: Sequence[Device] = self.devices  # mypy narrows a Device, not a D, to Simulated
        return {d.cid: d.state(job) for d in devices if isinstance(d, Simulated)}

    def stage1(self, method: str) -> FederatedResult:
        """The Stage 1 job of `method` (FedCE is also the `fedavg` baseline's job: computed once)."""
        if method not in self._stage1:
            f, job = self.cfg.federated, stage1_job(method)
            clients = [d.stage1(method) for d in self.devices]
            self._stage1[method] = run_federated(
                job, FedAvg(), clients, self.initial(method), f.rounds, self.cfg.seed, policy=round_policy(f),
                executor=self.executor, availability=self.availability, store=self.store(job),
                evaluate=mean_accuracies if method == "fedce" else None, private=self.private(job),
                show_progress=self.show)
        return self._stage1[method]

    def nmoe(self, method: str) -> dict[str, dict[str, Any]]:
        """Every selected gate on top of the Stage 1 extractor of `method`: {nmoe_<method>_<gate>: metrics}."""
        s1 = self.stage1(method)
        extractor = subset(s1.shared, "extractor.")
        failures = failure_rows(stage1_job(method), s1.ledger.failures)
        failures += self.every_device(stage2_job(method), "use_extractor",
                                      lambda d: d.use_extractor(ExtractorIns(method, extractor)))[1]
        failures += self.experts(method)
        experts = tuple(d.cid for d in self.devices)
        failures += self.every_device(stage2_job(method), "prepare_gate",
                                      lambda d: d.prepare_gate(GateDataIns(method, experts)))[1]
        return {f"nmoe_{method}_{gate}": self.gate(method, gate, s1, failures) for gate in self.cfg.gate.methods}

    def every_device(self, job: str, op: str, call: Callable[[D], R]) -> tuple[dict[int, R], FailureRows]:
        """Ask every device; ask those that failed again (up to expert.retries times), else stop."""
        e, by_id = self.cfg.expert, {d.cid: d for d in self.devices}
        reports: dict[int, R] = {}
        failures: list[Failure] = []
        pending = sorted(by_id)
        bar = progress_bar(total=len(pending), desc=f"{job} {op}", unit="device", enabled=self.show)
        for attempt in range(e.retries + 1):
            answers, errors = ask(self.executor, {cid: partial(call, by_id[cid]) for cid in pending}, e.timeout or None)
            reports.update(answers)
            bar.update(len(answers))
            for cid, error in errors:
                failures.append(failure_of(0, attempt, cid, op, error))
                log.warning("%s: device %d failed %s: %s", job, cid, op, failures[-1].reason, exc_info=error)
            pending = [cid for cid, _ in errors]
            if not pending:
                bar.close()
                return reports, failure_rows(job, failures)
        bar.close()
        reasons = "; ".join(f"device {f.client}: {f.reason}" for f in failures[-len(pending):][:3])
        raise NoQuorumError(f"{job}: {op} needs every device; {len(pending)} failed in {e.retries + 1} "
                            f"attempt(s): {reasons}")

    def experts(self, method: str, job: str | None = None,
                train: Callable[[D], Report] | None = None) -> FailureRows:
        """Stage 2: every device trains its own expert (the simulation checkpoints them as `step<cid>`);
        `job` and `train`: another set of experts of every device (a hook for gate variants)."""
        job, seed = job or stage2_job(method), self.cfg.seed
        store, holders = self.store(job), self.private(job)
        saved = store.load()
        if saved and saved.done:
            for cid, holder in holders.items():
                holder.set_state(unpack(f"step{cid}", saved.arrays))
            failures: FailureRows = saved.meta.get("failures", [])
            return failures
        reports, failures = self.every_device(job, "train_expert", train or (lambda d: d.train_expert(
            ExpertIns(method, derive_seed(seed, "init", f"expert{d.cid}"), derive_seed(seed, method, "expert", d.cid)))))
        arrays: dict[str, Any] = {}
        for cid, holder in holders.items():
            arrays.update(pack(f"step{cid}", holder.get_state()))
        meta = {"metrics": [reports[cid].metrics for cid in sorted(reports)], "failures": failures}
        store.save(JobState(len(self.devices), arrays, meta, True))
        return failures

    def gate(self, method: str, gate: str, s1: FederatedResult, failures: FailureRows) -> dict[str, Any]:
        """Stage 3 with one gate variant, then every device evaluates its NMoE."""
        g, job = self.cfg.gate, stage3_job(method, gate)
        trained: FederatedResult | None = None
        evaluators: list[Evaluator]
        if gate == "rangate":
            evaluators = [d.random_gate(method) for d in self.devices]
        else:
            clients = [d.gate(method, gate) for d in self.devices]
            trained = run_federated(
                job, self.gate_strategy(gate), clients, self.gate_init(gate), g.rounds, self.cfg.seed,
                policy=round_policy(g), executor=self.executor, availability=self.availability, store=self.store(job),
                evaluate=mean_accuracies, private=self.private(job), show_progress=self.show)
            self.gates[job] = trained.shared
            evaluators = list(clients)
        result, evaluation_failures = self.evaluate(job, evaluators, EvaluateIns(g.rounds if trained else 0,
                                                                                 trained.shared if trained else {}))
        up = down = 0
        if trained:
            result["curve"] = trained.curve
            up, down = trained.ledger.total("up"), trained.ledger.total("down")
            failures = failures + failure_rows(job, trained.ledger.failures)
        result["upload_bytes"] = s1.ledger.total("up") + up
        result["download_bytes"] = s1.ledger.total("down") + down
        result["failures"] = failures + evaluation_failures
        return result

    def gate_strategy(self, gate: str) -> Strategy:
        """How a gate variant's job aggregates (a hook for gate variants defined elsewhere)."""
        return GATE_STRATEGIES[gate]()

    def gate_init(self, gate: str) -> Params:
        """A gate variant's initial parameters (a hook for gates with other outputs than the experts)."""
        return self.initial("gate")

    def evaluate(self, job: str, evaluators: Sequence[Evaluator], ins: EvaluateIns) -> tuple[dict[str, Any], FailureRows]:
        """The devices' own evaluations: means over those that answered, per-client rows, routing."""
        calls = {e.cid: partial(e.evaluate, ins) for e in evaluators}
        answers, errors = ask(self.executor, calls, self.cfg.gate.round_timeout or None)
        failures = [failure_of(ins.round, 0, cid, "evaluate", error) for cid, error in errors]
        if not answers:
            raise NoQuorumError(f"{job}: no device evaluated its model: " +
                                "; ".join(f"device {f.client}: {f.reason}" for f in failures[:3]))
        result = {**summarize(client_rows(answers)), "routing": routing_rows(answers, len(self.devices))}
        return result, failure_rows(job, failures)
