"""A fleet of devices without torch: `nmoe federate --stage1-from RUN_DIR` takes Stage 1 from an
`nmoe train` run of the same config, and `nmoe agent --trainer numpy` processes in which importing
torch fails train Stages 2-3 over a real mosquitto, to the simulation's accuracies within 0.3 points."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from absent_packages import subprocess_env
from test_federate_memory import ACCURACIES, fleet, small_config

from broker.process import BrokerOptions, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.training_frames import Command, decode_training
from toolkit.artifacts import stage1_job
from toolkit.cli import main
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.fleet.federate import FederateOptions, federate
from toolkit.fleet.stage1_source import Stage1SourceError, stage1_jobs
from toolkit.rundir import train

ROOT = Path(__file__).resolve().parents[2]
FAST = "federated.local_epochs=1"  # Stage 1 of the `nmoe train` source in a third of the time
# The numpy devices start from the coordinator's seeded initial expert and gates, shuffle with torch's
# stream and route RanGate with it: what differs is float rounding (latents from ONNX Runtime, MLPs in
# numpy). The target: every accuracy within 0.3 points. On this config one flipped prediction
# moves the personalized mean by 0.33 points (3 clients of 100 samples) and the global one by 0.17
# (3 x 200): no personalized prediction may flip. Measured: all within 4e-7 (float32 vs float64 means).
TOLERANCE = 0.003
NO_TORCH = r"""
import atexit, json, os, runpy, sys
import absent_packages
tried = []
class Record:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            tried.append(name)
absent_packages.block(("torch",))
sys.meta_path.insert(0, Record())  # before the block: sees every attempt
atexit.register(lambda: open(os.environ["NMOE_TEST_IMPORTS"], "w").write(json.dumps({"tried": tried,
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] == "torch")})))
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sim") / "run"
    return out, train(small_config(FAST), out, show_progress=False)


def _no_torch_agent(url: str, data: Path, state: Path, device: str, logs: Path) -> AgentLaunch:
    """`nmoe agent --trainer numpy` in a process where importing torch fails (and is recorded)."""
    env = {**subprocess_env(), "NMOE_TEST_IMPORTS": str(logs / f"{device}.imports.json")}
    return AgentLaunch(device, ("--data", str(data), "--state", str(state), "--broker", url, "--trainer", "numpy",
                                "--events", str(logs / f"{device}.jsonl")), logs / f"{device}.log",
                       python=(sys.executable, "-c", NO_TORCH), env=env)


def _assert_close(metrics: dict, simulated: dict) -> None:
    for name, sim in simulated["methods"].items():
        for key in ACCURACIES:
            assert abs(metrics["methods"][name][key] - sim[key]) <= TOLERANCE, (name, key)
        assert name == "fedavg" or np.allclose(metrics["methods"][name]["routing"], sim["routing"], atol=TOLERANCE)


def test_agents_without_torch_train_stages_2_3_on_stage1_of_a_train_run(
        tmp_path: Path, simulated: tuple[Path, dict]) -> None:
    source, sim = simulated
    cfg = small_config(FAST)
    data, logs = write_fleet_data(cfg, tmp_path / "data"), tmp_path / "logs"
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0)) as broker, AgentProcesses() as agents:
        for c in range(3):
            agents.start(_no_torch_agent(broker.url, data[c], tmp_path / "state" / f"device-{c}", f"device-{c}", logs))
        transport = MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), "default-coordinator"))
        started = time.monotonic()
        metrics = federate(cfg, tmp_path / "run", transport,
                           FederateOptions(wait_s=60, show_progress=False, commit_precisions=("fp32",),
                                           stage1_from=source))
        seconds = time.monotonic() - started
        assert agents.exited() == {}
        stopped = agents.stop()
    assert set(stopped.values()) == {0}, stopped
    assert set(metrics["methods"]) == set(sim["methods"])
    _assert_close(metrics, sim)
    print(f"federate {seconds:.1f} s:", {n: [100 * (m[k] - sim["methods"][n][k]) for k in ACCURACIES]
                                         for n, m in metrics["methods"].items()})
    for c in range(3):
        events = [json.loads(x) for x in (logs / f"device-{c}.jsonl").read_text().splitlines()]
        jobs = {e["job"] for e in events if e["event"] == "training"}
        assert jobs and not any(j.startswith("stage1") for j in jobs), jobs  # never asked for Stage 1
        assert any(e["event"] == "install" and e.get("model") == metrics["fleet"]["committed"]["model_version"]
                   for e in events)
        imports = json.loads((logs / f"device-{c}.imports.json").read_text())
        assert imports == {"tried": [], "loaded": []}, imports
    assert "Stage 1 taken from" in (tmp_path / "run" / "run.log").read_text()


def test_stage1_from_a_run_of_another_config_is_one_error_line(
        tmp_path: Path, simulated: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    source, _ = simulated
    args = ["federate", str(ROOT / "configs" / "tiny.toml"), "--out", str(tmp_path / "run"), "--stage1-from",
            str(source), "--broker", "mqtt://127.0.0.1:1", "--quiet"]
    sets = [x for s in ["data.num_clients=3", FAST, "federated.rounds=3", 'stage1.methods=["fedce"]'] for x in ("--set", s)]
    assert main([*args, *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmoe: error: --stage1-from") and "federated.rounds: 2 -> 3" in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_source_whose_stage1_job_did_not_finish_is_refused(tmp_path: Path, simulated: tuple[Path, dict]) -> None:
    source, _ = simulated
    with pytest.raises(Stage1SourceError, match=r"stage1_fedsc did not finish"):
        stage1_jobs(small_config(FAST, 'stage1.methods=["fedce", "fedsc"]'), source)
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    (copy / "checkpoints" / "stage1_fedce.npz").unlink()
    with pytest.raises(Stage1SourceError, match=r"stage1_fedce did not finish"):
        stage1_jobs(small_config(FAST), copy)
    with pytest.raises(Stage1SourceError, match=r"not a run dir"):
        stage1_jobs(small_config(FAST), tmp_path)
    # settings that change no Stage 1 number (Stage 2-3 keys, the method list) are no conflict
    assert stage1_jobs(small_config(FAST, "gate.rounds=5", "expert.epochs=2", 'stage1.methods=["fedce"]'),
                       source) == [stage1_job("fedce")]


def test_without_the_sources_fedce_the_fedavg_baseline_is_skipped_and_no_device_trains_stage1(
        tmp_path: Path, simulated: tuple[Path, dict]) -> None:
    source, _ = simulated
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    # a source whose only Stage 1 is "fedsc": FedCE's extractor under fedsc's name (Stages 2-3 use the extractor)
    (copy / "checkpoints" / "stage1_fedce.npz").rename(copy / "checkpoints" / "stage1_fedsc.npz")
    cfg = small_config(FAST, 'stage1.methods=["fedsc"]', 'gate.methods=["fedgate"]')
    wire: list[bytes] = []
    with fleet(cfg, tmp_path, "numpy") as f:
        spy = f.broker.transport("spy")
        spy.subscribe("#")
        spy.connect(None, lambda _topic, payload: wire.append(payload), lambda *_: None)
        metrics = federate(cfg, tmp_path / "run", f.broker.transport("coordinator"),
                           FederateOptions(wait_s=10, show_progress=False, deploy="", stage1_from=copy))
    assert set(metrics["methods"]) == {"nmoe_fedsc_fedgate"}
    assert "baseline fedavg skipped" in (tmp_path / "run" / "run.log").read_text()
    commands = [m for p in wire if isinstance(m := _decoded(p), Command)]
    jobs = {m.job for m in commands}
    assert "stage3_fedsc_fedgate" in jobs and not any(j.startswith("stage1") for j in jobs), jobs
    initial = {c.op.value: {n for n in c.tensors if n.startswith("init.")} for c in commands if c.job == "stage2_fedsc"}
    assert initial["train_expert"] == {"init.net.0.weight", "init.net.0.bias", "init.net.2.weight", "init.net.2.bias"}
    assert {"init.final.weight", "init.body.0.weight"} <= initial["prepare_gate"]  # numpy devices ask for them
    assert metrics["fleet"]["stage1_from"] == str(copy)


def _decoded(payload: bytes) -> object:
    try:
        return decode_training(payload)
    except Exception:  # noqa: BLE001 -- chunks and presence on the spied topics
        return None
