"""`nmoe federate` over a real mosquitto with --auth: `nmoe agent --data` processes train, the coordinator
and a device are SIGKILLed mid-run and restarted, and the run still ends with the simulation's numbers;
the ACL keeps devices from commanding each other."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_federate_memory import SMALL, _accuracies, small_config

from broker.accounts import fleet_accounts
from broker.process import BrokerOptions, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import Topics
from device_agent.wire.training_frames import Command, Op, decode_training, encode_training
from device_agent.wire.training_link import COORDINATOR
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.rundir import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="needs mosquitto")


def _agent(broker_url: str, cred_dir: Path, data: Path, state: Path, device: str, log: Path) -> AgentLaunch:
    return AgentLaunch(device, ("--data", str(data), "--state", str(state), "--broker", broker_url,
                                "--trainer", "torch", "--username", device,
                                "--password-file", str(cred_dir / f"{device}.password"),
                                "--events", str(log.with_suffix(".jsonl"))), log)


def _federate(url: str, fleet_dir: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "toolkit.cli", "federate", str(ROOT / "configs" / "tiny.toml"), "--out", str(out),
            "--broker", url, "--auth", "--fleet-dir", str(fleet_dir), "--wait", "60", "--quiet",
            "--commit-precisions", "fp32", *[x for s in SMALL for x in ("--set", s)]]
    return subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_killed_coordinator_and_device_resume_to_the_simulations_numbers(tmp_path: Path) -> None:
    cfg = small_config()
    simulated = train(cfg, tmp_path / "sim", show_progress=False)
    data = write_fleet_data(cfg, tmp_path / "data")
    fleet_dir, out = tmp_path / "fleet", tmp_path / "run"
    with start_broker(BrokerOptions(fleet_dir, port=0, auth=True, accounts=fleet_accounts(3))) as broker, \
            AgentProcesses() as agents:
        creds = fleet_dir / "credentials"
        launches = [_agent(broker.url, creds, data[c], tmp_path / "state" / f"device-{c}", f"device-{c}",
                           tmp_path / "logs" / f"device-{c}.log") for c in range(3)]
        for launch in launches:
            agents.start(launch)
        coordinator = _federate(broker.url, fleet_dir, out, tmp_path / "federate.log")
        _wait_for(lambda: any((out / "checkpoints").glob("stage1_fedce*.npz")), coordinator, 240)
        coordinator.kill()  # SIGKILL after Stage 1's first round was checkpointed
        coordinator.wait()
        agents.kill("device-1")  # and a device, with the private state it persisted
        agents.start(launches[1])
        coordinator = _federate(broker.url, fleet_dir, out, tmp_path / "federate.log")
        assert coordinator.wait(600) == 0, (tmp_path / "federate.log").read_text()[-3000:]
        assert agents.exited() == {}
        assert _forged_command_is_not_delivered(broker.url, creds)  # last: the forger takes device-0's session
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] is True
    assert _accuracies(metrics) == _accuracies(simulated)
    log = (out / "run.log").read_text()
    assert "resuming federated run" in log
    committed = metrics["fleet"]["committed"]
    for c in range(3):
        events = [json.loads(x) for x in (tmp_path / "logs" / f"device-{c}.jsonl").read_text().splitlines()]
        assert any(e["event"] == "install" and e.get("model") == committed["model_version"]
                   for e in events), f"device-{c} did not install the committed model"


def _wait_for(done: object, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert process.poll() is None, "the coordinator exited early"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _forged_command_is_not_delivered(url: str, creds: Path) -> bool:
    """device-0 publishes a SETUP on device-2's command topic: the ACL drops it (device-2 never answers)."""
    topics = Topics("nmoe", "default")
    seen: list[bytes] = []
    spy = MqttTransport(MqttSettings(BrokerUrl.parse(url), COORDINATOR, COORDINATOR,
                                     (creds / f"{COORDINATOR}.password").read_text().strip()))
    forger = MqttTransport(MqttSettings(BrokerUrl.parse(url), "device-0", "device-0",
                                        (creds / "device-0.password").read_text().strip()))
    spy.subscribe(topics.train_result("device-2"), qos=1)
    spy.connect(None, lambda _t, p: seen.append(p), lambda *_: None)
    forger.connect(None, lambda *_: None, lambda *_: None)
    time.sleep(1.0)
    forged = Command(b"f" * 16, Op.SETUP, "forged", "setup", 0, 0, int(time.time() * 1000) + 60_000,
                     {"run_config": {}})
    forger.publish(topics.train_command("device-2"), encode_training(forged), qos=1)
    time.sleep(2.0)
    forger.close()
    spy.close()
    return not any(getattr(decode_training(p), "run", None) == "forged" for p in seen)
