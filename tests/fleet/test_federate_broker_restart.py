"""`nmoe federate` over mosquitto survives broker restarts: one during a Stage 1 round, one during a
Stage 3 round; the coordinator and the `nmoe agent` processes reconnect and the run ends with the
simulation's exact numbers."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_federate_memory import _accuracies, small_config

from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from toolkit.checkpoint import JobStore
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.fleet.federate import FederateOptions, federate
from toolkit.rundir import train

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="needs mosquitto")
CONFIG = ("federated.local_epochs=1", 'gate.methods=["fedgate"]', "gate.rounds=4")  # Stage 1 rounds of seconds


class Restarts:
    """The broker, restarted on its port with its fleet dir (persistence kept) when a job reaches a round."""

    def __init__(self, options: BrokerOptions) -> None:
        self.broker: RunningBroker = start_broker(options)
        self.at: list[tuple[str, int]] = []  # (job, rounds checkpointed) at each restart

    def restart_during(self, checkpoints: Path, job: str, rounds: int, alive: threading.Thread) -> None:
        """Once `job` checkpointed its first round (and before its last), stop the broker and start it again."""
        end = time.monotonic() + 300
        while (state := _progress(checkpoints, job)) is None:
            assert alive.is_alive(), "the coordinator stopped early"
            assert time.monotonic() < end, f"{job} did not checkpoint a round"
            time.sleep(0.02)
        assert state < rounds, f"{job} finished before the restart: the test would show nothing"
        self.at.append((job, state))
        self.broker.stop()
        time.sleep(1.0)  # an outage: devices and the coordinator notice the lost connection
        self.broker = start_broker(replace(self.broker.options, port=self.broker.port))


def _progress(checkpoints: Path, job: str) -> int | None:
    try:
        state = JobStore(checkpoints, job).load()
    except ValueError:  # being replaced right now
        return None
    return None if state is None else state.step


def test_broker_restarts_mid_stage1_and_mid_stage3_the_run_completes_exactly(tmp_path: Path) -> None:
    cfg = small_config(*CONFIG, "baselines.methods=[]")
    simulated = train(cfg, tmp_path / "sim", show_progress=False)
    data = write_fleet_data(cfg, tmp_path / "data")
    out, logs = tmp_path / "run", tmp_path / "logs"
    restarts = Restarts(BrokerOptions(tmp_path / "fleet", port=0))
    result: dict[str, Any] = {}
    try:
        with AgentProcesses() as agents:
            for c in range(3):
                agents.start(AgentLaunch(f"device-{c}", (
                    "--data", str(data[c]), "--state", str(tmp_path / "state" / f"device-{c}"), "--broker",
                    restarts.broker.url, "--trainer", "torch", "--events", str(logs / f"device-{c}.jsonl")),
                    logs / f"device-{c}.log"))
            transport = MqttTransport(MqttSettings(BrokerUrl.parse(restarts.broker.url), "default-coordinator"))

            def coordinate() -> None:
                try:
                    result["metrics"] = federate(cfg, out, transport, FederateOptions(
                        wait_s=120, show_progress=False, commit_precisions=("fp32",)))
                except BaseException as e:  # noqa: BLE001 -- reported by the test's thread
                    result["error"] = e

            coordinator = threading.Thread(target=coordinate, daemon=True)
            coordinator.start()
            restarts.restart_during(out / "checkpoints", "stage1_fedce", cfg.federated.rounds, coordinator)
            restarts.restart_during(out / "checkpoints", "stage3_fedce_fedgate", cfg.gate.rounds, coordinator)
            coordinator.join(600)
            assert not coordinator.is_alive(), "the coordinator did not finish"
            assert agents.exited() == {}
    finally:
        restarts.broker.stop()
    assert "error" not in result, result.get("error")
    metrics = result["metrics"]
    assert _accuracies(metrics) == _accuracies(simulated)
    assert metrics["methods"]["nmoe_fedce_fedgate"]["upload_bytes"] == \
        simulated["methods"]["nmoe_fedce_fedgate"]["upload_bytes"]
    coordinator_events = [json.loads(x) for x in (out / "coordinator.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "coordinator_reconnect" for e in coordinator_events) >= 2, restarts.at
    for c in range(3):
        events = [json.loads(x) for x in (logs / f"device-{c}.jsonl").read_text().splitlines()]
        assert sum(e["event"] == "reconnect" for e in events) >= 2, f"device-{c}"
        assert any(e["event"] == "install" and e.get("model") == metrics["fleet"]["committed"]["model_version"]
                   for e in events)
    print("restarts at", restarts.at, "counters", metrics["fleet"]["counters"])
