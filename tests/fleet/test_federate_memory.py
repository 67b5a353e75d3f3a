"""`nmoe federate` through device agents on an in-memory broker: the simulation's numbers, nothing
private on the wire, a device that drops off, a coordinator that restarts, the commit."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent, AgentConfig
from device_agent.device_data import load_device_data
from device_agent.training_service import ServiceOptions, TrainingService
from device_agent.wire.memory_transport import MemoryBroker
from device_agent.wire.training_frames import Command, Result, decode_training
from device_agent.wire.training_link import TrainingInbox
from toolkit import config
from toolkit.cli import main
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.fleet.federate import FederateOptions, federate
from toolkit.rundir import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.num_clients=3", "federated.rounds=2", 'stage1.methods=["fedce"]',
         'gate.methods=["rangate", "fedgate", "localgate"]', 'baselines.methods=["fedavg"]']
ACCURACIES = ("personalized_accuracy", "global_accuracy")


def small_config(*extra: str) -> config.Config:
    return config.load(ROOT / "configs" / "tiny.toml", [*SMALL, *extra])


@dataclass
class Fleet:
    broker: MemoryBroker
    agents: list[Agent]
    services: list[TrainingService]


class ResultLog:
    """A spy's record of one device's RESULTs (whole or chunked), in arrival order: subscribe its `deliver`
    to the device's result topic."""

    def __init__(self, device: str) -> None:
        self.device, self.results = device, list[Result]()
        self._arrived = threading.Condition()
        self._inbox = TrainingInbox(self._keep)

    def deliver(self, topic: str, payload: bytes) -> None:
        self._inbox.deliver(self.device, topic, payload)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        """Until `count` RESULTs arrived (False after `timeout_s`)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.results) >= count, timeout_s)

    def _keep(self, _sender: str, msg: object, _size: int) -> None:
        if isinstance(msg, Result):
            with self._arrived:
                self.results.append(msg)
                self._arrived.notify_all()


@contextmanager
def fleet(cfg: config.Config, tmp: Path, backend: str = "torch") -> Iterator[Fleet]:
    """One untrained agent per client on an in-memory broker, each with its data file and state dir."""
    broker = MemoryBroker()
    paths = write_fleet_data(cfg, tmp / "data")
    agents, services = [], []
    for c, path in enumerate(paths):
        agent = Agent(None, broker.transport(f"device-{c}"), None, AgentConfig(), device=f"device-{c}", expert=c)
        service = TrainingService(agent, load_device_data(path), tmp / "state" / f"device-{c}", ServiceOptions(backend))
        service.attach()
        agent.start()
        agents.append(agent)
        services.append(service)
    try:
        yield Fleet(broker, agents, services)
    finally:
        for agent, service in zip(agents, services, strict=True):
            service.stop()
            agent.stop()


def _accuracies(metrics: dict) -> dict[str, tuple[float, float]]:
    return {name: tuple(m[k] for k in ACCURACIES) for name, m in metrics["methods"].items()}  # type: ignore[misc]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train(small_config(), tmp_path_factory.mktemp("sim"), show_progress=False)


def test_a_federated_fleet_reproduces_the_simulation(tmp_path: Path, simulated: dict,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = small_config()
    wire: list[bytes] = []
    with fleet(cfg, tmp_path) as f:
        spy = f.broker.transport("spy")
        spy.subscribe("#")  # a capture of everything the broker carries
        spy.connect(None, lambda topic, payload: wire.append(payload), lambda *_: None)
        metrics = federate(cfg, tmp_path / "run", f.broker.transport("coordinator"),
                           FederateOptions(wait_s=10, show_progress=False, commit_precisions=("fp32",)))
        served = {a.model_version for a in f.agents}
        private = [v for svc in f.services for key in ("stage2_fedce", "stage3_fedce_fedgate")
                   for name, v in svc.ops.get_state(key).items()  # type: ignore[union-attr]
                   if key.startswith("stage2") or name.startswith("final.")]
        shared = list(f.services[0].ops.get_state("extractor/fedce").values())  # type: ignore[union-attr]
    assert set(metrics["methods"]) == {"fedavg", "nmoe_fedce_rangate", "nmoe_fedce_fedgate", "nmoe_fedce_localgate"}
    assert _accuracies(metrics) == _accuracies(simulated)  # exact: the same code on the same data and seeds
    for name, m in metrics["methods"].items():
        if name.startswith("nmoe"):
            assert m["routing"] == simulated["methods"][name]["routing"]
            assert m["upload_bytes"] == simulated["methods"][name]["upload_bytes"]
    assert served == {metrics["fleet"]["committed"]["model_version"]}
    assert (tmp_path / "run" / "report.md").exists()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "bundles")]) == 2  # models are on devices
    assert "is a federated run" in capsys.readouterr().err
    assert len(private) >= 3 * 3
    capture = b"".join(wire)
    assert all(np.ascontiguousarray(t, np.float32).reshape(-1)[:8].tobytes() in capture for t in shared)  # it would see
    for tensor in private:  # no expert tensor, no FedGate final-layer tensor, not even one row of one
        row = np.ascontiguousarray(tensor, np.float32).reshape(-1)[:8].tobytes()
        assert row not in capture
    commands = [m for p in wire if (m := _decoded(p)) is not None and isinstance(m, Command)]
    sent = {name for c in commands for name in c.tensors}
    assert sent and not any(n.startswith(("expert.", "gate.out", "final")) for n in sent), sorted(sent)
    assert not any(n.startswith("init.") for n in sent)  # torch devices draw the initializations themselves


def _decoded(payload: bytes) -> object:
    try:
        return decode_training(payload)
    except Exception:  # noqa: BLE001 -- chunks and presence on the spied topics
        return None


def test_a_device_that_is_offline_fails_its_setup_with_one_clear_error(tmp_path: Path) -> None:
    cfg = small_config("data.num_clients=4")
    broker = MemoryBroker()
    with pytest.raises(Exception, match=r"expert\(s\) \[0, 1, 2, 3\]"):
        federate(cfg, tmp_path / "run", broker.transport("coordinator"),
                 FederateOptions(wait_s=0.5, show_progress=False))
    assert json.loads((tmp_path / "run" / "fleet.json").read_text())["run"]


def test_private_state_survives_a_restarted_agent(tmp_path: Path) -> None:
    cfg = small_config('gate.methods=["fedgate"]', "baselines.methods=[]")
    with fleet(cfg, tmp_path) as f:
        federate(cfg, tmp_path / "run", f.broker.transport("coordinator"),
                 FederateOptions(wait_s=10, show_progress=False, deploy=""))
        before = {k: v.copy() for k, v in f.services[1].ops.get_state("stage3_fedce_fedgate").items()}  # type: ignore[union-attr]
    again = TrainingService(Agent(None, MemoryBroker().transport("x"), None, device="device-1", expert=1),
                            load_device_data(tmp_path / "data" / "device-1.npz"), tmp_path / "state" / "device-1")
    again.attach()
    try:
        assert again.ops is not None
        after = again.ops.get_state("stage3_fedce_fedgate")
        assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    finally:
        again.stop()


def test_a_device_lost_during_the_gate_rounds_is_a_failure_not_the_end(tmp_path: Path) -> None:
    """device-2 vanishes (its will says offline) after the first FedGate round: later rounds sample the
    devices still online, the quorum (half of the sampled) holds, the run completes and says what failed."""
    cfg = small_config('gate.methods=["fedgate"]', "baselines.methods=[]", "gate.rounds=4",
                       "gate.min_fit_fraction=0.5", "gate.round_timeout=5")
    out = tmp_path / "run"
    with fleet(cfg, tmp_path) as f:
        def kill_after_round_1() -> None:
            while "stage3_fedce_fedgate: round 1 fit" not in _text(out / "run.log"):
                time.sleep(0.02)
            f.agents[2].transport.kill()  # type: ignore[attr-defined]

        threading.Thread(target=kill_after_round_1, daemon=True).start()
        metrics = federate(cfg, out, f.broker.transport("coordinator"),
                           FederateOptions(wait_s=3, show_progress=False, commit_precisions=("fp32",)))
    assert metrics["fleet"]["committed"]["committed"] == [0, 1]  # the lost device is reported, not fatal
    assert metrics["fleet"]["committed"]["failed"] == {"2": "offline"}
    fedgate = metrics["methods"]["nmoe_fedce_fedgate"]
    assert len(fedgate["curve"]) == 4
    assert {row["client"] for row in fedgate["per_client"]} == {0, 1}
    assert any(f["client"] == 2 and f["job"] == "stage3_fedce_fedgate" for f in fedgate["failures"])


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""
